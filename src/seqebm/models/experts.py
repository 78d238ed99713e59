"""Experts for controlled generation: energies that each score one property of a token sequence.

Notation: B batch (chains), T padded length, V the shared vocabulary (the sampler's), D embedding
width, C classes, K experts, P prompt length.

Monograph §4.4.2 ("Controlled text generation from pre-trained language models", the
mix-and-match LM of its ref. [105]): a product of black-box experts is an energy-based model whose
energy is the weighted sum of the experts' energies,

    E_M&M(x) = Σ_i α_i E_i(x)                                                     (Eq. 4.36)

and p(x) ∝ exp(−E_M&M(x)). Every expert here is an ``nn.Module`` with

* ``forward(tokens (B, T) long, mask (B, T) bool | None) -> (B,)``: the energy of each right-padded
  row (lower = better); ``mask`` is True at real tokens (default: all True);
* optionally ``soft_forward(probs (B, T, V), mask) -> (B,)``: the same energy on a *soft sequence*
  (one distribution over V per position), differentiable in ``probs``, for COLD decoding
  (§4.4.2, Eq. 4.37). Every relaxation here equals ``forward`` at one-hot ``probs``.

The experts in this file need a model; the lexical and similarity experts (Hamming distance,
BERTScore-style fuzzy similarity, keyword coverage) and the re-tokenising adapters for experts
with their own tokenizer are in :mod:`seqebm.models.experts_text`.

* :class:`MLMFluencyEnergy`: E_mlm = −(summed masked-LM logits) (§4.4.2, first expert; seqebm's
  :class:`~seqebm.models.elm_neural.SumMaskedLogit` / ``SumTokenLogit``, monograph Eq. 3.13/3.14).
* :class:`ARFluencyEnergy`: −log p_LM(x | BOS, prompt) under any seqebm AR model or
  :class:`~seqebm.models.hf.HFCausalLM`.
* :class:`AttributeEnergy`: E_disc = −log p(attribute | x) from a classifier's logits.
* :class:`ProductOfExperts`: Eq. 4.36 with the per-expert breakdown.

Experts can be built from text specs (``"mlm:1.0"``, ``"disc:positive:2.0"``, ``"hamming:0.5"``)
with :func:`build_product_of_experts` and a registry of named factories (:func:`register_expert`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.models.elm_neural import SumMaskedLogit, SumTokenLogit, check_potential_input

__all__ = [
    "ARFluencyEnergy", "AttributeEnergy", "EXPERT_FACTORIES", "Expert", "ExpertSpec", "MLMFluencyEnergy",
    "ProductOfExperts", "build_product_of_experts", "check_soft_probs", "find_input_embedding",
    "parse_expert_spec", "register_expert", "soft_token_inputs",
]


# ---------------------------------------------------------------------------------- helpers
def check_soft_probs(probs: Tensor, mask: Tensor | None, vocab_size: int) -> Tensor:
    """Validate a soft sequence ``probs (B, T, V)``; returns the (B, T) bool mask (default all True).

    Raises ``TypeError`` for a non-float tensor and ``ValueError`` naming the shapes when the last
    dimension is not ``vocab_size`` or the mask is malformed (see ``check_potential_input``).
    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        got = probs.dtype if isinstance(probs, Tensor) else type(probs).__name__
        raise TypeError(f"probs must be a floating-point tensor (B, T, V), got {got}")
    if probs.dim() != 3 or probs.shape[2] != vocab_size or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape (B, T>=1, V={vocab_size}), got {tuple(probs.shape)}")
    ids = torch.zeros(probs.shape[:2], dtype=torch.long, device=probs.device)
    return check_potential_input(ids, mask, vocab_size)


