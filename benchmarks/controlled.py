"""MH-MLM steps/s for controlled generation: C chains as one batch vs the chains one at a time.

:func:`seqebm.sampling.controlled.mh_mlm` (monograph §4.4.2, MH within Gibbs with a masked-LM
proposal) advances all C chains together: per step one MLM call on the C masked sequences gives
every chain's proposal and its forward/reverse proposal probabilities, and one call of each expert
scores the changed proposals. The baseline is what a user gets by running the same sampler on one
chain at a time (``mh_mlm`` on a (1, T) batch, in a Python loop over chains) — same models, same
float32 weights, same number of steps.

Energy: a product of experts (Eq. 4.36) of a randomly initialised masked LM's fluency expert
(``MLMFluencyEnergy``, ``mode="masked"``: |x| MLM passes per sequence, the seed's E_mlm) and an
autoregressive LM's −log p(x) (``ARFluencyEnergy``), V = 64 tokens, T = 12 positions; the MLM
(2 layers, width 32) is also the proposal. Rate: chain-steps/s (one step = one MH proposal and
accept/reject of one chain). The loop's cost is linear in the number of chains, so it is timed on
fewer chains and reported per chain. ``ratio`` = batched / loop chain-steps per second.

    python benchmarks/controlled.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.models.experts import ARFluencyEnergy, MLMFluencyEnergy, ProductOfExperts  # noqa: E402
from seqebm.models.masked_lm import MaskedLM  # noqa: E402
from seqebm.models.transformer import TransformerLM  # noqa: E402
from seqebm.sampling.controlled import mh_mlm  # noqa: E402

VOCAB, LENGTH, BOS = 64, 12, 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    chains, loop_chains = (64, 4) if args.quick else (256, 8)
    steps = 24 if args.quick else 48
    repeats = 2 if args.quick else 3
    start = time.perf_counter()

    torch.manual_seed(0)
    mlm = MaskedLM(VOCAB, d_model=32, n_layers=2, n_heads=2, max_len=LENGTH, dropout=0.0).eval()
    lm = TransformerLM(VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=LENGTH + 1, dropout=0.0).eval()
    energy = ProductOfExperts({"mlm": (MLMFluencyEnergy(mlm, mode="masked"), 1.0),
                               "ar": (ARFluencyEnergy(lm, bos_id=BOS), 1.0)})
    x0 = torch.randint(VOCAB, (chains, LENGTH), generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in energy.parameters())
    print(f"experts: MLM fluency (masked, {sum(p.numel() for p in mlm.parameters())} params) + AR fluency "
          f"({sum(p.numel() for p in lm.parameters())} params), V={VOCAB} T={LENGTH}; "
          f"torch threads={torch.get_num_threads()}")
    evals = {}

    def run_batched():
        res = mh_mlm(energy, mlm, x0, num_steps=steps, generator=torch.Generator().manual_seed(1))
        evals["batched"] = res.energy_evals

    def run_loop():
        total = 0
        for c in range(loop_chains):
            res = mh_mlm(energy, mlm, x0[c:c + 1], num_steps=steps, generator=torch.Generator().manual_seed(1 + c))
            total += res.energy_evals
        evals["loop"] = total

    t_batched = best_time(run_batched, repeats)
    t_loop = best_time(run_loop, repeats)
    batched_rate = chains * steps / t_batched
    loop_rate = loop_chains * steps / t_loop
    ratio = batched_rate / loop_rate
    print(f"MH-MLM {steps} steps: batched {chains} chains {t_batched:.3f} s -> {batched_rate:.1f} chain-steps/s "
          f"({evals['batched']} sequences scored); loop {loop_chains} chains {t_loop:.3f} s -> {loop_rate:.1f} "
          f"chain-steps/s ({evals['loop']} scored); x{ratio:.1f}")
    print(f"(loop timed on {loop_chains} of {chains} chains; its cost is linear in chains, rates are per chain)")
    print(f"total benchmark time {time.perf_counter() - start:.1f} s")
    report({
        "name": "controlled", "ratio": ratio, "batched_chain_steps_per_s": batched_rate,
        "loop_chain_steps_per_s": loop_rate, "chains": chains, "loop_chains": loop_chains, "steps": steps,
        "batched_energy_evals": evals["batched"], "loop_energy_evals": evals["loop"], "vocab": VOCAB,
        "length": LENGTH, "expert_params": n_params, "quick": args.quick,
    })


if __name__ == "__main__":
    main()
