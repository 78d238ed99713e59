"""Energy-based LM scoring speed, issue #10.

1. Rescoring throughput (hypotheses/s) of a TRF-LM (Hidden2Scalar, BiLSTM over CNN; vocabulary
   5,000) scoring an n-best set batched (64 hypotheses per call, padded + masked) vs one
   hypothesis per call, after checking that both give the same scores. ``ratio`` = batched /
   one-at-a-time throughput.
2. Electric's one-pass sentence score (monograph §3.4) vs a masked LM's pseudo-log-likelihood
   (|x| passes, batched over positions) with the same Transformer size: ``electric_speedup``.

    python benchmarks/elm.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.data.elm_text import SentenceBatch  # noqa: E402
from seqebm.models.electric import Electric  # noqa: E402
from seqebm.models.elm import TRFLM, length_prior  # noqa: E402
from seqebm.models.elm_neural import Hidden2Scalar  # noqa: E402
from seqebm.models.masked_lm import MaskedLM  # noqa: E402
from seqebm.training.elm import sentence_log_probs  # noqa: E402


def padded(rows: list[torch.Tensor]) -> SentenceBatch:
    t = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    mask = torch.arange(t)[None] < torch.tensor([len(r) for r in rows])[:, None]
    return SentenceBatch(tokens, mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, a few seconds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, m = 5000, 40
    n_hyps = 96 if args.quick else 640  # e.g. 64 utterances x 10 hypotheses
    repeats = 1 if args.quick else 3
    g = torch.Generator().manual_seed(0)
    hyps = [torch.randint(4, V, (int(torch.randint(5, 21, (1,), generator=g)),), generator=g) for _ in range(n_hyps)]
    trf = TRFLM(Hidden2Scalar(V, encoder="blstm_cnn", d_model=96, max_len=m + 1),
                length_prior([len(h) for h in hyps], m)).eval()

    def batched() -> torch.Tensor:
        return torch.cat([sentence_log_probs(trf, padded(hyps[s:s + 64])) for s in range(0, n_hyps, 64)])

    def one_by_one() -> torch.Tensor:
        return torch.cat([sentence_log_probs(trf, padded([h])) for h in hyps])

    torch.testing.assert_close(batched(), one_by_one(), rtol=1e-5, atol=1e-4)
    t_batch, t_one = best_time(batched, repeats), best_time(one_by_one, repeats)
    print(f"TRF (Hidden2Scalar blstm_cnn, V={V}) rescoring {n_hyps} hypotheses: batched {n_hyps / t_batch:.0f} hyp/s, "
          f"one at a time {n_hyps / t_one:.0f} hyp/s ({t_one / t_batch:.1f}x)")

    n_sent = 16 if args.quick else 64
    sents = padded(hyps[:n_sent])
    electric = Electric(V, d_model=128, n_layers=2, max_len=m + 1).eval()
    mlm = MaskedLM(V, d_model=128, n_layers=2, max_len=m + 1).eval()
    with torch.no_grad():
        t_el = best_time(lambda: electric.score(sents.tokens, sents.mask), repeats)
        t_pll = best_time(lambda: mlm.pseudo_log_likelihood(sents.tokens, sents.mask), repeats)
    print(f"{n_sent} sentences: Electric one-pass score {1e3 * t_el:.1f} ms, MLM pseudo-log-likelihood "
          f"{1e3 * t_pll:.1f} ms ({t_pll / t_el:.1f}x)")
    report({"name": "elm", "quick": args.quick, "hypotheses": n_hyps, "batched_hyp_per_s": n_hyps / t_batch,
            "one_by_one_hyp_per_s": n_hyps / t_one, "ratio": t_one / t_batch, "electric_ms": 1e3 * t_el,
            "mlm_pll_ms": 1e3 * t_pll, "electric_speedup": t_pll / t_el})


if __name__ == "__main__":
    main()