def find_input_embedding(model: nn.Module) -> nn.Embedding:
    """The token-embedding table a model reads its ids through.

    Looked up in order: the model itself (an ``nn.Embedding``), ``get_input_embeddings()`` (Hugging
    Face models), ``model.model.get_input_embeddings()`` (:class:`~seqebm.models.hf.HFCausalLM`),
    and the attributes ``embed`` / ``embedding`` / ``encoder.embed`` (seqebm models).

    Raises:
        TypeError: no ``nn.Embedding`` was found.
    """
    if isinstance(model, nn.Embedding):
        return model
    candidates: list[Any] = []
    for owner in (model, getattr(model, "model", None)):
        get = getattr(owner, "get_input_embeddings", None)
        if callable(get):
            try:
                candidates.append(get())
            except (NotImplementedError, AttributeError):
                pass
    encoder = getattr(model, "encoder", None)
    candidates += [getattr(model, "embed", None), getattr(model, "embedding", None), getattr(encoder, "embed", None)]
    for emb in candidates:
        if isinstance(emb, nn.Embedding):
            return emb
    raise TypeError(f"{type(model).__name__} has no token embedding (nn.Embedding) that soft inputs can replace; "
                    "give it get_input_embeddings() or an 'embed' attribute")


@contextmanager
def soft_token_inputs(model: nn.Module, probs: Tensor) -> Iterator[None]:
    """Inside the block, ``model``'s token embedding returns E[e] = probs @ W instead of W[ids].

    ``probs`` is (B, T, V) with V <= the table's rows (extra rows such as ``[MASK]`` get mass 0).
    Call the model on dummy ids of shape (B, T): every layer after the embedding (positions,
    attention, heads) then sees the expected embedding of each soft token (COLD's continuous
    relaxation, monograph §4.4.2, Eq. 4.37). Gradients flow back to ``probs``.
    """
    emb = find_input_embedding(model)
    v = probs.shape[-1]
    if v > emb.num_embeddings:
        raise ValueError(f"probs have V={v} entries but the embedding has only {emb.num_embeddings} rows")

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if output.shape[:-1] != probs.shape[:-1]:
            raise ValueError(f"soft inputs {tuple(probs.shape[:-1])} do not match the embedded ids "
                             f"{tuple(output.shape[:-1])}")
        return probs.to(output.dtype) @ module.weight[:v]  # (B, T, D)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _int_attr(value: object, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TypeError(f"{who}: pass {name} (positive int) or use a model with an int {name} attribute, "
                        f"got {value!r}")
    return value


class Expert(nn.Module):
    """Base of the experts: validates inputs; subclasses implement ``_energy`` (and ``_soft_energy``).

    ``forward(tokens (B, T), mask (B, T) | None) -> (B,)`` energies; ``soft_forward(probs (B, T, V),
    mask) -> (B,)`` where a relaxation exists (:attr:`supports_soft`).
    """

    vocab_size: int
    max_len: int | None = None

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_potential_input(tokens, mask, self.vocab_size, self.max_len)
        if tokens.shape[0] == 0:
            return torch.zeros(0, device=tokens.device)
        return self._energy(tokens.long(), mask)

    def soft_forward(self, probs: Tensor, mask: Tensor | None = None) -> Tensor:
        """The energy of a soft sequence ``probs (B, T, V)`` (rows of distributions over V)."""
        if not self.supports_soft:
            raise TypeError(f"{type(self).__name__} has no continuous relaxation (soft_forward); "
                            "COLD decoding needs experts that support one")
        mask = check_soft_probs(probs, mask, self.vocab_size)
        return self._soft_energy(probs, mask)

    @property
    def supports_soft(self) -> bool:
        return type(self)._soft_energy is not Expert._soft_energy

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- model experts
class MLMFluencyEnergy(Expert):
    """E_mlm(x) = −Σ_i g(mask(x, i))[i][x_i] (monograph §4.4.2, first expert; Eq. 3.13).

    The negative of seqebm's masked-LM potentials: ``mode="masked"`` wraps
    :class:`~seqebm.models.elm_neural.SumMaskedLogit` (one MLM pass per real position, the
    expert of §4.4.2), ``mode="token"`` wraps :class:`~seqebm.models.elm_neural.SumTokenLogit`
    (Eq. 3.14, one pass on the unmasked sentence: cheaper, a different energy).

    Args:
        mlm: ``mlm(tokens (B, T), mask (B, T)) -> logits (B, T, >=V)`` with an int ``mask_id``
            (e.g. :class:`~seqebm.models.masked_lm.MaskedLM`). Call ``eval()`` first.
        vocab_size: V (default ``mlm.vocab_size``); max_batch: masked copies per MLM call.
    """

    MODES = ("masked", "token")

    def __init__(self, mlm: nn.Module, *, mode: str = "masked", vocab_size: int | None = None,
                 max_batch: int = 256) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.potential = (SumMaskedLogit(mlm, vocab_size=vocab_size, max_batch=max_batch) if mode == "masked"
                          else SumTokenLogit(mlm, vocab_size=vocab_size))
        self.vocab_size, self.max_len = self.potential.vocab_size, self.potential.max_len

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return -self.potential(tokens, mask)


