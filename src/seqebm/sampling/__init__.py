"""Sampling from autoregressive models.

* :func:`sample` (:mod:`seqebm.sampling.sampler`): batched ancestral sampling returning the exact
  proposal log q and the raw model log p per token, shared-prefix states, chunking.
* :func:`beam_search` (:mod:`seqebm.sampling.beam`): beam search with length normalisation.
* :func:`sequence_log_prob` (:mod:`seqebm.sampling.scoring`): batched scoring with padding.
* :func:`metropolis_hastings`, :func:`gibbs` (:mod:`seqebm.sampling.mcmc`): MCMC for sequence EBMs.
* :func:`metropolis_independence` (:mod:`seqebm.sampling.mis`): MIS with an autoregressive proposal.
* :func:`generate` (:mod:`seqebm.sampling.basic`): plain continuation / greedy decoding.
"""

from seqebm.sampling.basic import filter_logits, generate
from seqebm.sampling.beam import BeamOutput, beam_search
from seqebm.sampling.mcmc import MCMCResult, gibbs, metropolis_hastings
from seqebm.sampling.mis import autoregressive_proposal, metropolis_independence
from seqebm.sampling.sampler import SampleOutput, enumerate_proposal, inverse_cdf, proposal_log_probs, sample
from seqebm.sampling.scoring import sequence_log_prob, token_log_probs

__all__ = ["BeamOutput", "MCMCResult", "SampleOutput", "autoregressive_proposal", "gibbs", "metropolis_hastings",
           "metropolis_independence", "beam_search", "enumerate_proposal", "filter_logits", "generate",
           "inverse_cdf", "proposal_log_probs", "sample", "sequence_log_prob", "token_log_probs"]
