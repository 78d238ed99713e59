"""Shared helpers for the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a large float32 matmul: a practical estimate of this machine's peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = best_time(lambda: a @ b, repeats)
    return 2 * n**3 / t / 1e9


def tiny_gpt2(vocab: int, d: int, layers: int, heads: int, n_positions: int):
    """A GPT-2-config HF model (random weights, no hub access) and its seqebm adapter."""
    from seqebm.models.hf import HFCausalLM

    torch.manual_seed(0)
    adapter = HFCausalLM.from_config({"vocab_size": vocab, "n_embd": d, "n_layer": layers, "n_head": heads,
                                      "n_positions": n_positions, "bos_token_id": 1, "eos_token_id": 2},
                                     model_type="gpt2")
    return adapter.model.eval(), adapter.eval()


def report(result: dict) -> None:
    """Print the result as the last line: one JSON object."""
    print(json.dumps(result))
