"""Synthetic oracle language models with exact likelihood (the exposure-bias benchmark).

An :class:`OracleLM` is a randomly initialised, frozen LSTM or Transformer LM (SeqGAN /
LeakGAN style). It generates train/valid/test corpora and scores any sequence exactly, so
that a model trained on its samples can be evaluated with

* ``NLL_oracle`` = ``oracle.nll(model_samples)``: quality (do samples look like oracle data?);
* ``NLL_test``   = the *model's* NLL of held-out oracle data: coverage.

Notation: B batch, T length, V vocabulary (``V = 4 + n_words``), N number of sequences.

Token ids follow seqebm's text convention: ``PAD=0, BOS=1, EOS=2, UNK=3``; real words are
ids ``4 .. V-1`` and their text form is ``"w{id - 4}"`` (``"w0" .. "w{n_words-1}"``).

The oracle's next-token distribution after ``t`` generated words is::

    z = logits / temperature;  z[EOS] += eos_bias
    z[PAD] = z[BOS] = z[UNK] = -inf                         (always)
    z[EOS] = -inf   unless variable_length and min_length <= t < length
    z[words] = -inf and EOS forced (probability 1)  at t == length
    q(. | prefix) = softmax(z)

Sequences returned by :meth:`OracleLM.sample` exclude BOS and the trailing EOS. A
fixed-length oracle (``variable_length=False``) emits exactly ``length`` words; its final
forced EOS has probability 1 and is neither returned nor counted as a token.
All likelihood arithmetic is float64 (the frozen network itself runs in float64).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM

__all__ = ["OracleConfig", "OracleLM", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "NUM_SPECIAL"]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
WORD_PREFIX = "w"
CONFIG_FILE = "oracle_config.json"
WEIGHTS_FILE = "oracle.safetensors"
_FORMAT_VERSION = 1
# Default weight scale per architecture. LSTM: SeqGAN's N(0, 1). Transformer: 0.4, which gives
# a similar entropy. Measured entropy rate of the default oracle (n_words=5000, length=20,
# d_model=32): LSTM 6.30 nats, Transformer 5.94 nats, vs log V = 8.52 (ratio ~0.7).
_DEFAULT_INIT_STD = {"lstm": 1.0, "transformer": 0.4}

SequencesLike = Sequence[Sequence[int]] | Tensor


@dataclass(frozen=True)
class OracleConfig:
    """Everything needed to rebuild an oracle (weights are re-derived from ``seed``)."""

    n_words: int = 5000
    length: int = 20
    variable_length: bool = False
    min_length: int = 1
    temperature: float = 1.0
    eos_bias: float = 0.0
    seed: int = 0
    arch: str = "lstm"
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 4
    init_std: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_words, int) or self.n_words <= 0:
            raise ValueError(f"n_words must be a positive integer, got {self.n_words!r}")
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"length must be a positive integer, got {self.length!r}")
        if not isinstance(self.min_length, int) or self.min_length < 1:
            raise ValueError(f"min_length must be an integer >= 1, got {self.min_length!r}")
        if self.min_length > self.length:
            raise ValueError(
                f"min_length={self.min_length} is larger than length={self.length}"
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not math.isfinite(self.eos_bias):
            raise ValueError(f"eos_bias must be finite, got {self.eos_bias!r}")
        if self.arch not in ("lstm", "transformer"):
            raise ValueError(f"arch must be 'lstm' or 'transformer', got {self.arch!r}")
        if self.d_model <= 0 or self.n_layers <= 0:
            raise ValueError(
                f"d_model and n_layers must be positive, got {self.d_model}, {self.n_layers}"
            )
        if self.arch == "transformer" and (self.n_heads <= 0 or self.d_model % self.n_heads):
            raise ValueError(
                f"d_model={self.d_model} must be a positive multiple of n_heads={self.n_heads}"
            )
        if self.init_std is not None and not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else _DEFAULT_INIT_STD[self.arch]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OracleConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown oracle config keys: {sorted(unknown)}")
        return cls(**data)


class OracleLM(nn.Module):
    """A frozen, seeded, randomly initialised LM with exact sampling and likelihood.

    Construct with keyword arguments (see :class:`OracleConfig` for defaults)::

        oracle = OracleLM(n_words=5000, length=20, arch="lstm", seed=0)
        splits = oracle.make_splits(10_000, 1_000, 1_000, seed=1)
        nll_oracle = oracle.nll_per_token(model_samples)

    Weights: every parameter of the wrapped :class:`RNNLM` (LSTM) is drawn from
    ``N(0, init_std^2)``; for the :class:`TransformerLM` every embedding / linear weight and
    bias is, while LayerNorms keep their identity initialisation. Embeddings are untied.

    The module also satisfies seqebm's autoregressive-model protocol: ``forward`` and
    ``step`` return the oracle's *normalised log-probabilities* (float64) as logits, so any
    seqebm sampler can draw from it.
    """

    def __init__(self, config: OracleConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("pass either an OracleConfig or keyword arguments, not both")
        cfg = config if config is not None else OracleConfig(**kwargs)
        self.config = cfg
        self.n_words = cfg.n_words
        self.length = cfg.length
        self.vocab_size = NUM_SPECIAL + cfg.n_words
        self.max_len: int | None = cfg.length + 1  # BOS + length words
        with torch.random.fork_rng(devices=[]):  # module constructors must not touch global RNG
            if cfg.arch == "lstm":
                model: nn.Module = RNNLM(self.vocab_size, cell="lstm", d_model=cfg.d_model,
                                         n_layers=cfg.n_layers, dropout=0.0,
                                         max_len=self.max_len, tie_embeddings=False)
            else:
                model = TransformerLM(self.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                      n_heads=cfg.n_heads, dropout=0.0, max_len=self.max_len,
                                      tie_embeddings=False)
        model = model.double()
        gen = torch.Generator().manual_seed(cfg.seed)
        std = cfg.resolved_init_std
        with torch.no_grad():
            for module in model.modules():  # fixed traversal order -> reproducible weights
                if isinstance(module, nn.LayerNorm):
                    continue  # LayerNorm keeps weight 1, bias 0
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()
        self._score_bias: Tensor
        self.register_buffer("_score_bias", self._build_score_bias(), persistent=False)

    # ------------------------------------------------------------------ distribution
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "OracleLM":
        """The oracle is frozen: it stays in eval mode whatever ``mode`` is."""
        super().train(False)
        return self

    def _build_score_bias(self) -> Tensor:
        """Additive (length + 1, V) float64 table: ``eos_bias`` and the ``-inf`` support masks.

        Row ``t`` applies after ``t`` generated words (see the module docstring).
        """
        cfg = self.config
        t = torch.arange(cfg.length + 1).unsqueeze(1)  # (T+1, 1)
        ids = torch.arange(self.vocab_size).unsqueeze(0)  # (1, V)
        words = (ids >= NUM_SPECIAL) & (t < cfg.length)
        eos_ok = t == cfg.length
        if cfg.variable_length:
            eos_ok = eos_ok | ((t >= cfg.min_length) & (t < cfg.length))
        allowed = words | ((ids == EOS_ID) & eos_ok)
        bias = torch.zeros(cfg.length + 1, self.vocab_size, dtype=torch.float64)
        bias[:, EOS_ID] = cfg.eos_bias
        return bias.masked_fill(~allowed, -math.inf)

    def _scores(self, logits: Tensor, start: int) -> Tensor:
        """Raw network logits (B, S, V) at positions ``start..`` -> unnormalised oracle scores."""
        stop = start + logits.shape[1]
        if stop > self._score_bias.shape[0]:
            raise ValueError(f"position {stop - 1} is past the oracle's length {self.length}")
        z = logits.double()
        z = z / self.config.temperature if self.config.temperature != 1.0 else z.clone()
        return z.add_(self._score_bias[start:stop])

    def _normalise(self, logits: Tensor, start: int) -> Tensor:
        """Raw network logits (B, S, V) at positions ``start..`` -> oracle log-probs (float64)."""
        return F.log_softmax(self._scores(logits, start), dim=-1)

    @torch.no_grad()
    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        """``tokens`` (B, T) starting with BOS -> oracle log-probs (B, T, V), float64."""
        return self._normalise(self.model(tokens), 0)

    def init_state(self, batch_size: int, device: torch.device | str, **context: Tensor) -> dict:
        return {"inner": self.model.init_state(batch_size, device), "pos": 0}

    @torch.no_grad()
    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        """Feed ``tokens`` (B, S); return oracle log-probs (B, S, V) and the new state."""
        logits, inner = self.model.step(tokens, state["inner"])
        out = self._normalise(logits, state["pos"])
        return out, {"inner": inner, "pos": state["pos"] + tokens.shape[1]}

    def select_state(self, state: dict, index: Tensor) -> dict:
        return {"inner": self.model.select_state(state["inner"], index), "pos": state["pos"]}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_padded(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int = 1024
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` sequences: word ids (N, length) padded with PAD, and lengths (N,).

        Batched through ``step`` with the recurrent / KV state; rows that emit EOS are
        dropped from the running batch. ``generator`` (on any device) makes draws
        reproducible; ``None`` uses the global RNG. Returned tensors live on the CPU.
        """
        if n < 0 or batch_size <= 0:
            raise ValueError(f"need n >= 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        words = torch.full((n, self.length), PAD_ID, dtype=torch.long)
        lengths = torch.full((n,), self.length, dtype=torch.long)
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            w, ln = self._sample_batch(hi - lo, generator)
            words[lo:hi], lengths[lo:hi] = w, ln
        return words, lengths

    def _sample_batch(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        dev = self.device
        words = torch.full((b, self.length), PAD_ID, dtype=torch.long, device=dev)
        lengths = torch.full((b,), self.length, dtype=torch.long, device=dev)
        active = torch.arange(b, device=dev)  # (A,) rows still generating
        state = self.init_state(b, dev)
        cur = torch.full((b, 1), BOS_ID, dtype=torch.long, device=dev)
        for t in range(self.length):
            logits, inner = self.model.step(cur, state["inner"])
            state = {"inner": inner, "pos": t + 1}
            probs = F.softmax(self._scores(logits[:, 0:1], t)[:, 0], dim=-1)  # (A, V)
            nxt = _sample_categorical(probs, generator)  # (A,)
            done = nxt == EOS_ID
            words[active, t] = torch.where(done, PAD_ID, nxt)
            if bool(done.any()):
                lengths[active[done]] = t
                keep = (~done).nonzero(as_tuple=True)[0]
                if keep.numel() == 0:
                    break
                active, nxt = active[keep], nxt[keep]
                state = self.select_state(state, keep)
            cur = nxt.unsqueeze(1)
        return words.cpu(), lengths.cpu()

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int = 1024
    ) -> list[list[int]]:
        """Draw ``n`` sequences as lists of word ids (no BOS, no EOS)."""
        words, lengths = self.sample_padded(n, generator=generator, batch_size=batch_size)
        return [row[:ln].tolist() for row, ln in zip(words, lengths.tolist())]

    def make_splits(
        self, n_train: int, n_valid: int, n_test: int, seed: int
    ) -> dict[str, list[list[int]]]:
        """Independent oracle samples for ``train`` / ``valid`` / ``test`` (seeded)."""
        for name, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        gen = torch.Generator().manual_seed(seed)
        return {name: self.sample(k, generator=gen)
                for name, k in (("train", n_train), ("valid", n_valid), ("test", n_test))}

    # ------------------------------------------------------------------ likelihood
    def _as_padded(self, sequences: SequencesLike, lengths: Tensor | Sequence[int] | None
                   ) -> tuple[Tensor, Tensor]:
        if isinstance(sequences, Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"sequences must have shape (N, T), got {tuple(sequences.shape)}")
            seqs = sequences.long().cpu()
            if lengths is None:  # up to the first PAD or EOS
                stop = (seqs == PAD_ID) | (seqs == EOS_ID)
                pos = torch.arange(seqs.shape[1]).expand_as(seqs)
                lens = torch.where(stop, pos, seqs.shape[1]).min(1).values if seqs.shape[1] \
                    else torch.zeros(seqs.shape[0], dtype=torch.long)
            else:
                lens = torch.as_tensor(lengths, dtype=torch.long).cpu()
                if lens.shape != (seqs.shape[0],) or bool((lens < 0).any()) \
                        or bool((lens > seqs.shape[1]).any()):
                    raise ValueError("lengths must be (N,) with 0 <= lengths <= sequences.shape[1]")
        else:
            if lengths is not None:
                raise ValueError("lengths is only accepted with a padded tensor of sequences")
            lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)
            seqs = torch.full((len(lens), int(lens.max()) if len(lens) else 0), PAD_ID,
                              dtype=torch.long)
            for i, s in enumerate(sequences):
                if len(s):
                    seqs[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask = torch.arange(seqs.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
        if seqs.numel() and bool(((seqs < 0) | (seqs >= self.vocab_size))[mask].any()):
            raise ValueError(f"sequences contain ids outside [0, {self.vocab_size})")
        return seqs, lens

    @torch.no_grad()
    def log_prob(
        self,
        sequences: SequencesLike,
        lengths: Tensor | Sequence[int] | None = None,
        *,
        batch_size: int = 512,
    ) -> Tensor:
        """Exact ``log q(x)`` (N,) float64 of word-id sequences (no BOS, no trailing EOS).

        ``sequences`` is a list of id lists, or a padded tensor (N, T) with ``lengths`` (N,)
        (default: up to the first PAD or EOS). For a variable-length oracle the EOS
        termination probability is included. Sequences outside the support (wrong length,
        special ids inside) get ``-inf``. Ids outside ``[0, V)`` raise ValueError.
        """
        seqs, lens = self._as_padded(sequences, lengths)
        n, cfg = lens.shape[0], self.config
        out = torch.full((n,), -math.inf, dtype=torch.float64)
        if cfg.variable_length:
            valid = (lens >= cfg.min_length) & (lens <= cfg.length)
        else:
            valid = lens == cfg.length
        idx = valid.nonzero(as_tuple=True)[0]
        idx = idx[torch.argsort(lens[idx], stable=True)]  # similar lengths share a batch
        dev = self.device
        for lo in range(0, idx.numel(), batch_size):
            rows = idx[lo: lo + batch_size]
            ln = lens[rows].to(dev)
            t_max = int(ln.max())
            w = seqs[rows, :t_max].to(dev)  # (B, T)
            # positions 0..t_in-1 are scored; position == length (forced EOS) costs nothing
            t_in = min(t_max + 1, cfg.length)
            inputs = torch.cat([torch.full_like(w[:, :1], BOS_ID), w], 1)[:, :t_in]
            logp = self(inputs)  # (B, t_in, V)
            target = torch.cat([w, torch.full_like(w[:, :1], EOS_ID)], 1)[:, :t_in]
            pos = torch.arange(t_in, device=dev).unsqueeze(0)
            target = torch.where(pos == ln.unsqueeze(1), EOS_ID, target)
            used = pos <= ln.unsqueeze(1) if cfg.variable_length else pos < ln.unsqueeze(1)
            tok = logp.gather(2, target.unsqueeze(2)).squeeze(2)
            out[rows] = torch.where(used, tok, 0.0).sum(1).cpu()
        return out

    def _n_tokens(self, sequences: SequencesLike, lengths: Tensor | Sequence[int] | None) -> int:
        _, lens = self._as_padded(sequences, lengths)
        return int(lens.sum()) + (lens.numel() if self.config.variable_length else 0)

    def nll(self, sequences: SequencesLike, lengths: Tensor | Sequence[int] | None = None) -> float:
        """Mean negative log-likelihood *per sequence* (nats): NLL_oracle of ``sequences``."""
        lp = self.log_prob(sequences, lengths)
        if lp.numel() == 0:
            raise ValueError("nll of an empty set of sequences")
        return float(-lp.mean())

    def nll_per_token(
        self, sequences: SequencesLike, lengths: Tensor | Sequence[int] | None = None
    ) -> float:
        """Total NLL / number of tokens (nats). Tokens = words, plus one EOS per sequence
        for a variable-length oracle (the fixed oracle's forced end is free and not counted)."""
        lp = self.log_prob(sequences, lengths)
        n_tok = self._n_tokens(sequences, lengths)
        if n_tok == 0:
            raise ValueError("nll_per_token of sequences without tokens")
        return float(-lp.sum() / n_tok)

    def entropy_per_token(self, n: int = 2000, *, seed: int = 0) -> float:
        """Monte-Carlo estimate of the oracle's entropy rate: NLL per token of its own samples."""
        return self.nll_per_token(self.sample(n, generator=torch.Generator().manual_seed(seed)))

    # ------------------------------------------------------------------ text view
    def as_text(self, sequences: SequencesLike) -> list[str]:
        """Word-id sequences -> space-separated strings ``"w17 w3 ..."``."""
        seqs, lens = self._as_padded(sequences, None)
        out = []
        for row, ln in zip(seqs.tolist(), lens.tolist()):
            bad = [i for i in row[:ln] if i < NUM_SPECIAL]
            if bad:
                raise ValueError(f"special ids {bad} have no text form")
            out.append(" ".join(f"{WORD_PREFIX}{i - NUM_SPECIAL}" for i in row[:ln]))
        return out

    def from_text(self, texts: Sequence[str], *, strict: bool = True) -> list[list[int]]:
        """Inverse of :meth:`as_text`. Unknown words raise ValueError (``strict``) or map to
        UNK, which the oracle scores as impossible (``log_prob = -inf``)."""
        out = []
        for text in texts:
            ids = []
            for tok in text.split():
                idx = _parse_word(tok, self.n_words)
                if idx is None:
                    if strict:
                        raise ValueError(
                            f"{tok!r} is not an oracle word (expected {WORD_PREFIX}0.."
                            f"{WORD_PREFIX}{self.n_words - 1})"
                        )
                    ids.append(UNK_ID)
                else:
                    ids.append(idx + NUM_SPECIAL)
            out.append(ids)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``oracle_config.json`` and ``oracle.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": _FORMAT_VERSION, "kind": "oracle_lm", "config": self.config.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(path / WEIGHTS_FILE))
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: torch.device | str = "cpu") -> "OracleLM":
        """Rebuild an oracle saved with :meth:`save` (weights restored exactly)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} does not contain {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("kind") != "oracle_lm" or meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{path / CONFIG_FILE} is not an oracle_lm v{_FORMAT_VERSION} file")
        oracle = cls(OracleConfig.from_dict(meta["config"]))
        oracle.model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        return oracle.to(map_location)


def _sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs`` (A, V) by inverse CDF; never returns a zero-mass id."""
    cdf = probs.cumsum(-1)
    gen_dev = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype, device=gen_dev)
    u = u.to(probs.device) * cdf[:, -1:]
    # right=True: first id whose cdf exceeds u, so ids with zero mass (flat cdf) are skipped
    idx = torch.searchsorted(cdf, u, right=True)[:, 0]
    overflow = idx >= probs.shape[1]  # u rounded up to the total mass
    if bool(overflow.any()):
        last = torch.searchsorted(cdf, cdf[:, -1:], right=False)[:, 0]
        idx = torch.where(overflow, last, idx)
    return idx


def _parse_word(tok: str, n_words: int) -> int | None:
    if not tok.startswith(WORD_PREFIX):
        return None
    digits = tok[len(WORD_PREFIX):]
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        return None
    idx = int(digits)
    return idx if idx < n_words else None
