"""Log Z bound estimation for a residual EBM: shared-prefix engine vs re-encoding every prefix (issue #5).

The bounds of the residual-EBM seed (Thm. 2, Eq. 4) need n LM samples per prefix and their
energies. This measures that estimation (:func:`seqebm.estimators.residual.sample_log_weights`)
for B prefixes of P tokens, n continuations of L tokens each, with a Transformer LM and a UniT
energy: once with the shared-prefix engine (each prefix encoded once, its KV cache shared by its
n samples, in the LM's generation and in the UniT energy) and once the straightforward way (the
prefix repeated n times and encoded n times in both).
``ratio`` = straightforward time / shared time (target >= 3x); also samples drawn and scored per
second and the achieved GFLOP/s against this machine's matmul peak.

    python benchmarks/bounds.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, matmul_peak_gflops, report  # noqa: E402

from seqebm.estimators.residual import sample_log_weights  # noqa: E402
from seqebm.models.energy import UniTEnergy  # noqa: E402
from seqebm.models.residual import ResidualEBM  # noqa: E402
from seqebm.models.transformer import TransformerLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    vocab, d, layers = 4000, 128, 2 if args.quick else 4
    b, p, n, new = (2, 64, 32, 16) if args.quick else (4, 96, 128, 16)
    torch.manual_seed(0)
    lm = TransformerLM(vocab, d_model=d, n_layers=layers, n_heads=4, d_ff=4 * d, max_len=p + new, dropout=0.0).eval()
    model = ResidualEBM(lm, UniTEnergy(lm)).eval()
    prefix = torch.randint(3, vocab, (b, p), generator=torch.Generator().manual_seed(0))
    prefix[:, 0] = 1

    def shared():
        sample_log_weights(model, prefix, num_samples=n, max_new_tokens=new, generator=torch.Generator().manual_seed(1))

    def straightforward():  # every sample re-encodes its prefix
        sample_log_weights(model, prefix.repeat_interleave(n, 0), num_samples=1, max_new_tokens=new,
                           generator=torch.Generator().manual_seed(1))

    repeats = 1 if args.quick else 2
    t_shared = best_time(shared, repeats)
    t_plain = best_time(straightforward, repeats)
    params = sum(x.numel() for x in lm.parameters())
    # FLOPs of the shared path, ≈ 2·params per token processed: generation reads each prefix once
    # and each sample's new tokens; the UniT energy (same size as the LM) does the same
    flops_shared = 2 * 2 * params * (b * p + b * n * new)
    gflops = flops_shared / t_shared / 1e9
    peak = matmul_peak_gflops()
    rate = b * n / t_shared
    print(f"B={b} prefixes of {p} tokens, n={n} samples of {new} tokens, {params / 1e6:.2f}M-parameter LM + UniT")
    print(f"shared-prefix: {t_shared:.2f} s ({rate:.0f} samples drawn+scored/s, {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of the {peak:.0f} GFLOP/s matmul peak)")
    print(f"re-encoding every prefix: {t_plain:.2f} s  -> ratio {t_plain / t_shared:.2f}x (target >= 3x)")
    report({"name": "bounds", "ratio": t_plain / t_shared, "shared_s": t_shared, "plain_s": t_plain,
            "samples_per_s": rate, "gflops": gflops, "peak_gflops": peak, "prefixes": b, "prefix_len": p,
            "samples_per_prefix": n, "new_tokens": new, "quick": args.quick})


if __name__ == "__main__":
    main()
