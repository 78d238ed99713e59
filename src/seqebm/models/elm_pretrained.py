"""SumTargetLogit over a pretrained Hugging Face causal LM, for word-level energy-based LMs.

Notation: B sentences, T words (padded), L sub-word tokens of the HF tokenizer (padded), V_hf the
HF vocabulary.

:class:`~seqebm.models.elm_neural.SumTargetLogit` (monograph §3.3.1, Eq. 3.12) needs an
autoregressive model over the ELM's own word ids. A pretrained causal LM (GPT-2, SmolLM2, ...)
has its own sub-word vocabulary, so :class:`HFSumTargetLogit` bridges the two: the word ids are
turned back into text (words joined by spaces; ``<unk>`` becomes the tokenizer's unknown token,
the specials ``<pad>``/``<s>``/``</s>`` are dropped), re-tokenised, a BOS token is put in front,
and the potential is

    U(x) = Σ_{j=1..L} z(t_{<j})[t_j]

over the sub-word tokens t of the text: the raw target logits, no softmax (with
``normalize=True`` the log-probabilities, i.e. log q(text) under the LM as a prefix). The
model and tokenizer are loaded from local folders only (no hub access).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.models.elm_neural import check_potential_input

__all__ = ["HFSumTargetLogit", "ids_to_texts"]


def ids_to_texts(words: Sequence[str], tokens: Tensor, mask: Tensor, *, drop_ids: frozenset[int],
                 unk_id: int, unk_token: str | None) -> list[str]:
    """Word-id rows -> space-joined strings (specials in ``drop_ids`` removed, ``<unk>`` -> ``unk_token``)."""
    unk = unk_token or words[unk_id]
    return [" ".join(unk if i == unk_id else words[i] for i in row[m].tolist() if i not in drop_ids)
            for row, m in zip(tokens.cpu(), mask.cpu())]


class HFSumTargetLogit(nn.Module):
    """U(x) = Σ raw target logits of a pretrained HF causal LM over the re-tokenised sentence (Eq. 3.12).

    Args:
        words: the ELM's vocabulary, id -> word (e.g. ``WordVocabulary.tokens``).
        model: an ``AutoModelForCausalLM`` instance or a local folder holding one.
        tokenizer: a HF tokenizer instance or a local folder (default: the model's folder).
        normalize: sum log-softmax values instead of raw logits.
        bos_id: the token put before every sentence (default: the tokenizer's BOS, else its EOS).
        drop_ids, unk_id: word ids left out / shown as the tokenizer's unknown token.
        freeze: keep the LM's weights fixed (``requires_grad=False``, eval mode).
    """

    def __init__(self, words: Sequence[str], model: Any, tokenizer: Any = None, *, normalize: bool = False,
                 bos_id: int | None = None, drop_ids: Sequence[int] = (0, 1, 2), unk_id: int = 3,
                 freeze: bool = True) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, Path)):
            if not Path(model).is_dir():
                raise FileNotFoundError(f"no local HF model folder at {model}")
            tokenizer = tokenizer if tokenizer is not None else model
            model = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        if tokenizer is None:
            raise ValueError("a tokenizer (instance or folder) is required with a model instance")
        if not 0 <= unk_id < len(words):
            raise ValueError(f"unk_id={unk_id} is outside the vocabulary of {len(words)} words")
        bos = bos_id if bos_id is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                                 else tokenizer.eos_token_id)
        if bos is None or not 0 <= int(bos) < int(model.config.vocab_size):
            raise ValueError(f"no usable BOS token id (got {bos}); pass bos_id")
        self.words, self.vocab_size, self.unk_id = list(words), len(words), unk_id
        self.drop_ids = frozenset(int(i) for i in drop_ids)
        self.lm, self.tokenizer, self.normalize, self.bos_id, self.freeze = model, tokenizer, normalize, int(bos), freeze
        if freeze:
            self.lm.requires_grad_(False)
            self.lm.eval()

    def train(self, mode: bool = True) -> "HFSumTargetLogit":
        super().train(mode)
        if self.freeze:
            self.lm.eval()
        return self

    def texts(self, tokens: Tensor, mask: Tensor | None = None) -> list[str]:
        mask = check_potential_input(tokens, mask, self.vocab_size)
        return ids_to_texts(self.words, tokens, mask, drop_ids=self.drop_ids, unk_id=self.unk_id,
                            unk_token=self.tokenizer.unk_token)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        texts = self.texts(tokens, mask)
        ids = [[self.bos_id] + self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        length = max(len(r) for r in ids)
        dev = next(self.lm.parameters()).device
        inp = torch.zeros(len(ids), length, dtype=torch.long, device=dev)
        att = torch.zeros(len(ids), length, dtype=torch.long, device=dev)
        for i, r in enumerate(ids):
            inp[i, : len(r)] = torch.tensor(r, device=dev)
            att[i, : len(r)] = 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            logits = self.lm(input_ids=inp, attention_mask=att).logits.float()  # (B, L, V_hf)
        if self.normalize:
            logits = torch.log_softmax(logits, -1)
        picked = logits[:, :-1].gather(-1, inp[:, 1:, None]).squeeze(-1)  # (B, L-1): token j+1 given t_<=j
        return (picked * att[:, 1:]).sum(1).to(tokens.device)