class ARFluencyEnergy(Expert):
    """E_AR(x) = −log p_LM(x_1..x_l | BOS, prompt) = −Σ_t log p_LM(x_t | BOS, prompt, x_<t).

    ``lm`` is any model of the :mod:`seqebm.models.base` protocol (``forward(tokens) -> logits``),
    e.g. :class:`~seqebm.models.TransformerLM` or :class:`~seqebm.models.hf.HFCausalLM` (when the
    LM has its own tokenizer, wrap this expert in :class:`~seqebm.models.experts_text.Retokenized`).
    Padding contributes nothing; the result is float64.

    Soft relaxation (COLD's fluency constraint, monograph §4.4.2): the LM reads the expected
    embeddings of the soft prefix and the energy is the expected negative log-likelihood
    −Σ_t Σ_v probs_t(v) log p_LM(v | BOS, prompt, probs_<t), exactly E_AR at one-hot inputs.

    Args:
        lm: the autoregressive LM (call ``eval()`` first).
        bos_id: BOS prepended to every row (default ``lm.bos_id``).
        prompt: optional 1-D LongTensor fed after BOS and not scored (prompted generation).
    """

    def __init__(self, lm: nn.Module, *, bos_id: int | None = None, prompt: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(lm, nn.Module):
            raise TypeError(f"lm must be an nn.Module of the seqebm AR protocol, got {type(lm).__name__}")
        self.lm = lm
        self.vocab_size = _int_attr(getattr(lm, "vocab_size", None), "vocab_size", "ARFluencyEnergy")
        bos_id = getattr(lm, "bos_id", None) if bos_id is None else bos_id
        if isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"bos_id must be an int in [0, {self.vocab_size}), got {bos_id!r}")
        self.bos_id = bos_id
        prompt = torch.zeros(0, dtype=torch.long) if prompt is None else prompt
        if not isinstance(prompt, Tensor) or prompt.dim() != 1 or prompt.is_floating_point():
            raise ValueError(f"prompt must be a 1-D integer tensor, got {prompt!r}")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size):
            raise ValueError(f"prompt ids must lie in [0, {self.vocab_size}), got {prompt.tolist()}")
        self.register_buffer("prompt", prompt.long(), persistent=False)
        lm_max = getattr(lm, "max_len", None)
        self.max_len = None if lm_max is None else lm_max - prompt.numel()  # BOS + prompt + x[:-1]

    def _head(self, b: int, device: torch.device) -> Tensor:
        bos = torch.full((1,), self.bos_id, dtype=torch.long, device=device)
        return torch.cat([bos, self.prompt.to(device)]).expand(b, -1)  # (B, 1 + P)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        from seqebm.sampling.scoring import sequence_log_prob

        head = self._head(tokens.shape[0], tokens.device)
        rows = torch.cat([head, tokens], 1)  # (B, 1 + P + T)
        lengths = head.shape[1] + mask.sum(1)
        return -sequence_log_prob(self.lm, rows, prefix_len=head.shape[1], lengths=lengths)

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        b, t, v = probs.shape
        head = nn.functional.one_hot(self._head(b, probs.device), v).to(probs.dtype)  # (B, 1 + P, V)
        inputs = torch.cat([head, probs[:, :-1]], 1)  # (B, P + T, V)
        dummy = torch.zeros(inputs.shape[:2], dtype=torch.long, device=probs.device)
        with soft_token_inputs(self.lm, inputs):
            logits = self.lm(dummy)  # (B, P + T, V)
        log_p = torch.log_softmax(logits[:, self.prompt.numel():].to(probs.dtype), -1)  # (B, T, V)
        nll = -(probs * log_p).sum(-1)  # (B, T)
        return torch.where(mask, nll, nll.new_zeros(())).sum(1)


