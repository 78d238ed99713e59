"""The residual-EBM task: (prefix, continuation) windows of a text corpus, offline LM negatives,
conditional-NCE batches and joint-model perplexity bounds (residual-EBM seed §3–4).

Notation: P prefix tokens, C continuation tokens, n negatives per prefix.

Every split's documents are tokenised with the base LM's tokenizer, concatenated (EOS between
documents) and cut into windows of P + C tokens; a row is ``[BOS] + window`` and its prefix the
first 1 + P tokens (the seed used prefixes of 120 and continuations of 40 tokens; small models
here default to 32 and 16). For the training and validation prefixes, n continuations of C
tokens are drawn once from the frozen LM (top-k optional) into sharded files
(:mod:`seqebm.data.negatives`) under ``run_dir/negatives/<split>``. A training batch pairs each
real row with one of its prefix's negatives drawn uniformly (a pure function of seed, epoch and
batch index, so runs resume exactly).

Evaluation: the conditional-NCE loss and the real-vs-LM classification accuracy; on the test
split also the base LM's perplexity of the continuations and the joint model's perplexity
lower/upper bounds from ``bound_samples`` LM samples per prefix (Thm. 2, Eq. 4).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.data.batching import PairBatch
from seqebm.data.negatives import NegativeStore, generate_negatives
from seqebm.data.tokenizers import BOS_ID, EOS_ID, Tokenizer
from seqebm.estimators.residual import joint_log_prob_bounds, perplexity_bounds, sample_log_weights
from seqebm.objectives.conditional_nce import ConditionalNCELoss


def windows(docs: list[list[int]], prefix_len: int, cont_len: int, max_rows: int | None = None) -> Tensor:
    """Rows ``[BOS] + P + C tokens`` cut from the EOS-joined token stream, shape (N, 1 + P + C)."""
    stream: list[int] = []
    for d in docs:
        stream += d + [EOS_ID]
    width = prefix_len + cont_len
    n = len(stream) // width
    if max_rows is not None:
        n = min(n, max_rows)
    if n == 0:
        raise ValueError(f"the split has {len(stream)} tokens: fewer than one window of {width}")
    body = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.long), body], 1)


class _PairSource:
    """Training batches: real rows with one uniformly drawn negative of their prefix each."""

    def __init__(self, rows: Tensor, store: NegativeStore, batch_size: int, seed: int, prefix_len: int) -> None:
        self.rows, self.store, self.batch_size, self.seed, self.p = rows, store, batch_size, seed, prefix_len
        self._num = rows.shape[0] // batch_size
        if self._num == 0:
            raise ValueError(f"only {rows.shape[0]} training windows: fewer than one batch of {batch_size}")

    def num_batches(self) -> int:
        return self._num

    def batch(self, epoch: int, index: int) -> PairBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.rows.shape[0], generator=g)
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        g_neg = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
        return pair_batch(self.rows, idx, self.store, self.p, g_neg)


def pair_batch(rows: Tensor, idx: Tensor, store: NegativeStore, prefix_len: int,
               generator: torch.Generator | None) -> PairBatch:
    pos = rows[idx]
    tokens, lengths, _ = store.get(idx, generator)
    neg = torch.cat([pos[:, : 1 + prefix_len], tokens.long()], 1)
    neg_mask = torch.arange(neg.shape[1])[None] < (1 + prefix_len + lengths.long())[:, None]
    return PairBatch(pos, torch.ones_like(pos, dtype=torch.bool), neg, neg_mask)


class ResidualTask:
    """Residual-EBM training and evaluation on a text corpus with a frozen base LM.

    Args:
        corpus: a :class:`~seqebm.data.corpora.TextCorpus` (``split(name)`` -> documents).
        tokenizer: the base LM's tokenizer.
        lm: the frozen base LM (used to draw the negatives and for the bounds).
        run_dir: negatives are written under ``run_dir/negatives`` (resume-safe).
        negatives_dir: write / reuse the negatives there instead (shared by runs of identical LM, prefixes
            and sampling settings; a folder made with other settings raises ``ValueError``).
        prefix_len, cont_len: P and C.
        num_negatives: n LM samples per training / validation prefix (the seed: 16 or 128).
        top_k: top-k of the LM samples (None: the untruncated LM).
        batch_size: pairs per training batch.
        bound_samples: LM samples per test prefix for the perplexity bounds.
        max_rows: cap on windows per split (quick runs).
    """

    kind = "residual"

    def __init__(self, corpus: Any, tokenizer: Tokenizer, lm: nn.Module, *, run_dir: Path | None, prefix_len: int = 32,
                 cont_len: int = 16, num_negatives: int = 16, top_k: int | None = None, batch_size: int = 32,
                 seed: int = 0, bound_samples: int = 64, max_rows: dict[str, int | None] | None = None,
                 eval_batch_size: int = 64, progress: bool = True, negatives_dir: str | Path | None = None) -> None:
        self.tokenizer, self.lm, self.vocab_size = tokenizer, lm, tokenizer.vocab_size
        self.prefix_len, self.cont_len, self.top_k = prefix_len, cont_len, top_k
        self.bound_samples, self.eval_batch_size, self.seed = bound_samples, eval_batch_size, seed
        max_rows = max_rows or {}
        self.rows = {s: windows(tokenizer.encode_batch(corpus.split(s)), prefix_len, cont_len, max_rows.get(s))
                     for s in ("train", "valid", "test")}
        root = Path(negatives_dir) if negatives_dir is not None else Path(run_dir) / "negatives" if run_dir is not None else None
        self.stores: dict[str, NegativeStore] = {}
        for split in ("train", "valid"):
            if root is None:
                raise ValueError("ResidualTask needs a run_dir or a negatives_dir to store its negatives")
            self.stores[split] = generate_negatives(
                lm, self.rows[split][:, : 1 + prefix_len], root / split, num_per_prefix=num_negatives,
                max_new_tokens=cont_len, top_k=top_k, seed=seed + (0 if split == "train" else 1),
                progress=progress)
        self.train_source = _PairSource(self.rows["train"], self.stores["train"], batch_size, seed, prefix_len)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: Any = "cpu") -> dict[str, float]:
        model.eval()
        rows = self.rows[split]
        out: dict[str, float] = {}
        if split in self.stores:
            g = torch.Generator().manual_seed(self.seed + 17)
            loss_fn, total, acc, n = ConditionalNCELoss(reduction="sum"), 0.0, 0.0, 0
            for i in range(0, rows.shape[0], self.eval_batch_size):
                idx = torch.arange(i, min(rows.shape[0], i + self.eval_batch_size))
                o = loss_fn(model, pair_batch(rows, idx, self.stores[split], self.prefix_len, g).to(device))
                total += float(o.loss)
                acc += float(o.metrics["accuracy_sum"])
                n += idx.numel()
            out.update({"loss": total / n, "accuracy": acc / n})
        if split == "test":
            out.update(self.perplexity_bounds(model, device))
        return out

    @torch.no_grad()
    def perplexity_bounds(self, model: nn.Module, device: Any = "cpu", num_samples: int | None = None) -> dict[str, float]:
        """Base LM perplexity of the test continuations and the joint model's lower/upper bounds."""
        n = num_samples or self.bound_samples
        rows = self.rows["test"].to(device)
        g = torch.Generator().manual_seed(self.seed + 29)
        lower, upper, lm_lp = [], [], []
        for i in range(0, rows.shape[0], self.eval_batch_size):
            chunk = rows[i:i + self.eval_batch_size]
            lp = model.lm_log_prob(chunk, prefix_len=1 + self.prefix_len)
            e = model.energy(chunk, torch.ones_like(chunk, dtype=torch.bool)).double()
            # the bounds sample the untruncated LM (seed §3.2): top-k never covers P_LM's support
            lw = sample_log_weights(model, chunk[:, : 1 + self.prefix_len], num_samples=n,
                                    max_new_tokens=self.cont_len, generator=g)
            b = joint_log_prob_bounds(lp, e, lw)
            lower.append(b.lower)
            upper.append(b.upper)
            lm_lp.append(lp)
        lower_t, upper_t, lm_t = torch.cat(lower), torch.cat(upper), torch.cat(lm_lp)
        tokens = rows.shape[0] * self.cont_len
        bounds = perplexity_bounds(lower_t, upper_t, tokens)
        return {"lm_ppl": math.exp(-float(lm_t.sum()) / tokens), "joint_ppl_lower": bounds["ppl_lower"],
                "joint_ppl_upper": bounds["ppl_upper"], "bound_samples": float(n)}

    def samples(self, model: nn.Module, n: int, max_new_tokens: int = 0, *, device: Any = "cpu", **_: Any) -> list[str]:
        from seqebm.sampling.resampling import joint_sample

        rows = self.rows["test"][:n].to(device)
        draws, _ = joint_sample(model, rows[:, : 1 + self.prefix_len], num_candidates=16,
                                max_new_tokens=self.cont_len, top_k=self.top_k,
                                generator=torch.Generator().manual_seed(self.seed))
        texts = self.tokenizer.decode_batch(draws[:, 0, 1 + self.prefix_len:].tolist())
        prefixes = self.tokenizer.decode_batch(rows[:, 1: 1 + self.prefix_len].tolist())
        return [f"prefix: {p}\njoint: {t}" for p, t in zip(prefixes, texts)]
