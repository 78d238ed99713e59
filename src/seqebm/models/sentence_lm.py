"""A sentence-level distribution from any autoregressive LM: lengths 1..m, exact log q, sampling.

Notation: B sentences, T padded length, m the maximum length, V vocabulary (word ids).

Energy-based LMs need an autoregressive q over *whole sentences* as the noise of NCE/DNCE, the
proposal of Metropolis independence sampling and the base of a residual ELM (monograph §3.3.3–
§3.3.4). :class:`BoundedSentenceLM` wraps a seqebm AR model (``tokens[:, 0]`` = ⟨s⟩, see
:mod:`seqebm.models.base`) whose vocabulary is the ELM's word vocabulary and defines

    q(x) = Π_{i=1..l} q(x_i | ⟨s⟩ x_{<i}) · [l < m] q(⟨/s⟩ | ⟨s⟩ x),

where every conditional is the LM's softmax with the ``banned_ids`` (padding, ⟨s⟩) removed, ⟨/s⟩
is removed at the first step (no empty sentence) and the sentence stops after m words (⟨/s⟩ is
then implied). These are exactly the probabilities :meth:`sample` draws with, so ``log_prob`` of
a sample equals the ``log_q`` returned with it, and q sums to one over all sentences of 1..m
words (tested by enumeration).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seqebm.models.elm import check_sentences

__all__ = ["BoundedSentenceLM"]


class BoundedSentenceLM(nn.Module):
    """Sentences of 1..``max_length`` words from an autoregressive LM (see the module docstring).

    Args:
        lm: a seqebm autoregressive model over the word vocabulary (``forward``, ``init_state``,
            ``step``, ``select_state``).
        max_length: m, the longest sentence.
        bos_id, eos_id: ⟨s⟩ fed first, ⟨/s⟩ ending sentences shorter than m.
        banned_ids: ids the LM may never emit (default padding 0 and ⟨s⟩ 1).
    """

    def __init__(self, lm: nn.Module, *, max_length: int, bos_id: int = 1, eos_id: int = 2,
                 banned_ids: Sequence[int] = (0, 1)) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        v = int(lm.vocab_size)
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id), *(("banned id", b) for b in banned_ids)):
            if not 0 <= int(i) < v:
                raise ValueError(f"{name}={i} is outside the LM's vocabulary [0, {v})")
        if eos_id in banned_ids:
            raise ValueError(f"eos_id={eos_id} cannot be banned")
        if getattr(lm, "max_len", None) is not None and lm.max_len < max_length + 1:
            raise ValueError(f"the LM's context max_len={lm.max_len} cannot hold ⟨s⟩ + max_length={max_length} words")
        self.lm, self.max_length, self.bos_id, self.eos_id = lm, max_length, bos_id, eos_id
        self.vocab_size = v
        ban = torch.zeros(v, dtype=torch.bool)
        ban[list(banned_ids)] = True
        self.register_buffer("banned", ban, persistent=False)
        # the same ban as an additive bias: one add instead of a masked fill over (.., V) per step
        self.register_buffer("ban_bias", torch.zeros(v).masked_fill(ban, float("-inf")), persistent=False)
        if bool(ban.all() | (ban.sum() >= v - 1)):
            raise ValueError("banned_ids leave no word to emit")

    def _log_probs(self, logits: Tensor, first: Tensor) -> Tensor:
        """Masked, renormalised log q over the vocabulary; ``first`` (..,) marks step-0 positions."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) + self.ban_bias
        if bool(first.any()):  # no ⟨/s⟩ before the first word: only that column changes
            logits[..., self.eos_id] = logits[..., self.eos_id].masked_fill(first, float("-inf"))
        return torch.log_softmax(logits, -1)

    def log_prob(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log q(x) of padded sentences (B, T), (B,) float32 with autograd (for MLE of the LM)."""
        lengths = check_sentences(tokens, mask, max_length=self.max_length, vocab_size=self.vocab_size,
                                  who="BoundedSentenceLM")
        b, t = tokens.shape
        words = tokens.masked_fill(~mask, self.eos_id).long()
        if bool(self.banned[words].any()):
            raise ValueError("sentences contain banned ids (padding or ⟨s⟩ inside the mask)")
        inputs = torch.cat([torch.full((b, 1), self.bos_id, dtype=torch.long, device=tokens.device), words], 1)
        pos = torch.arange(t + 1, device=tokens.device)
        lp = self._log_probs(self.lm(inputs), (pos == 0).expand(b, t + 1))  # (B, T+1, V)
        # position j scores word j+1 for j < l and ⟨/s⟩ at j = l (only when l < m)
        target = torch.cat([words, torch.full((b, 1), self.eos_id, dtype=torch.long, device=tokens.device)], 1)
        target[torch.arange(b, device=tokens.device), lengths] = self.eos_id
        picked = lp.gather(-1, target[..., None]).squeeze(-1)  # (B, T+1)
        keep = (pos[None] < lengths[:, None]) | ((pos[None] == lengths[:, None]) & (lengths[:, None] < self.max_length))
        return picked.masked_fill(~keep, 0.0).sum(-1)

    def mle_loss(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Mean negative log-likelihood per sentence (a scalar to minimise)."""
        return -self.log_prob(tokens, mask).mean()

    def next_word_log_probs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log g(w | x): the LM's next-word distribution after each sentence with ⟨/s⟩ and the banned
        ids removed, (B, V) — the proposal for growing a sentence by one word (TRF local jumps)."""
        lengths = check_sentences(tokens, mask, vocab_size=self.vocab_size, who="next_word_log_probs")
        b = tokens.shape[0]
        words = tokens.masked_fill(~mask, self.eos_id).long()
        inputs = torch.cat([torch.full((b, 1), self.bos_id, dtype=torch.long, device=tokens.device), words], 1)
        logits = self.lm(inputs)[torch.arange(b, device=tokens.device), lengths]  # (B, V)
        return self._log_probs(logits, torch.ones(b, dtype=torch.bool, device=tokens.device))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *, device: torch.device | str | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """n sentences: tokens (n, m) padded with 0, mask (n, m), log q (n,) float64 (exact, see module doc)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = torch.device(device) if device is not None else self.banned.device
        m = self.max_length
        tokens = torch.zeros(n, m, dtype=torch.long, device=dev)
        log_q = torch.zeros(n, dtype=torch.float64, device=dev)
        lengths = torch.zeros(n, dtype=torch.long, device=dev)
        rows = torch.arange(n, device=dev)  # the unfinished rows; their LM state is kept compact
        state = self.lm.init_state(n, dev)
        last = torch.full((n, 1), self.bos_id, dtype=torch.long, device=dev)
        for step in range(m):
            logits, state = self.lm.step(last, state)
            lp = self._log_probs(logits[:, -1], torch.full((len(rows),), step == 0, device=dev))  # (R, V)
            # inverse-CDF draw (float64; u in (0, 1] so a zero-probability id is never hit);
            # ~10x faster than torch.multinomial on CPU for V in the thousands
            u = 1.0 - torch.rand(len(rows), 1, generator=generator, dtype=torch.float64,
                                 device=generator.device if generator is not None else "cpu").to(dev)
            cdf = lp.exp().double().cumsum(-1)  # (R, V); exp in the LM's precision, the running sum in float64
            nxt = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_max(self.vocab_size - 1)  # (R,)
            log_q[rows] += lp.gather(-1, nxt[:, None]).squeeze(-1).double()
            word = nxt != self.eos_id
            tokens[rows[word], step] = nxt[word]
            lengths[rows[word]] += 1
            if not bool(word.any()):
                break
            keep = word.nonzero().squeeze(-1)
            rows, last = rows[keep], nxt[keep, None]
            state = self.lm.select_state(state, keep)
        mask = torch.arange(m, device=dev)[None] < lengths[:, None]
        return tokens, mask, log_q
