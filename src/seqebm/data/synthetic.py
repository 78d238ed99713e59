"""Synthetic benchmarks with exact likelihood: oracle LMs and a rule-based translation task.

Notation: B batch, T length, V vocabulary, N number of sequences.

* :class:`OracleLM` (:mod:`seqebm.data.synthetic_oracle`): a frozen, seeded, randomly
  initialised LSTM/Transformer LM that generates corpora and returns exact ``log q(x)``,
  for the exposure-bias benchmark (``NLL_oracle`` of model samples, ``NLL_test`` of
  held-out oracle data).
* :class:`SyntheticTranslation` (:mod:`seqebm.data.synthetic_translation`): oracle source
  sentences (lengths ~5-60) and a deterministic target language with local reordering,
  word substitution and a long-range agreement.
"""

from seqebm.data.synthetic_oracle import (
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL,
    PAD_ID,
    UNK_ID,
    OracleConfig,
    OracleLM,
)
from seqebm.data.synthetic_translation import WORD_CLASSES, SyntheticTranslation

__all__ = [
    "OracleConfig",
    "OracleLM",
    "SyntheticTranslation",
    "WORD_CLASSES",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "NUM_SPECIAL",
]
