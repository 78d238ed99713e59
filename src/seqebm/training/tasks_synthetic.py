"""Tasks on synthetic data with known structure, and translation.

* :class:`OracleLMTask`: an oracle LM generates the corpus; the model is scored by NLL_test
  (its NLL of held-out oracle data: coverage) and NLL_oracle (the oracle's NLL of the model's
  samples: quality). Both per token. This is the exposure-bias benchmark of E-Forcing.
* :class:`TranslationTask`: source -> target pairs (the synthetic transduction task or users'
  parallel files) for the encoder-decoder, batched by a token budget as in fairseq.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.data.batching import Batch, ListSource, sequence_batch, token_budget_batches
from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from seqebm.eval.perplexity import corpus_nll, perplexity_metrics
from seqebm.sampling.basic import generate
from seqebm.sampling.beam import beam_search
from seqebm.sampling.sampler import sample


class _SupportMask(nn.Module):
    """Adds -inf to the logits of ``banned`` ids (tokens outside a target distribution's support)."""

    def __init__(self, model: nn.Module, banned: list[int]) -> None:
        super().__init__()
        self.model, self.banned = model, banned
        self.vocab_size, self.max_len = model.vocab_size, model.max_len

    def _mask(self, logits: Tensor) -> Tensor:
        logits = logits.clone()
        logits[..., self.banned] = float("-inf")
        return logits

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        return self._mask(self.model(tokens, **context))

    def init_state(self, batch_size: int, device: Any, **context: Tensor) -> Any:
        return self.model.init_state(batch_size, device, **context)

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        logits, state = self.model.step(tokens, state)
        return self._mask(logits), state

    def select_state(self, state: Any, index: Tensor) -> Any:
        return self.model.select_state(state, index)


class OracleLMTask:
    kind = "oracle"

    def __init__(self, oracle: Any, splits: dict[str, list[list[int]]], *, batch_size: int, seed: int,
                 eval_batch_size: int = 256, oracle_samples: int = 1000) -> None:
        self.oracle, self.splits = oracle, splits
        self.vocab_size = oracle.vocab_size
        self.fixed_length = not oracle.config.variable_length
        self.bos_id, self.pad_id = BOS_ID, PAD_ID
        self.eos_id = None if self.fixed_length else EOS_ID
        self.eval_batch_size, self.oracle_samples = eval_batch_size, oracle_samples
        self.tokenizer = None
        train = splits["train"]
        if len(train) < batch_size:
            raise ValueError(f"only {len(train)} oracle training sequences: fewer than one batch of {batch_size}")
        batches = [self._batch(train[i:i + batch_size]) for i in range(0, len(train) - batch_size + 1, batch_size)]
        self.train_source = ListSource(batches, seed=seed)

    def _batch(self, seqs: list[list[int]]) -> Batch:
        return sequence_batch(seqs, bos_id=BOS_ID, eos_id=self.eos_id, pad_id=PAD_ID)

    def eval_batches(self, split: str) -> list[Batch]:
        seqs, b = self.splits[split], self.eval_batch_size
        return [self._batch(seqs[i:i + b]) for i in range(0, len(seqs), b)]

    def _banned(self) -> list[int]:
        return [PAD_ID, BOS_ID, 3] + ([EOS_ID] if self.fixed_length else [])

    def model_samples(self, model: nn.Module, n: int, *, device: Any = "cpu", seed: int = 0) -> list[list[int]]:
        """n samples from the model, restricted to the oracle's support (special ids masked)."""
        masked = _SupportMask(model, self._banned())
        out = sample(masked, torch.full((1, 1), BOS_ID, device=device), num_samples=n,
                     max_new_tokens=self.oracle.config.length + (0 if self.fixed_length else 1),
                     eos_id=self.eos_id, generator=torch.Generator().manual_seed(seed))
        seqs = [t[:k] for t, k in zip(out.tokens.tolist(), out.lengths.tolist())]
        return [s[:-1] if s and self.eos_id is not None and s[-1] == EOS_ID else s for s in seqs]

    def evaluate(self, model: nn.Module, split: str, device: Any = "cpu") -> dict[str, float]:
        nll, tokens = corpus_nll(model, self.eval_batches(split), device)
        out = perplexity_metrics(nll, tokens)
        out["nll_test"] = out["loss"]  # per token, of held-out oracle data under the model
        if split == "test" and self.oracle_samples:
            model.eval()
            samples = self.model_samples(model, self.oracle_samples, device=device)
            out["nll_oracle"] = self.oracle.nll_per_token(samples)
        return out

    def samples(self, model: nn.Module, n: int, max_new_tokens: int = 0, *, device: Any = "cpu", seed: int = 0,
                **_: Any) -> list[str]:
        return self.oracle.as_text(self.model_samples(model, n, device=device, seed=seed))


class TranslationTask:
    """Translation: NLL/PPL on every split; on ``test`` also the decoding metrics of E-Forcing.

    ``evaluate(model, "test")`` adds (E-Forcing seed, Tab. 2–3, 5, 7, 12):

    * ``bleu_greedy`` (+ ``bleu_signature``) and, with ``beam_size > 1``, ``bleu_beam{beam_size}``;
    * ``bleu_by_length_greedy`` / ``bleu_by_length_beam{beam_size}``: BLEU per bucket of
      reference length in words, ``{"<25": .., "25-49": .., ">=50": ..}`` as in Tab. 5 (an empty
      bucket's BLEU is None);
    * ``rouge1``, ``rouge2``, ``rougeL`` and, when local WordNet data exists
      (:func:`seqebm.eval.metrics.meteor_available`), ``meteor`` of the beam hypotheses (of the
      greedy ones when ``beam_size == 1``), as in Tab. 12;
    * ``bleu_resample{k}`` for every k in ``resample_k``: Top-K energy re-sampling (App. C.1,
      Tab. 7), i.e. k samples per source from the model (temperature 1, no truncation), one
      kept by :func:`seqebm.sampling.resampling.energy_resample` with ``resample_mode``
      (``"rerank"``: lowest E-Forcing energy; ``"sample"``: SIR towards p_θ ∝ exp(−E_θ)). The
      seed's k = 0 is plain decoding, already reported by the greedy/beam keys, so k = 0 is
      skipped; k = 1 is one plain sample per source.
    """

    kind = "translation"
    length_buckets = (25, 50)  # reference words: [0, 25), [25, 50), [50, inf) (E-Forcing Tab. 5)

    def __init__(self, pairs: dict[str, list[tuple[str, str]]], tokenizer: Tokenizer, *, max_tokens: int,
                 seed: int, max_len: int, eval_max_tokens: int | None = None, beam_size: int = 5,
                 resample_k: list[int] | tuple[int, ...] = (), resample_mode: str = "rerank") -> None:
        from seqebm.sampling.resampling import MODES

        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in resample_k):
            raise ValueError(f"resample_k must hold ints >= 0, got {list(resample_k)!r}")
        if resample_mode not in MODES:
            raise ValueError(f"resample_mode must be one of {MODES}, got {resample_mode!r}")
        self.resample_k, self.resample_mode, self.seed = list(resample_k), resample_mode, seed
        self.tokenizer, self.max_len, self.beam_size = tokenizer, max_len, beam_size
        self.vocab_size = tokenizer.vocab_size
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self.pairs = pairs
        self.encoded = {s: self._encode(p) for s, p in pairs.items()}
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self._batches = {s: self._make_batches(s, max_tokens if s == "train" else (eval_max_tokens or 2 * max_tokens),
                                               world if s == "train" else 1) for s in pairs}
        self.train_source = ListSource(self._batches["train"], seed=seed)

    def _encode(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        src = self.tokenizer.encode_batch([p[0] for p in pairs])
        tgt = self.tokenizer.encode_batch([p[1] for p in pairs])
        out = []
        for i, (s, t) in enumerate(zip(src, tgt)):
            if not s:
                raise ValueError(f"source sentence {i} is empty after tokenisation: {pairs[i][0]!r}")
            if len(s) > self.max_len or len(t) + 1 > self.max_len:
                raise ValueError(f"sentence pair {i} ({len(s)} source / {len(t) + 1} target tokens) is longer "
                                 f"than the model's context max_len={self.max_len}")
            out.append((s, t))
        return out

    def _make_batches(self, split: str, max_tokens: int, multiple_of: int) -> list[Batch]:
        data = self.encoded[split]
        lengths = [max(len(s), len(t) + 1) for s, t in data]
        groups = token_budget_batches(lengths, max_tokens, multiple_of=multiple_of)
        return [sequence_batch([data[i][1] for i in g], bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                               sources=[data[i][0] for i in g]) for g in groups]

    def eval_batches(self, split: str) -> list[Batch]:
        return self._batches[split]

    @torch.no_grad()
    def translate(self, model: nn.Module, sources: list[str], *, device: Any = "cpu", batch_size: int = 64,
                  beam_size: int = 1, length_penalty: float = 1.0, num_candidates: int = 0,
                  resample_mode: str = "rerank", generator: torch.Generator | None = None) -> list[str]:
        """Greedy (``beam_size=1``) or beam-search translations of ``sources``.

        With ``num_candidates`` = k >= 1 instead: k samples per source, one kept by
        :func:`~seqebm.sampling.resampling.energy_resample` (``resample_mode``, ``generator``).
        """
        model.eval()
        out: list[str] = []
        for i in range(0, len(sources), batch_size):
            enc = self.tokenizer.encode_batch(sources[i:i + batch_size])
            batch = sequence_batch(enc, bos_id=BOS_ID, eos_id=None, sources=enc)  # only the source is used
            src, mask = batch.source.to(device), batch.source_mask.to(device)
            prefix = torch.full((src.shape[0], 1), BOS_ID, device=device)
            budget = min(self.max_len, 2 * src.shape[1] + 10)
            if num_candidates >= 1:
                from seqebm.sampling.resampling import energy_resample

                tokens, lengths, _ = energy_resample(
                    model, prefix, num_candidates=num_candidates, max_new_tokens=budget, mode=resample_mode,
                    eos_id=EOS_ID, pad_id=PAD_ID, context={"source": src, "source_mask": mask}, generator=generator,
                    max_batch_tokens=4 * batch_size * (budget + 1))
                rows = [r[:n] for r, n in zip(tokens.tolist(), lengths.tolist())]
            elif beam_size == 1:
                hyp = generate(model, prefix, budget, greedy=True, eos_id=EOS_ID, source=src, source_mask=mask)
                rows = hyp.tolist()
            else:
                res = beam_search(model, prefix, max_new_tokens=budget, beam_size=beam_size, eos_id=EOS_ID,
                                  length_penalty=length_penalty, context={"source": src, "source_mask": mask})
                rows = [r[:n] for r, n in zip(res.tokens.tolist(), res.lengths.tolist())]
            out += self.tokenizer.decode_batch([r[: r.index(EOS_ID)] if EOS_ID in r else r for r in rows])
        return out

    def evaluate(self, model: nn.Module, split: str, device: Any = "cpu") -> dict[str, Any]:
        nll, tokens = corpus_nll(model, self.eval_batches(split), device)
        out: dict[str, Any] = perplexity_metrics(nll, tokens)
        if split == "test":
            from seqebm.eval.metrics import bleu_by_length, corpus_bleu, meteor, meteor_available, rouge

            refs = [t for _, t in self.pairs[split]]
            srcs = [s for s, _ in self.pairs[split]]

            def by_length(hyps: list[str]) -> dict[str, float | None]:
                rows = bleu_by_length(hyps, refs, buckets=self.length_buckets)
                return {row["bucket"]: row["bleu"] for row in rows}

            hyps = self.translate(model, srcs, device=device)
            greedy = corpus_bleu(hyps, refs)
            out["bleu_greedy"], out["bleu_signature"] = greedy["bleu"], greedy["signature"]
            out["bleu_by_length_greedy"] = by_length(hyps)
            if self.beam_size > 1:
                hyps = self.translate(model, srcs, device=device, beam_size=self.beam_size)
                out[f"bleu_beam{self.beam_size}"] = corpus_bleu(hyps, refs)["bleu"]
                out[f"bleu_by_length_beam{self.beam_size}"] = by_length(hyps)
            out.update(rouge(hyps, refs))  # of the beam hypotheses (greedy when beam_size == 1)
            if meteor_available():
                score = meteor(hyps, refs)
                if score is not None:
                    out["meteor"] = score
            for k in self.resample_k:
                if k == 0:  # the seed's k = 0: plain decoding (bleu_greedy / bleu_beam*)
                    continue
                gen = torch.Generator().manual_seed(self.seed + k)
                hyps = self.translate(model, srcs, device=device, num_candidates=k,
                                      resample_mode=self.resample_mode, generator=gen)
                out[f"bleu_resample{k}"] = corpus_bleu(hyps, refs)["bleu"]
        return out

    def samples(self, model: nn.Module, n: int, max_new_tokens: int = 0, *, device: Any = "cpu", **_: Any) -> list[str]:
        pairs = self.pairs["test"][:n]
        hyps = self.translate(model, [s for s, _ in pairs], device=device)
        return [f"src: {s}\nref: {t}\nhyp: {h}" for (s, t), h in zip(pairs, hyps)]
