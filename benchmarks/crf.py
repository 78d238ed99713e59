"""Linear-chain CRF: seqebm.structured.LinearChainCRF vs pytorch-crf (``torchcrf.CRF``), issue #8.

B=64 sequences of T=100 tokens, K=20 tags, float32, same parameters in both; full-length and
ragged batches (lengths uniform in [1, T], one full row). Timed: log-likelihood forward +
backward (mean reduction, gradients w.r.t. emissions and CRF parameters) and Viterbi decoding.
Results are checked equal before timing (log-likelihood, emission gradients, decoded tags).
Each timing is taken at 1 thread and at the default thread count.

``fwd_bwd_ratio`` / ``viterbi_ratio`` = pytorch-crf time / seqebm time at 1 thread, the worse
(min) of full and ragged; ``ratio`` = min of the two. The same at the default thread count is
reported as ``*_ratio_default_threads`` with the 1-minute load average: on a shared machine
whose cores are busy, multi-threaded timings of many small ops mostly measure contention.

    python benchmarks/crf.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.structured import LinearChainCRF  # noqa: E402

try:
    from torchcrf import CRF  # pytorch-crf: the baseline (pip install pytorch-crf, in the dev extra)
except ImportError:  # pragma: no cover
    sys.exit("benchmarks/crf.py needs pytorch-crf: pip install pytorch-crf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="where received a uint8")  # inside pytorch-crf
    B, T, K = (32, 50, 20) if args.quick else (64, 100, 20)
    repeats = 2 if args.quick else 10
    default_threads = torch.get_num_threads()

    torch.manual_seed(0)
    ref = CRF(K, batch_first=True)
    ours = LinearChainCRF(K)
    with torch.no_grad():
        ours.transitions.copy_(ref.transitions)
        ours.start.copy_(ref.start_transitions)
        ours.end.copy_(ref.end_transitions)
    g = torch.Generator().manual_seed(0)
    em = torch.randn(B, T, K, generator=g) * 2
    tags = torch.randint(0, K, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    masks = {"full": torch.ones(B, T, dtype=torch.bool), "ragged": torch.arange(T) < lengths[:, None]}

    def fwd_bwd_ref(mask):
        e = em.clone().requires_grad_(True)
        ref.zero_grad()
        (-ref(e, tags, mask, reduction="mean")).backward()
        return e.grad

    def fwd_bwd_ours(mask):
        e = em.clone().requires_grad_(True)
        ours.zero_grad()
        ours.nll(e, tags, mask, reduction="mean").backward()
        return e.grad

    print(f"B={B} T={T} K={K} float32, default threads={default_threads}")
    for kind, mask in masks.items():  # equal results first
        llh_ref = ref(em, tags, mask, reduction="none")
        llh_ours = ours.log_likelihood(em, tags, mask, reduction="none")
        torch.testing.assert_close(llh_ours, llh_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(fwd_bwd_ours(mask), fwd_bwd_ref(mask), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.transitions.grad, ref.transitions.grad, rtol=1e-4, atol=1e-5)
        dec_ref = ref.decode(em, mask)
        dec_ours = [row[row >= 0].tolist() for row in ours.viterbi(em, mask)[0]]
        assert dec_ours == dec_ref, f"{kind}: Viterbi paths differ"
        print(f"{kind:6s}: log-likelihood max |diff| {(llh_ours - llh_ref).abs().max().item():.2e}, "
              f"emission grads close, Viterbi paths equal ({sum(map(len, dec_ref))} tags)")

    result = {"name": "crf", "B": B, "T": T, "K": K, "quick": args.quick}
    fb, vt = {}, {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for kind, mask in masks.items():
            t_ref = best_time(lambda: fwd_bwd_ref(mask), repeats)
            t_ours = best_time(lambda: fwd_bwd_ours(mask), repeats)
            with torch.no_grad():
                v_ref = best_time(lambda: ref.decode(em, mask), repeats)
                v_ours = best_time(lambda: ours.viterbi(em, mask), repeats)
            fb.setdefault(threads, []).append(t_ref / t_ours)
            vt.setdefault(threads, []).append(v_ref / v_ours)
            tag = f"{kind}_{threads}t"
            result.update({f"fwd_bwd_ms_torchcrf_{tag}": 1e3 * t_ref, f"fwd_bwd_ms_seqebm_{tag}": 1e3 * t_ours,
                           f"viterbi_ms_torchcrf_{tag}": 1e3 * v_ref, f"viterbi_ms_seqebm_{tag}": 1e3 * v_ours})
            print(f"threads={threads} {kind:6s}: fwd+bwd torchcrf {1e3 * t_ref:7.2f} ms, seqebm "
                  f"{1e3 * t_ours:6.2f} ms ({t_ref / t_ours:5.1f}x) | Viterbi torchcrf {1e3 * v_ref:7.2f} ms, "
                  f"seqebm {1e3 * v_ours:6.2f} ms ({v_ref / v_ours:5.1f}x)")
    torch.set_num_threads(default_threads)
    result.update({"fwd_bwd_ratio": min(fb[1]), "viterbi_ratio": min(vt[1]), "ratio": min(fb[1] + vt[1]),
                   "fwd_bwd_ratio_default_threads": min(fb[default_threads]),
                   "viterbi_ratio_default_threads": min(vt[default_threads]),
                   "default_threads": default_threads, "load_average_1min": os.getloadavg()[0]})
    print(f"worse of full/ragged at 1 thread: fwd+bwd {result['fwd_bwd_ratio']:.1f}x, Viterbi "
          f"{result['viterbi_ratio']:.1f}x; at {default_threads} threads: {min(fb[default_threads]):.1f}x, "
          f"{min(vt[default_threads]):.1f}x (load average {result['load_average_1min']:.1f})")
    report(result)


if __name__ == "__main__":
    main()
