"""Evaluation: exact perplexity, bits/dim, oracle NLLs, plots and reports."""

from seqebm.eval.perplexity import corpus_nll, perplexity_metrics

__all__ = ["corpus_nll", "perplexity_metrics"]
