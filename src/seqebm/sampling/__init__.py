"""Sampling from autoregressive models.

* :func:`sample` (:mod:`seqebm.sampling.sampler`): batched ancestral sampling returning the exact
  proposal log q and the raw model log p per token, shared-prefix states, chunking.
* :func:`generate` (:mod:`seqebm.sampling.basic`): plain continuation / greedy decoding.
"""

from seqebm.sampling.basic import filter_logits, generate
from seqebm.sampling.sampler import SampleOutput, enumerate_proposal, inverse_cdf, proposal_log_probs, sample

__all__ = ["SampleOutput", "enumerate_proposal", "filter_logits", "generate", "inverse_cdf", "proposal_log_probs",
           "sample"]
