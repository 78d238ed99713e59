"""seqebm: energy-based sequence modeling in PyTorch.

Notation used across the library (shape comments):
    B batch, T sequence length, V vocabulary, S source length, K samples per context, D model width.
"""

__version__ = "0.1.0"
