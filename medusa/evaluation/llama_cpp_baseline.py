"""llama.cpp's plain decoding of the same GGUF file, as a `medusa bench` method (`--llama-cpp`).

Through llama-cpp-python (`pip install llama-cpp-python`, an optional extra: `pip install "medusa[llamacpp]"`):
the same prompt token ids medusa gets (our chat template), the same thread count and token budget, greedy
(temperature 0: llama.cpp's argmax), one token per forward pass, ending at the model's end-of-sequence tokens.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


class LlamaCppRunner:
    """`runner(model, ids, cfg, seed)` -> bench.Answer, as bench.RUNNERS' entries."""

    def __init__(self, gguf: str | Path, *, threads: int, context: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python") from None
        if not Path(gguf).is_file():
            raise FileNotFoundError(f"--llama-cpp: GGUF file not found: {gguf}")
        self.path = str(gguf)
        self.llm = Llama(model_path=self.path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         n_batch=512, verbose=False)

    def __call__(self, model, ids: torch.Tensor, cfg, seed: int):
        from medusa.evaluation.bench import Answer

        if not cfg.greedy:
            raise ValueError("the llama.cpp baseline runs greedy only (temperature 0)")
        eos = set(model.decode_options().eos_token_ids)
        prompt = ids[0].tolist()
        if len(prompt) + cfg.max_new_tokens > self.llm.n_ctx():
            raise ValueError(f"llama.cpp's context ({self.llm.n_ctx()}) is shorter than this prompt and answer")
        tokens = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            tokens.append(int(tok))
            if tok in eos or len(tokens) >= cfg.max_new_tokens:
                break
        return Answer(tokens, time.perf_counter() - t0, [1] * len(tokens))
