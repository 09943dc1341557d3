"""What loading the default model costs: wall time, peak resident memory and the bytes its tensors hold, each
load in a fresh process, with the fp32 cache of the GGUF file (loading.py) absent and present.

    python scripts/load_cost.py [--quantize gguf|none] [--repeat 3] [--threads 2] [--cases absent,present]

Each case runs `MedusaModel.from_pretrained(None, quantize=...)` in a new Python process whose $MEDUSA_CACHE is a
temporary folder: empty for "absent", filled by one quantize="none" load, untimed, for "present". Figures per
run: seconds in `from_pretrained` (wall, and CPU time of all the process's threads: steadier on a shared
machine), the process's peak RSS (ru_maxrss), its RSS before loading (imports only) and after, and the bytes
held by the model's parameters and buffers (heads included, tied tensors once). The medusa imported is the one
on $PYTHONPATH (the children run in the temporary folder), so two checkouts can be compared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
from medusa import MedusaModel

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

before = rss_mb()
t, cpu = time.perf_counter(), time.process_time()
m = MedusaModel.from_pretrained(None, quantize={quantize!r})
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
tensors = {{}}
for module in (m.base_model, m.heads):
    for x in [*module.parameters(), *module.buffers()]:
        try:
            tensors[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        except NotImplementedError:     # an opaque (oneDNN-packed) tensor: its elements' bytes
            tensors[id(x)] = x.numel() * x.element_size()
json.dump({{"seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": before, "rss_after_mb": rss_mb(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "tensor_mb": sum(tensors.values()) / 2**20}}, sys.stdout)
"""


def load_once(cache: str, quantize: str, threads: int) -> dict:
    env = {**os.environ, "MEDUSA_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", _CHILD.format(quantize=quantize, threads=threads)], env=env,
                         cwd=cache, capture_output=True, text=True)     # medusa from $PYTHONPATH, not the cwd
    if out.returncode:
        raise RuntimeError(f"the load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", default="gguf", choices=["gguf", "none"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="absent,present", help="absent, present or both (comma-separated)")
    args = p.parse_args()
    print(f"{'cache':8} {'s':>6} {'CPU s':>6} {'peak MB':>8} {'RSS before':>10} {'RSS after':>9} {'tensor MB':>9}")
    for case in args.cases.split(","):
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                if case == "present":
                    load_once(cache, "none", args.threads)      # writes the fp32 cache, if any load does
                r = load_once(cache, args.quantize, args.threads)
            print(f"{case:8} {r['seconds']:6.2f} {r['cpu_seconds']:6.2f} {r['peak_rss_mb']:8.0f} "
                  f"{r['rss_before_mb']:10.0f} {r['rss_after_mb']:9.0f} {r['tensor_mb']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
