"""One E-Forcing training step vs one teacher-forcing step on the same batch (issue #4).

Transformer LM (d=256, 4 layers, V=8000), B=32 rows of 64 tokens, K=50 negatives' length (the
seed's LM setting). Both steps are forward + backward + AdamW update; the E-Forcing step adds the
generation of 32 negatives of 50 tokens (no gradient) and a forward/backward on them. ``ratio``
= E-Forcing step time / teacher-forcing step time (lower is better); the FLOP floor is about
2.3x (one extra generation plus a forward+backward on the negatives), the target <= 2.6x.

    python benchmarks/eforcing_step.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.data.batching import Batch  # noqa: E402
from seqebm.models.transformer import TransformerLM  # noqa: E402
from seqebm.objectives import EForcingLoss, TeacherForcingLoss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller model, under 60 s on 2 cores")
    args = ap.parse_args()
    vocab, d, layers, rows, length, k = (2000, 128, 2, 16, 32, 25) if args.quick else (8000, 256, 4, 32, 64, 50)
    repeats = 2 if args.quick else 5
    torch.manual_seed(0)
    model = TransformerLM(vocab, d_model=d, n_layers=layers, n_heads=4, d_ff=4 * d, max_len=length + 1,
                          dropout=0.1)
    x = torch.randint(4, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1
    batch = Batch(inputs=x[:, :-1], targets=x[:, 1:], mask=torch.ones(rows, length, dtype=torch.bool))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(objective):
        def run():
            out = objective(model, batch, step=0, generator=g) if isinstance(objective, EForcingLoss) \
                else objective(model, batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return run

    tf, ef = TeacherForcingLoss(), EForcingLoss(num_steps=k, lambda_base=0.1)
    t_tf = best_time(step(tf), repeats)
    t_ef = best_time(step(ef), repeats)
    print(f"teacher forcing step: {t_tf * 1e3:.1f} ms;  E-Forcing step (K={k}): {t_ef * 1e3:.1f} ms")
    print(f"ratio E-Forcing / teacher forcing: {t_ef / t_tf:.2f}x (FLOP floor ~2.3x, target <= 2.6x)")
    report({"name": "eforcing_step", "ratio": t_ef / t_tf, "tf_ms": t_tf * 1e3, "ef_ms": t_ef * 1e3,
            "rows": rows, "length": length, "K": k, "d_model": d, "layers": layers, "vocab": vocab,
            "threads": torch.get_num_threads(), "quick": args.quick})


if __name__ == "__main__":
    main()
