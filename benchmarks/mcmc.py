"""Gibbs sweeps/s and MIS proposals/s on a small sequence EBM: batched chains vs a per-chain loop.

Measures seqebm's batched MCMC samplers against the straightforward per-chain Python loop a user
would write with the same energy and proposal models (same float32 weights, ``torch.no_grad``):

* Gibbs (:func:`seqebm.sampling.mcmc.gibbs`, systematic scan): all C chains advance together and
  each site update scores the V values of the site for every chain in one energy call on C·V
  sequences. The loop visits one chain at a time and, per position, scores the V candidates of
  that chain (one energy call on (V, T)) and draws the new token with ``torch.multinomial``.
  Rate: chain-sweeps/s (one sweep = T site updates of one chain).
* MIS (:func:`seqebm.sampling.mis.metropolis_independence` with
  :func:`~seqebm.sampling.mis.autoregressive_proposal` over a 1-layer ``TransformerLM``): one
  batched ``sample`` call draws the C proposals of a step, one energy call scores them. The loop
  runs one chain at a time: ``sample(model, [[BOS]], max_new_tokens=T, num_samples=1)`` per
  proposal, energy on that one sequence, and an individual accept/reject. Rate: proposals/s
  (each chain makes 1 initial draw plus ``num_steps`` transition proposals, in both versions).

The energy is a small neural sequence EBM (defined here; seqebm has no neural sequence EBM
class): V=64 tokens, T=16 positions, p(x) ∝ exp(-E(x)) with

    E(x) = -Σ_t u[x_t] - Σ_t B[x_{t-1}, x_t] + w2·GELU(W1·GELU(Σ_t emb_t[x_t]) + b1) + b2

i.e. a log-linear unigram + bigram part plus a 2-layer width-64 MLP whose first layer is a
position-wise embedding summed over positions (a dense layer on the one-hot sequence; ~74k
parameters, ~20k FLOPs per sequence). It is cheap enough that per-call Python and dispatch
overhead dominates the per-chain loop (each loop call scores only V=64 sequences), yet not
trivial, which is the regime the batched samplers target. With a heavier energy (e.g. a width-32
Conv1d over positions, ~100k FLOPs per sequence) the loop's (V, T) calls are already
compute-bound on CPU and the Gibbs speedup fell to ~1.6x in a 32-chain trial; the MIS speedup
depends little on the energy, since its cost is dominated by the T-step proposal sampling.

``ratio`` = geometric mean of ``ratio_gibbs`` (batched / loop chain-sweeps per s) and
``ratio_mis`` (batched / loop proposals per s). The loop's cost is linear in the number of chains
(chains are independent and run one after another), so it is timed on fewer chains than the
batched run and reported as a per-chain rate; the chain counts of both are in the output.
The speedups grow with the batched chain count C (256 full, 64 with ``--quick``) until the
batched energy / proposal calls become compute-bound.

    python benchmarks/mcmc.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, report  # noqa: E402

from seqebm.models.transformer import TransformerLM  # noqa: E402
from seqebm.sampling.mcmc import gibbs  # noqa: E402
from seqebm.sampling.mis import autoregressive_proposal, metropolis_independence  # noqa: E402
from seqebm.sampling.sampler import sample  # noqa: E402

VOCAB, LENGTH, WIDTH, BOS = 64, 16, 64, 1


class SequenceEnergy(nn.Module):
    """E(x) (N,) for x (N, T): unigram + bigram log-linear terms plus an MLP on the one-hot sequence."""

    def __init__(self, vocab: int, length: int, width: int) -> None:
        super().__init__()
        self.unigram = nn.Parameter(torch.randn(vocab) * 0.5)
        self.bigram = nn.Parameter(torch.randn(vocab, vocab) * 0.5)
        # Σ_t emb_t[x_t]: a linear layer on the (T·V)-dim one-hot sequence, one table per position.
        self.embed = nn.EmbeddingBag(length * vocab, width, mode="sum")
        self.register_buffer("offset", torch.arange(length) * vocab)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        linear = self.unigram[x].sum(1) + self.bigram[x[:, :-1], x[:, 1:]].sum(1)  # (N,)
        return self.mlp(self.embed(x + self.offset)).squeeze(1) - linear


def gibbs_loop(energy: nn.Module, x0: Tensor, sweeps: int, gen: torch.Generator) -> Tensor:
    """Per-chain Gibbs (systematic scan): one energy call on the (V, T) candidates per site."""
    x = x0.clone()
    values = torch.arange(VOCAB)
    with torch.no_grad():
        for c in range(x.shape[0]):
            row = x[c]  # view: updated in place
            for _ in range(sweeps):
                for i in range(LENGTH):
                    cand = row.repeat(VOCAB, 1)  # (V, T)
                    cand[:, i] = values
                    probs = torch.softmax(-energy(cand).double(), 0)  # exact conditional p(x_i | x_\i)
                    row[i] = int(torch.multinomial(probs, 1, generator=gen))
    return x


def mis_loop(energy: nn.Module, model: nn.Module, chains: int, steps: int, gen: torch.Generator) -> Tensor:
    """Per-chain MIS: one ``sample(num_samples=1)`` proposal and one accept/reject at a time."""
    prefix = torch.full((1, 1), BOS, dtype=torch.long)
    finals = []
    with torch.no_grad():
        for _ in range(chains):
            out = sample(model, prefix, max_new_tokens=LENGTH, num_samples=1, generator=gen)
            x, log_w = out.tokens, float(-energy(out.tokens)) - float(out.log_q)
            for _ in range(steps):
                out = sample(model, prefix, max_new_tokens=LENGTH, num_samples=1, generator=gen)
                log_w_new = float(-energy(out.tokens)) - float(out.log_q)
                if math.log(float(torch.rand((), dtype=torch.float64, generator=gen))) < log_w_new - log_w:
                    x, log_w = out.tokens, log_w_new
            finals.append(x)
    return torch.cat(finals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    args = ap.parse_args()
    chains, loop_chains = (64, 4) if args.quick else (256, 16)
    sweeps, mis_steps = (2, 8) if args.quick else (4, 16)
    repeats = 2 if args.quick else 3
    start = time.perf_counter()

    torch.manual_seed(0)
    energy = SequenceEnergy(VOCAB, LENGTH, WIDTH).eval()
    lm = TransformerLM(VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=LENGTH + 1, dropout=0.0).eval()
    x0 = torch.randint(VOCAB, (chains, LENGTH), generator=torch.Generator().manual_seed(0))
    proposal = autoregressive_proposal(lm, LENGTH, bos_id=BOS)
    print(f"energy: V={VOCAB} T={LENGTH} width={WIDTH}, {sum(p.numel() for p in energy.parameters())} params; "
          f"proposal LM: {sum(p.numel() for p in lm.parameters())} params; torch threads={torch.get_num_threads()}")

    def run_gibbs_batched():
        gibbs(energy, x0, num_sweeps=sweeps, vocab_size=VOCAB, keep_samples=False,
              generator=torch.Generator().manual_seed(1))

    def run_gibbs_loop():
        gibbs_loop(energy, x0[:loop_chains], sweeps, torch.Generator().manual_seed(1))

    def run_mis_batched():
        metropolis_independence(energy, proposal, num_chains=chains, num_steps=mis_steps,
                                generator=torch.Generator().manual_seed(2))

    def run_mis_loop():
        mis_loop(energy, lm, loop_chains, mis_steps, torch.Generator().manual_seed(2))

    t_gb = best_time(run_gibbs_batched, repeats)
    t_gl = best_time(run_gibbs_loop, repeats)
    t_mb = best_time(run_mis_batched, repeats)
    t_ml = best_time(run_mis_loop, repeats)

    gibbs_batched = chains * sweeps / t_gb  # chain-sweeps/s
    gibbs_loop_rate = loop_chains * sweeps / t_gl
    mis_batched = chains * (mis_steps + 1) / t_mb  # proposals/s
    mis_loop_rate = loop_chains * (mis_steps + 1) / t_ml
    ratio_gibbs, ratio_mis = gibbs_batched / gibbs_loop_rate, mis_batched / mis_loop_rate
    print(f"Gibbs: {sweeps} sweeps; batched {chains} chains {t_gb:.3f} s -> {gibbs_batched:.1f} chain-sweeps/s; "
          f"loop {loop_chains} chains {t_gl:.3f} s -> {gibbs_loop_rate:.1f} chain-sweeps/s; x{ratio_gibbs:.1f}")
    print(f"MIS: {mis_steps} steps (+1 initial draw); batched {chains} chains {t_mb:.3f} s -> "
          f"{mis_batched:.1f} proposals/s; loop {loop_chains} chains {t_ml:.3f} s -> {mis_loop_rate:.1f} "
          f"proposals/s; x{ratio_mis:.1f}")
    print(f"(loop timed on {loop_chains} of {chains} chains; its cost is linear in chains, rates are per chain)")
    print(f"total benchmark time {time.perf_counter() - start:.1f} s")
    report({
        "name": "mcmc", "ratio": math.sqrt(ratio_gibbs * ratio_mis), "ratio_gibbs": ratio_gibbs,
        "ratio_mis": ratio_mis, "gibbs_batched_sweeps_per_s": gibbs_batched,
        "gibbs_loop_sweeps_per_s": gibbs_loop_rate, "mis_batched_proposals_per_s": mis_batched,
        "mis_loop_proposals_per_s": mis_loop_rate, "chains": chains, "loop_chains": loop_chains,
        "gibbs_sweeps": sweeps, "mis_steps": mis_steps, "vocab": VOCAB, "length": LENGTH,
        "energy_params": sum(p.numel() for p in energy.parameters()),
        "proposal_params": sum(p.numel() for p in lm.parameters()),
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
