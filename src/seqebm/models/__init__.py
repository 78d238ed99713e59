"""Autoregressive models behind one protocol (see :mod:`seqebm.models.base`)."""

from __future__ import annotations

from torch import nn

from seqebm.models.base import AutoregressiveModel, check_tokens, select_batch_rows
from seqebm.models.classic import RBM, IsingModel
from seqebm.models.pixelcnn import GatedPixelCNN, PixelCNN
from seqebm.models.rnn import RNNLM
from seqebm.models.seq2seq import EncoderDecoderTransformer
from seqebm.models.transformer import TransformerLM

ARCHITECTURES = ("transformer", "lstm", "gru", "seq2seq", "pixelcnn", "gated_pixelcnn", "hf")

__all__ = [
    "ARCHITECTURES", "AutoregressiveModel", "EncoderDecoderTransformer", "GatedPixelCNN", "IsingModel", "PixelCNN",
    "RBM", "RNNLM", "TransformerLM", "build_model", "check_tokens", "select_batch_rows",
]


def build_model(arch: str, vocab_size: int, *, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                d_ff: int | None = None, dropout: float = 0.1, max_len: int = 512, hidden: int | None = None,
                channels: int = 64, tie_embeddings: bool = True, hf_path: str | None = None,
                pad_id: int = 0) -> nn.Module:
    """Construct a model by architecture name with flat keyword arguments."""
    if arch == "transformer":
        return TransformerLM(vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff,
                             dropout=dropout, max_len=max_len, tie_embeddings=tie_embeddings)
    if arch in ("lstm", "gru"):
        return RNNLM(vocab_size, cell=arch, d_model=d_model, hidden=hidden, n_layers=n_layers, dropout=dropout,
                     max_len=max_len, tie_embeddings=tie_embeddings)
    if arch == "seq2seq":
        return EncoderDecoderTransformer(vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                         d_ff=d_ff, dropout=dropout, max_len=max_len, pad_id=pad_id)
    if arch in ("pixelcnn", "gated_pixelcnn"):
        cls = PixelCNN if arch == "pixelcnn" else GatedPixelCNN
        side = int(round(max_len ** 0.5))
        return cls(levels=vocab_size, side=side, channels=channels, n_layers=n_layers, dropout=dropout)
    if arch == "hf":
        from seqebm.models.hf import HFCausalLM

        if not hf_path:
            raise ValueError("model.arch=hf needs model.hf_path (a local folder with config.json)")
        return HFCausalLM.from_pretrained(hf_path)
    raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


# Experts for controlled generation (monograph §4.4.2, Eq. 4.36); lexical experts in seqebm.models.experts_text.
from seqebm.models.experts import (ARFluencyEnergy, AttributeEnergy, MLMFluencyEnergy, ProductOfExperts,  # noqa: E402
                                   build_product_of_experts)

__all__ += ["ARFluencyEnergy", "AttributeEnergy", "MLMFluencyEnergy", "ProductOfExperts", "build_product_of_experts"]
