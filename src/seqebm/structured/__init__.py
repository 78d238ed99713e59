"""Structured prediction layers with exact inference (linear-chain CRF, monograph §4.1)."""

from seqebm.structured.crf import NEG, LinearChainCRF, bio_constraints

__all__ = ["LinearChainCRF", "bio_constraints", "NEG"]
