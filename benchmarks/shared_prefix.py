"""Many continuations of one prefix: seqebm's shared-prefix engine vs HF ``generate`` (issue #3).

n=256 continuations of 40 tokens from one 120-token prefix, top-k 10, on the same GPT-2-config
weights. HF ``generate(num_return_sequences=256)`` expands the prompt and encodes it once per
sample; seqebm encodes it once and copies its KV cache. ``ratio`` = HF time / seqebm time with
seqebm's own Transformer of equal size; ``ratio_adapter`` uses the HF weights through the adapter.

    python benchmarks/shared_prefix.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report, tiny_gpt2  # noqa: E402

from seqebm.models.transformer import TransformerLM  # noqa: E402
from seqebm.sampling.sampler import sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    vocab, d, layers, heads = 8000, 256, 4, 4
    n, prefix_len, new = (64, 120, 20) if args.quick else (256, 120, 40)
    repeats = 1 if args.quick else 2
    hf, adapter = tiny_gpt2(vocab, d, layers, heads, 256)
    own = TransformerLM(vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, max_len=256,
                        dropout=0.0).eval()
    prefix = torch.randint(3, vocab, (1, prefix_len), generator=torch.Generator().manual_seed(0))
    prefix[:, 0] = 1

    def run_hf():
        with torch.no_grad():
            hf.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True, top_k=10,
                        num_return_sequences=n, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def run_seqebm(model):
        return lambda: sample(model, prefix, num_samples=n, max_new_tokens=new, top_k=10,
                              generator=torch.Generator().manual_seed(0))

    t_hf = best_time(run_hf, repeats)
    t_adapter = best_time(run_seqebm(adapter), repeats)
    t_own = best_time(run_seqebm(own), repeats)
    tokens = n * new
    report({
        "name": "shared_prefix", "ratio": t_hf / t_own, "ratio_adapter": t_hf / t_adapter,
        "hf_tokens_per_s": tokens / t_hf, "seqebm_adapter_tokens_per_s": tokens / t_adapter,
        "seqebm_tokens_per_s": tokens / t_own, "samples": n, "prefix_len": prefix_len, "new_tokens": new,
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
