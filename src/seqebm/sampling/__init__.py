"""Sampling from autoregressive models and energy-based models.

Autoregressive models:

* :func:`sample` (:mod:`seqebm.sampling.sampler`): batched ancestral sampling returning the exact
  proposal log q and the raw model log p per token, shared-prefix states, chunking.
* :func:`beam_search` (:mod:`seqebm.sampling.beam`): beam search with length normalisation.
* :func:`sequence_log_prob` (:mod:`seqebm.sampling.scoring`): batched scoring with padding.
* :func:`generate` (:mod:`seqebm.sampling.basic`): plain continuation / greedy decoding.

Energy-based models p(x) ∝ exp(−E(x)) (monograph §2.3.1), all chains as one batch:

* :func:`metropolis_hastings`, :func:`gibbs` (:mod:`seqebm.sampling.mcmc`): token sequences.
* :func:`metropolis_independence` (:mod:`seqebm.sampling.mis`): MIS with an autoregressive proposal.
* :func:`langevin` (ULA / MALA), :func:`sgld` (:mod:`seqebm.sampling.langevin_dynamics`) and
  :func:`hmc` (:mod:`seqebm.sampling.hamiltonian`): continuous states.
* :class:`ReplayBuffer`, :class:`PersistentChains` (:mod:`seqebm.sampling.replay`): persistent chains.
* :mod:`seqebm.sampling.kernels`: the samplers as transition kernels for CD/PCD.

Resampling (:mod:`seqebm.sampling.resampling`): :func:`importance_resample` (SIR / rerank, shared
by E-Forcing's energy resampling and residual-EBM joint sampling), :func:`energy_resample`.
"""

from seqebm.sampling.basic import filter_logits, generate
from seqebm.sampling.beam import BeamOutput, beam_search
from seqebm.sampling.hamiltonian import hmc
from seqebm.sampling.kernels import (block_gibbs_kernel, gibbs_kernel, hmc_kernel, langevin_kernel,
                                     metropolis_kernel)
from seqebm.sampling.langevin_dynamics import ContinuousMCMCResult, langevin, polynomial_step_sizes, sgld
from seqebm.sampling.mcmc import MCMCResult, gibbs, metropolis_hastings
from seqebm.sampling.mis import autoregressive_proposal, metropolis_independence
from seqebm.sampling.replay import PersistentChains, ReplayBuffer
from seqebm.sampling.resampling import (ResampleResult, autoregressive_sequence_energy, energy_resample,
                                        gather_candidates, importance_resample, joint_sample)
from seqebm.sampling.sampler import SampleOutput, enumerate_proposal, inverse_cdf, proposal_log_probs, sample
from seqebm.sampling.scoring import sequence_log_prob, token_log_probs

__all__ = ["BeamOutput", "ContinuousMCMCResult", "MCMCResult", "PersistentChains", "ReplayBuffer", "ResampleResult",
           "SampleOutput", "autoregressive_sequence_energy", "energy_resample", "gather_candidates",
           "importance_resample", "joint_sample",
           "autoregressive_proposal", "beam_search", "block_gibbs_kernel", "enumerate_proposal", "filter_logits",
           "generate", "gibbs", "gibbs_kernel", "hmc", "hmc_kernel", "inverse_cdf", "langevin", "langevin_kernel",
           "metropolis_hastings", "metropolis_independence", "metropolis_kernel", "polynomial_step_sizes",
           "proposal_log_probs", "sample", "sequence_log_prob", "sgld", "token_log_probs"]

# Controlled generation from products of experts (monograph §4.4.2): MH-MLM, COLD, SNIS.
from seqebm.sampling.controlled import (ColdResult, MHMLMResult, SNISResult, cold_decode,  # noqa: E402
                                        guided_discretize, mh_mlm, snis_generate)

__all__ += ["ColdResult", "MHMLMResult", "SNISResult", "cold_decode", "guided_discretize", "mh_mlm", "snis_generate"]
