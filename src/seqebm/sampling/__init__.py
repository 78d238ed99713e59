"""Sampling from autoregressive models (basic ancestral sampling; see :mod:`seqebm.sampling.basic`)."""

from seqebm.sampling.basic import filter_logits, generate

__all__ = ["filter_logits", "generate"]
