"""medusa.inference.native: a thread gives back its libgomp team, and the server's engine worker takes it over;
the heap gives back its free pages.
Each case runs in a fresh interpreter, where the process's threads can be counted (Linux: /proc/self/task)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")

PRELUDE = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from medusa.inference.native import release_heap, release_team
torch.set_num_threads(2)
def tasks(): return len(os.listdir("/proc/self/task"))
def parallel(): return float(torch.arange(1 << 22, dtype=torch.float64).sum())   # big enough to run in parallel
"""


def _run(body: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("skip"):
        pytest.skip(out.stdout.strip())
    return [int(x) for x in out.stdout.split()]


def test_release_ends_the_calling_threads_team_and_parallel_work_goes_on():
    before, with_team, released, again, total = _run("""
        before = tasks()
        parallel()
        with_team = tasks()
        if not release_team():
            print("skip: torch runs on another OpenMP runtime than libgomp"); sys.exit()
        released = tasks()
        total = parallel()
        print(before, with_team, released, tasks(), int(total == (1 << 22) * ((1 << 22) - 1) // 2))
    """)
    assert (with_team, released, again) == (before + 1, before, before + 1)   # one helper for 2 threads
    assert total == 1


def test_the_engine_worker_takes_over_the_openmp_team_of_the_thread_that_makes_it():
    before, with_team, with_worker = _run("""
        from serving import tiny_medusa
        from medusa.interfaces.engine_worker import EngineWorker
        model = tiny_medusa()
        if not release_team():
            print("skip: torch runs on another OpenMP runtime than libgomp"); sys.exit()
        before = tasks()
        parallel()                          # the model was loaded here: this thread has a team
        with_team = tasks()
        worker = EngineWorker(model)        # its thread replaces this one's helper
        print(before, with_team, tasks())
        worker.close()
    """)
    assert (with_team, with_worker) == (before + 1, before + 1)


def test_release_heap_hands_the_free_pages_back():
    """200 MB of small blocks freed below one still in use: the heap cannot shrink from its top, so glibc keeps
    the pages until release_heap."""
    before, freed, released = _run("""
        def rss(): return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:"))) // 1024
        before = rss()
        blocks = [bytearray(4000) for _ in range(50_000)]
        last = bytearray(4000)
        del blocks
        freed = rss()
        if not release_heap():
            print("skip: no glibc"); sys.exit()
        print(before, freed, rss())
    """)
    assert freed - before > 150 and released - before < 50
