"""Tokens/s of seqebm's sampler vs HF ``generate`` on the same weights (issue #3).

A GPT-2-config model of ~5M parameters runs (a) under HF ``generate`` (do_sample, top-k 10),
(b) under seqebm's sampler through the HF adapter, and (c) seqebm's own Transformer of the same
size under seqebm's sampler. B=64 prompts of 32 tokens, 50 new tokens each (EOS disabled so all
runs generate the same number of tokens). ``ratio`` = (c) / (a); ``ratio_adapter`` = (b) / (a).
Also reports achieved GFLOP/s (2·params·tokens forward estimate plus attention) against a
matmul-measured peak of this machine.

    python benchmarks/sampler_vs_hf.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, matmul_peak_gflops, report, tiny_gpt2  # noqa: E402

from seqebm.models.transformer import TransformerLM  # noqa: E402
from seqebm.sampling.sampler import sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    vocab, d, layers, heads = 8000, 256, 4, 4
    batch, prompt_len, new = (16, 32, 20) if args.quick else (64, 32, 50)
    repeats = 1 if args.quick else 3
    hf, adapter = tiny_gpt2(vocab, d, layers, heads, 128)
    own = TransformerLM(vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, max_len=128,
                        dropout=0.0).eval()
    params = sum(p.numel() for p in hf.parameters())
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    prompts[:, 0] = 1

    def run_hf():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=10,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def run_seqebm(model):
        return lambda: sample(model, prompts, max_new_tokens=new, top_k=10, generator=torch.Generator().manual_seed(0))

    t_hf = best_time(run_hf, repeats)
    t_adapter = best_time(run_seqebm(adapter), repeats)
    t_own = best_time(run_seqebm(own), repeats)
    tokens = batch * new
    ctx = prompt_len + new / 2
    flops = tokens * (2 * params + 4 * layers * ctx * d)  # forward FLOPs of the generated tokens
    peak = matmul_peak_gflops()
    report({
        "name": "sampler_vs_hf", "ratio": t_hf / t_own, "ratio_adapter": t_hf / t_adapter,
        "hf_tokens_per_s": tokens / t_hf, "seqebm_adapter_tokens_per_s": tokens / t_adapter,
        "seqebm_tokens_per_s": tokens / t_own, "params": params, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new, "peak_gflops_est": peak, "hf_gflops": flops / t_hf / 1e9,
        "seqebm_gflops": flops / t_own / 1e9, "quick": args.quick,
    })


if __name__ == "__main__":
    main()
