"""CTC-CRF loss (seqebm.structured.ctc_crf) vs torch.nn.functional.ctc_loss, issue #9.

B=32 utterances of T=200 frames, 30 labels + blank, targets of 40 labels, float32, one thread.
Timed in the same run: forward + backward of ``F.ctc_loss`` and of the CTC-CRF loss
(numerator = the same ``F.ctc_loss`` + log p_LM(y); denominator = the forward algorithm over the
CTC topology composed with a bigram label LM, hand-written backward), both from logits through a
log_softmax. ``ratio`` = CTC-CRF time / CTC time (goal <= 2.5). Also: the denominator's
hand-written backward vs autograd through the same recursion (``denominator_autograd_speedup``),
after checking that both give the same log Z and gradient.

    python benchmarks/ctc_crf.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.structured.ctc_crf import (CTCCRFLoss, ctc_crf_denominator,  # noqa: E402
                                       ctc_crf_denominator_autograd)
from seqebm.structured.label_ngram import LabelNGram  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, a few seconds")
    args = ap.parse_args()
    B, T, V, L = (8, 60, 30, 12) if args.quick else (32, 200, 30, 40)
    repeats = 2 if args.quick else 15  # best of 15: one busy core can double a single timing
    torch.set_num_threads(1)
    rng = random.Random(0)
    lm = LabelNGram.fit([[rng.randint(1, V) for _ in range(rng.randint(5, 50))] for _ in range(500)], V, 2)
    loss_fn = CTCCRFLoss(lm, reduction="mean")
    graph = loss_fn.graph(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V + 1, generator=g)
    targets = torch.randint(1, V + 1, (B, L), generator=g)
    tl = torch.full((B,), L)
    lengths = torch.full((B,), T)

    def ctc() -> None:
        z = logits.clone().requires_grad_(True)
        F.ctc_loss(z.log_softmax(-1).transpose(0, 1), targets, lengths, tl, reduction="mean").backward()

    def ctc_crf() -> None:
        z = logits.clone().requires_grad_(True)
        loss_fn(z.log_softmax(-1), lengths, targets, tl).backward()

    def den(fn) -> torch.Tensor:
        z = logits.clone().requires_grad_(True)
        fn(z.log_softmax(-1), lengths, graph).sum().backward()
        return z.grad

    # equal results first: hand-written backward == autograd through the recursion
    torch.testing.assert_close(den(ctc_crf_denominator), den(ctc_crf_denominator_autograd), rtol=1e-4, atol=1e-5)
    lz = ctc_crf_denominator(logits.log_softmax(-1), lengths, graph)
    torch.testing.assert_close(lz, ctc_crf_denominator_autograd(logits.log_softmax(-1), lengths, graph),
                               rtol=1e-5, atol=1e-3)
    t_ctc = best_time(ctc, repeats)
    t_crf = best_time(ctc_crf, repeats)
    t_den = best_time(lambda: den(ctc_crf_denominator), repeats)
    t_auto = best_time(lambda: den(ctc_crf_denominator_autograd), repeats)
    print(f"B={B} T={T} V={V}+blank L={L} bigram label LM ({graph.num_states} graph states), 1 thread")
    print(f"F.ctc_loss fwd+bwd {1e3 * t_ctc:.1f} ms | CTC-CRF fwd+bwd {1e3 * t_crf:.1f} ms "
          f"(ratio {t_crf / t_ctc:.2f}, goal <= 2.5)")
    print(f"denominator fwd+bwd: hand-written backward {1e3 * t_den:.1f} ms, autograd {1e3 * t_auto:.1f} ms "
          f"({t_auto / t_den:.1f}x)")
    report({"name": "ctc_crf", "quick": args.quick, "B": B, "T": T, "V": V, "L": L, "states": graph.num_states,
            "ctc_ms": 1e3 * t_ctc, "ctc_crf_ms": 1e3 * t_crf, "ratio": t_crf / t_ctc,
            "denominator_ms": 1e3 * t_den, "denominator_autograd_ms": 1e3 * t_auto,
            "denominator_autograd_speedup": t_auto / t_den})


if __name__ == "__main__":
    main()
