"""Label bias, shown exactly: a smoothed bigram ALM vs a bigram GN-ELM (monograph §4.1.2, Eq. 4.9).

Training text: "Tom likes tea", "John likes tea", "Alice like tea" (the last one a noisy,
infrequent pattern). Test: "Alice likes tea" and "Tom like tea".

* The **ALM** is a bigram LM whose unseen transitions get a small probability ε and whose seen
  transitions share the rest by relative frequency (Fig. 4.2). Every history in this data has a
  single successor, so P(tea | likes) = P(tea | like): local normalisation forgets that "like"
  was the rarer history, and both test sentences get the same probability.
* The **GN-ELM** (Eq. 3.3 / 4.9) puts one weight λ_k on each of the 9 bigram features seen in
  training (with sentence boundaries ⟨s⟩/⟨/s⟩) and normalises over the whole finite sentence
  space x1 ∈ {Tom, John, Alice}, x2 ∈ {likes, like}, x3 = tea. Its exact maximum-likelihood fit
  (log Z by enumerating the 6 sentences; a small Gaussian prior keeps λ finite, because the
  likelihood keeps rising as unseen sentences lose mass) ranks "Alice likes tea" above "Tom like
  tea": λ(likes, tea) is learned from two sentences, λ(like, tea) from one.

:func:`label_bias_tables` returns both tables; ``seqebm elm label-bias`` prints them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TRAIN", "TEST", "SPACE", "EpsilonBigram", "BigramELM", "fit_bigram_elm", "label_bias_tables"]

TRAIN = ("Tom likes tea", "John likes tea", "Alice like tea")
TEST = ("Alice likes tea", "Tom like tea")
#: the finite sentence space of Eq. 4.9: (x1, x2, x3)
SPACE = tuple(" ".join(s) for s in itertools.product(("Tom", "John", "Alice"), ("likes", "like"), ("tea",)))
BOS, EOS = "<s>", "</s>"


def _bigrams(sentence: str) -> list[tuple[str, str]]:
    words = [BOS, *sentence.split(), EOS]
    return list(zip(words, words[1:]))


@dataclass
class EpsilonBigram:
    """Bigram ALM with ε for unseen transitions (monograph Fig. 4.2).

    P(w | h) = ε for a successor w never seen after h, and (1 − ε·u_h) · c(h, w) / c(h) for a seen
    one, u_h being the number of unseen successors of h among the vocabulary words and ⟨/s⟩.
    """

    counts: dict[tuple[str, str], int]
    vocabulary: tuple[str, ...]
    epsilon: float = 1e-3

    @classmethod
    def fit(cls, sentences: Sequence[str], *, epsilon: float = 1e-3) -> EpsilonBigram:
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
        counts = Counter(b for s in sentences for b in _bigrams(s))
        vocab = tuple(sorted({w for s in sentences for w in s.split()}))
        model = cls(dict(counts), vocab, epsilon)
        for h in {h for h, _ in counts}:
            if model.epsilon * model._unseen(h) >= 1:
                raise ValueError(f"epsilon={epsilon} leaves no mass for the seen successors of {h!r}")
        return model

    def _unseen(self, history: str) -> int:
        return sum((history, w) not in self.counts for w in (*self.vocabulary, EOS))

    def prob(self, word: str, history: str) -> float:
        c = self.counts.get((history, word), 0)
        if c == 0:
            return self.epsilon
        total = sum(n for (h, _), n in self.counts.items() if h == history)
        return (1.0 - self.epsilon * self._unseen(history)) * c / total

    def log_prob(self, sentence: str) -> float:
        return sum(math.log(self.prob(w, h)) for h, w in _bigrams(sentence))


@dataclass
class BigramELM:
    """GN-ELM with indicator features on the training bigrams (Eq. 4.9), fitted by exact MLE."""

    features: tuple[tuple[str, str], ...]
    weights: torch.Tensor  # (K,) float64, λ_k
    space: tuple[str, ...]
    log_z: float

    def potential(self, sentence: str) -> float:
        """U(x) = Σ_k λ_k f_k(x)."""
        index = {f: k for k, f in enumerate(self.features)}
        return float(sum(self.weights[index[b]] for b in _bigrams(sentence) if b in index))

    def log_prob(self, sentence: str) -> float:
        if sentence not in self.space:
            raise ValueError(f"{sentence!r} is outside the model's sentence space {self.space}")
        return self.potential(sentence) - self.log_z


def fit_bigram_elm(train: Sequence[str] = TRAIN, space: Sequence[str] = SPACE, *, l2: float = 0.1) -> BigramELM:
    """Exact MLE of the bigram GN-ELM over a finite ``space`` (L-BFGS; log Z by enumeration).

    Maximises (1/N) Σ_train U(x) − log Σ_{x ∈ space} exp U(x) − (l2/2)·||λ||².
    """
    if not train or not space:
        raise ValueError("train and space must be non-empty")
    missing = [s for s in train if s not in space]
    if missing:
        raise ValueError(f"training sentences outside the space: {missing}")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (without a prior the MLE of this model is infinite), got {l2}")
    feats = tuple(sorted({b for s in train for b in _bigrams(s)}))
    index = {f: k for k, f in enumerate(feats)}
    f_space = torch.zeros(len(space), len(feats), dtype=torch.float64)  # (S, K) feature counts
    for i, s in enumerate(space):
        for b in _bigrams(s):
            if b in index:
                f_space[i, index[b]] += 1
    rows = torch.tensor([list(space).index(s) for s in train])
    lam = torch.zeros(len(feats), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([lam], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        u = f_space @ lam
        loss = -(u[rows].mean() - torch.logsumexp(u, 0)) + 0.5 * l2 * (lam ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    lam = lam.detach()
    return BigramELM(feats, lam, tuple(space), float(torch.logsumexp(f_space @ lam, 0)))


def label_bias_tables(*, epsilon: float = 1e-3, l2: float = 0.1) -> dict:
    """Both models' parameters and test-sentence log-probabilities, plus a markdown rendering."""
    alm = EpsilonBigram.fit(TRAIN, epsilon=epsilon)
    elm = fit_bigram_elm(l2=l2)
    transitions = sorted({(h, w) for s in (*TRAIN, *TEST) for h, w in _bigrams(s)})
    alm_rows = [(h, w, alm.prob(w, h)) for h, w in transitions]
    tests = {s: {"alm": alm.log_prob(s), "elm": elm.log_prob(s)} for s in TEST}
    lines = ["## Bigram ALM (ε-smoothed, Fig. 4.2)", "", "| history | word | P(word | history) |", "|---|---|---:|"]
    lines += [f"| {h} | {w} | {p:.4g} |" for h, w, p in alm_rows]
    lines += ["", f"## Bigram GN-ELM (Eq. 4.9), exact MLE with l2={l2:g}, log Z = {elm.log_z:.3f}", "",
              "| feature | λ |", "|---|---:|"]
    lines += [f"| ({h}, {w}) | {float(v):.3f} |" for (h, w), v in zip(elm.features, elm.weights)]
    lines += ["", "## Test sentences", "", "| sentence | log P, ALM | log P, GN-ELM |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['alm']:.3f} | {v['elm']:.3f} |" for s, v in tests.items()]
    return {"alm": {f"{h} {w}": p for h, w, p in alm_rows},
            "elm": {"features": {f"{h} {w}": float(v) for (h, w), v in zip(elm.features, elm.weights)},
                    "log_z": elm.log_z},
            "test": tests, "markdown": "\n".join(lines) + "\n"}


def _cmd_label_bias(args) -> int:
    import json
    from pathlib import Path

    from seqebm.io import atomic_write_text

    res = label_bias_tables(epsilon=args.epsilon, l2=args.l2)
    print(res["markdown"], end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "label_bias.md", res["markdown"])
        atomic_write_text(out / "label_bias.json", json.dumps({k: v for k, v in res.items() if k != "markdown"},
                                                              indent=2))
    return 0


def register_label_bias_command(subparsers) -> None:
    """``seqebm elm label-bias``: print (and optionally save) the two tables of §4.1.2."""
    p = subparsers.add_parser("label-bias", help="label bias shown exactly: bigram ALM vs bigram GN-ELM "
                                                 "(monograph §4.1.2)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="ALM probability of an unseen transition")
    p.add_argument("--l2", type=float, default=0.1, help="Gaussian prior on the ELM weights (keeps the MLE finite)")
    p.add_argument("--out", help="folder for label_bias.md and label_bias.json")
    p.set_defaults(func=_cmd_label_bias)
