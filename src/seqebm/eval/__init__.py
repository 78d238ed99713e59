"""Evaluation: exact perplexity, bits/dim, text metrics, plots and reports."""

from seqebm.eval.metrics import (
    bleu_by_length,
    corpus_bleu,
    meteor,
    meteor_available,
    rouge,
    self_bleu,
    text_metrics,
    unique_ngram_fraction,
    unique_ngrams,
)
from seqebm.eval.perplexity import bits_per_dim, corpus_nll, perplexity_metrics

__all__ = [
    "bits_per_dim", "bleu_by_length", "corpus_bleu", "corpus_nll", "meteor", "meteor_available",
    "perplexity_metrics", "rouge", "self_bleu", "text_metrics", "unique_ngram_fraction", "unique_ngrams",
]