class AttributeEnergy(Expert):
    """E_disc(x) = −log p(c* | x) = −log_softmax(classifier(x))[c*] (monograph §4.4.2, E_disc).

    Args:
        classifier: module mapping ids ``(B, T)`` (and the bool mask, see ``pass_mask``) to logits
            ``(B, C)`` or to an object with ``.logits`` (Hugging Face sequence classifiers).
        target: the wanted class c* in ``[0, C)``.
        vocab_size: V (default ``classifier.vocab_size``).
        pass_mask: call ``classifier(tokens, mask)`` (True), ``classifier(tokens)`` (False) or
            decide from the signature (None: True when ``forward`` takes two positional arguments).

    Soft relaxation: the classifier reads the expected embeddings of the soft tokens
    (:func:`soft_token_inputs`); available when it has a findable ``nn.Embedding``.
    """

    def __init__(self, classifier: nn.Module, target: int, *, vocab_size: int | None = None,
                 pass_mask: bool | None = None) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module returning logits (B, C), got {type(classifier).__name__}")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index >= 0, got {target!r}")
        self.classifier, self.target = classifier, target
        self.vocab_size = _int_attr(getattr(classifier, "vocab_size", None) if vocab_size is None else vocab_size,
                                    "vocab_size", "AttributeEnergy")
        if pass_mask is None:
            params = [p for p in inspect.signature(classifier.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            pass_mask = len(params) >= 2
        self.pass_mask = bool(pass_mask)

    def _logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if not self.pass_mask:
            out = self.classifier(tokens)
        elif hasattr(self.classifier, "config"):  # Hugging Face: integer attention mask by keyword
            out = self.classifier(input_ids=tokens, attention_mask=mask.long())
        else:
            out = self.classifier(tokens, mask)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != tokens.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape ({tokens.shape[0]}, C), got {got}")
        if self.target >= logits.shape[1]:
            raise ValueError(f"target class {self.target} is outside the classifier's {logits.shape[1]} classes")
        return logits

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return -torch.log_softmax(self._logits(tokens, mask).double(), -1)[:, self.target]

    @property
    def supports_soft(self) -> bool:
        try:
            find_input_embedding(self.classifier)
        except TypeError:
            return False
        return True

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        dummy = torch.zeros(probs.shape[:2], dtype=torch.long, device=probs.device)
        with soft_token_inputs(self.classifier, probs):
            logits = self._logits(dummy, mask)
        return -torch.log_softmax(logits.to(probs.dtype), -1)[:, self.target]


# ---------------------------------------------------------------------------------- product of experts
def _check_alpha(name: str, alpha: object) -> float:
    if isinstance(alpha, Tensor) and alpha.numel() == 1 and alpha.dim() == 0:
        alpha = float(alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        shape = f" of shape {tuple(alpha.shape)}" if isinstance(alpha, Tensor) else ""
        raise ValueError(f"weight of expert {name!r} must be one finite number >= 0, got "
                         f"{type(alpha).__name__}{shape}: {alpha!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"weight of expert {name!r} must be finite and >= 0, got {alpha!r}")
    return float(alpha)


def _call_expert(expert: Callable, name: str, x: Tensor, mask: Tensor | None, soft: bool) -> Tensor:
    fn = getattr(expert, "soft_forward") if soft else expert
    e = fn(x) if mask is None or bool(mask.all()) else fn(x, mask)  # energies of one argument work unpadded
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"expert {name!r} must return energies of shape ({x.shape[0]},), got {got}")
    return e.to(torch.float64)


class ProductOfExperts(nn.Module):
    """E(x) = Σ_i α_i E_i(x), a mix-and-match energy (monograph §4.4.2, Eq. 4.36).

    Args:
        experts: ``{name: (expert, α)}``; each expert maps ``(tokens (B, T), mask)`` to ``(B,)``
            energies (modules are registered as submodules; plain callables are allowed and are
            called without a mask when there is no padding); α finite and >= 0.

    ``forward`` returns the total (B,) in float64; :meth:`energies` the unweighted E_i per name
    (:meth:`breakdown` both);
    :meth:`combine` re-weights cached energies (annealing α without re-scoring). All experts share
    one vocabulary (``vocab_size`` is their common value when they declare one).
    """

    def __init__(self, experts: Mapping[str, tuple[Callable, float]]) -> None:
        super().__init__()
        if not isinstance(experts, Mapping) or not experts:
            raise ValueError(f"experts must be a non-empty mapping name -> (expert, alpha), got {experts!r}")
        self.names: list[str] = []
        self.alphas: dict[str, float] = {}
        self.modules_by_name = nn.ModuleDict()
        self._callables: dict[str, Callable] = {}
        vocab = set()
        for name, pair in experts.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"expert names must be non-empty strings without '.', got {name!r}")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"expert {name!r} must be given as (expert, alpha), got {pair!r}")
            expert, alpha = pair
            if not callable(expert):
                raise TypeError(f"expert {name!r} must be callable (tokens, mask) -> (B,), got {type(expert).__name__}")
            self.alphas[name] = _check_alpha(name, alpha)
            self.names.append(name)
            if isinstance(expert, nn.Module):
                self.modules_by_name[name] = expert
            else:
                self._callables[name] = expert
            v = getattr(expert, "vocab_size", None)
            if isinstance(v, int):
                vocab.add(v)
        if len(vocab) > 1:
            raise ValueError(f"experts disagree on the vocabulary size: {sorted(vocab)}; use one shared token space "
                             "(wrap experts with their own tokenizer in experts_text.Retokenized)")
        self.vocab_size: int | None = vocab.pop() if vocab else None

    def expert(self, name: str) -> Callable:
        if name in self._callables:
            return self._callables[name]
        if name in self.modules_by_name:
            return self.modules_by_name[name]
        raise KeyError(f"no expert {name!r}; experts: {', '.join(self.names)}")

    def alpha_vector(self, overrides: Mapping[str, float] | None = None) -> Tensor:
        """α as a float64 (K,) vector in :attr:`names` order, with optional per-name overrides."""
        alphas = dict(self.alphas)
        for name, a in (overrides or {}).items():
            if name not in alphas:
                raise ValueError(f"unknown expert {name!r} in the weight overrides; experts: {', '.join(self.names)}")
            alphas[name] = _check_alpha(name, a)
        return torch.tensor([alphas[n] for n in self.names], dtype=torch.float64)

    def energies(self, tokens: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted E_i(x) per expert name, each (B,) float64."""
        return {n: _call_expert(self.expert(n), n, tokens, mask, soft=False) for n in self.names}

    def soft_energies(self, probs: Tensor, mask: Tensor | None = None, *,
                      names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """E_i(probs) per expert for a soft sequence (B, T, V); default: the experts with α > 0."""
        names = [n for n in self.names if self.alphas[n] > 0] if names is None else list(names)
        missing = [n for n in names if not getattr(self.expert(n), "supports_soft", False)]
        if missing:
            raise TypeError(f"experts {missing} have no continuous relaxation (soft_forward); drop them or set "
                            "their weight to 0 for COLD decoding")
        return {n: _call_expert(self.expert(n), n, probs, mask, soft=True) for n in names}

    def combine(self, parts: Mapping[str, Tensor] | Tensor, overrides: Mapping[str, float] | None = None) -> Tensor:
        """Σ_i α_i E_i from cached energies: a dict of (B,) or a (B, K) tensor in :attr:`names` order."""
        alpha = self.alpha_vector(overrides)
        if isinstance(parts, Mapping):
            return sum(alpha[self.names.index(n)].item() * e.double() for n, e in parts.items())
        return parts.double() @ alpha.to(parts.device)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.combine(self.energies(tokens, mask))

    def breakdown(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total (B,), {name: E_i (B,)})``: the energy and its unweighted per-expert parts."""
        parts = self.energies(tokens, mask)
        return self.combine(parts), parts

    def soft_forward(self, probs: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.combine(self.soft_energies(probs, mask))

    @property
    def supports_soft(self) -> bool:
        return all(getattr(self.expert(n), "supports_soft", False) for n in self.names if self.alphas[n] > 0)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: α={a:g}" for n, a in self.alphas.items())


# ---------------------------------------------------------------------------------- specs and registry
#: ``factory(args, resources) -> expert``: ``args`` are the spec's fields between name and weight.
ExpertFactory = Callable[[Sequence[str], Mapping[str, Any]], Callable]
#: name -> (factory, one-line usage); extend with :func:`register_expert`.
EXPERT_FACTORIES: dict[str, tuple[ExpertFactory, str]] = {}


@dataclass(frozen=True)
class ExpertSpec:
    """A parsed ``name[:arg...]:weight`` spec; ``key`` (the spec without its weight) names the expert."""

    name: str
    args: tuple[str, ...]
    alpha: float

    @property
    def key(self) -> str:
        return ":".join((self.name, *self.args))


def register_expert(name: str, factory: ExpertFactory, *, usage: str = "", overwrite: bool = False) -> None:
    """Add a named expert factory to :data:`EXPERT_FACTORIES` (a CLI builds experts from specs)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"expert names must be identifiers, got {name!r}")
    if name in EXPERT_FACTORIES and not overwrite:
        raise ValueError(f"expert {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(factory):
        raise TypeError(f"factory must be callable (args, resources) -> expert, got {type(factory).__name__}")
    EXPERT_FACTORIES[name] = (factory, usage)


def _known() -> str:
    return "; ".join(f"{n} ({u})" if u else n for n, (_, u) in sorted(EXPERT_FACTORIES.items()))


def parse_expert_spec(spec: str) -> ExpertSpec:
    """Parse ``"name[:arg...]:weight"`` (e.g. ``"mlm:1.0"``, ``"disc:positive:2.0"``).

    Raises ``ValueError`` for an unknown name (listing the registered ones), a missing, non-finite
    or negative weight.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an expert spec must be a non-empty string 'name[:arg...]:weight', got {spec!r}")
    fields = [f.strip() for f in spec.strip().split(":")]
    name = fields[0]
    if name not in EXPERT_FACTORIES:
        raise ValueError(f"unknown expert {name!r} in spec {spec!r}; known experts: {_known()}")
    if len(fields) < 2:
        raise ValueError(f"expert spec {spec!r} has no weight; write it as '{spec}:1.0'")
    try:
        alpha = float(fields[-1])
    except ValueError:
        raise ValueError(f"expert spec {spec!r} must end with a numeric weight, got {fields[-1]!r}") from None
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"the weight in expert spec {spec!r} must be finite and >= 0, got {alpha}")
    return ExpertSpec(name, tuple(fields[1:-1]), alpha)


def build_product_of_experts(specs: str | Sequence[str], resources: Mapping[str, Any]) -> ProductOfExperts:
    """A :class:`ProductOfExperts` from specs (a list, or one comma-separated string).

    ``resources`` holds what the factories need, by key: ``mlm``, ``lm`` (+ ``bos_id``,
    ``prompt``), ``classifier`` (+ ``labels``: class names, list or name -> index), ``source``,
    ``encoder``, ``keywords``, ``embedding``, ``vocab_size``. A missing key is a ``ValueError``
    naming it and the spec.
    """
    items = [s for s in specs.split(",") if s.strip()] if isinstance(specs, str) else list(specs)
    if not items:
        raise ValueError("no expert specs given")
    experts: dict[str, tuple[Callable, float]] = {}
    for item in items:
        spec = parse_expert_spec(item)
        if spec.key in experts:
            raise ValueError(f"expert {spec.key!r} is given twice")
        factory, _ = EXPERT_FACTORIES[spec.name]
        experts[spec.key] = (factory(spec.args, resources), spec.alpha)
    return ProductOfExperts(experts)


def _need(resources: Mapping[str, Any], key: str, name: str) -> Any:
    if key not in resources or resources[key] is None:
        raise ValueError(f"expert {name!r} needs resources[{key!r}]; given keys: {sorted(resources)}")
    return resources[key]


def _max_args(args: Sequence[str], n: int, name: str) -> None:
    if len(args) > n:
        raise ValueError(f"expert {name!r} takes at most {n} argument(s) before the weight, got {list(args)}")


def _mlm_factory(args: Sequence[str], res: Mapping[str, Any]) -> Callable:
    _max_args(args, 1, "mlm")
    return MLMFluencyEnergy(_need(res, "mlm", "mlm"), mode=args[0] if args else "masked",
                            vocab_size=res.get("vocab_size"))


def _ar_factory(args: Sequence[str], res: Mapping[str, Any]) -> Callable:
    _max_args(args, 0, "ar")
    return ARFluencyEnergy(_need(res, "lm", "ar"), bos_id=res.get("bos_id"), prompt=res.get("prompt"))


def _disc_factory(args: Sequence[str], res: Mapping[str, Any]) -> Callable:
    if len(args) != 1:
        raise ValueError(f"expert 'disc' needs one attribute argument (class name or index), e.g. "
                         f"'disc:positive:2.0', got {list(args)}")
    labels, label = res.get("labels"), args[0]
    if isinstance(labels, Mapping) and label in labels:
        target = int(labels[label])
    elif isinstance(labels, Sequence) and not isinstance(labels, str) and label in labels:
        target = list(labels).index(label)
    elif label.isdigit():
        target = int(label)
    else:
        raise ValueError(f"unknown attribute {label!r} for expert 'disc'; labels: {labels!r}")
    return AttributeEnergy(_need(res, "classifier", "disc"), target, vocab_size=res.get("vocab_size"))


def _text_factory(kind: str) -> ExpertFactory:
    def factory(args: Sequence[str], res: Mapping[str, Any]) -> Callable:
        from seqebm.models import experts_text as et

        vocab = _need(res, "vocab_size", kind)
        if kind == "hamming":
            _max_args(args, 0, kind)
            return et.HammingEnergy(_need(res, "source", kind), vocab_size=vocab)
        if kind == "fuzzy":
            _max_args(args, 1, kind)
            return et.FuzzySimilarityEnergy(_need(res, "encoder", kind), _need(res, "source", kind),
                                            vocab_size=vocab, score=args[0] if args else "f1")
        _max_args(args, 1, kind)
        return et.KeywordEnergy(_need(res, "keywords", kind), vocab_size=vocab, mode=args[0] if args else "hard",
                                embedding=res.get("embedding"))
    return factory


register_expert("mlm", _mlm_factory, usage="mlm[:masked|token]:w, needs mlm")
register_expert("ar", _ar_factory, usage="ar:w, needs lm [bos_id, prompt]")
register_expert("disc", _disc_factory, usage="disc:LABEL:w, needs classifier [labels]")
register_expert("hamming", _text_factory("hamming"), usage="hamming:w, needs source, vocab_size")
register_expert("fuzzy", _text_factory("fuzzy"), usage="fuzzy[:f1|recall|precision]:w, needs encoder, source")
register_expert("keywords", _text_factory("keywords"), usage="keywords[:hard|soft]:w, needs keywords, vocab_size")
