"""Text-generation metrics: BLEU, ROUGE, METEOR, n-gram diversity, self-BLEU, BLEU by length.

All scores are percentages in [0, 100]. Inputs are plain detokenised strings.

**Reference convention (every function taking ``references``):** one entry per hypothesis,
aligned by index. ``references[i]`` is either a string (one reference) or a non-empty list of
strings (several references for hypothesis ``i``; the number may vary between hypotheses).
This is *not* sacrebleu's "reference streams" layout (``[[ref_a_1, ref_a_2, ...], [ref_b_1,
...]]``, one list per reference set); convert streams with :func:`references_from_streams`.

Backends (``pip install 'seqebm[metrics]'``): BLEU and self-BLEU use sacrebleu, ROUGE uses
rouge-score (with the Porter stemmer), METEOR uses NLTK with a *local* WordNet (see
:mod:`seqebm.eval.wordnet`; nothing is ever downloaded). Distinct-n needs nothing.
"""

from __future__ import annotations

import bisect
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from seqebm.eval.wordnet import WORDNET_HELP, find_wordnet, wordnet_session

__all__ = [
    "bleu_by_length",
    "corpus_bleu",
    "meteor",
    "meteor_available",
    "references_from_streams",
    "rouge",
    "self_bleu",
    "text_metrics",
    "unique_ngram_fraction",
    "unique_ngrams",
]

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (10, 20, 30, 40, 50)
_INSTALL_HINT = "install the metric backends with `pip install 'seqebm[metrics]'`"


# --------------------------------------------------------------------------- validation


def _check_texts(texts: Sequence[str], name: str = "hypotheses", *, min_len: int = 1) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if len(texts) < min_len:
        raise ValueError(f"{name} must contain at least {min_len} text(s), got {len(texts)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(text).__name__}")
    return list(texts)


def _check_references(references: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """Normalise per-hypothesis references to ``list[list[str]]`` (see the module docstring)."""
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise ValueError(f"references must be a list, got {type(references).__name__}")
    if len(references) != n:
        raise ValueError(
            f"got {n} hypotheses but {len(references)} references: references must hold one "
            "entry (a string or a list of strings) per hypothesis; for sacrebleu-style "
            "reference streams use references_from_streams()"
        )
    out = []
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            out.append([ref])
        elif isinstance(ref, Sequence) and not isinstance(ref, bytes):
            if len(ref) == 0:
                raise ValueError(f"references[{i}] is an empty list; give at least one reference")
            if not all(isinstance(r, str) for r in ref):
                raise ValueError(f"references[{i}] must contain only strings")
            out.append(list(ref))
        else:
            raise ValueError(f"references[{i}] must be a string or a list of strings, "
                             f"got {type(ref).__name__}")
    return out


def references_from_streams(streams: Sequence[Sequence[str]]) -> list[list[str]]:
    """Transpose sacrebleu-style reference streams into per-hypothesis reference lists.

    ``streams[k][i]`` is the ``k``-th reference of hypothesis ``i``; ``None`` or ``""`` marks a
    missing reference (as in sacrebleu). All streams must have the same length.
    """
    if isinstance(streams, (str, bytes)) or not isinstance(streams, Sequence) or not streams:
        raise ValueError("streams must be a non-empty list of reference streams")
    lengths = {len(stream) for stream in streams}
    if len(lengths) != 1:
        raise ValueError(f"reference streams have different lengths: {sorted(lengths)}")
    out = [[ref for ref in column if ref] for column in zip(*streams)]
    for i, refs in enumerate(out):
        if not refs:
            raise ValueError(f"hypothesis {i} has no non-empty reference in any stream")
    return out


def _check_tokenize(tokenize: str) -> None:
    from sacrebleu.metrics import BLEU

    if tokenize not in BLEU.TOKENIZERS:
        raise ValueError(f"unknown sacrebleu tokenize={tokenize!r}; choose from {sorted(BLEU.TOKENIZERS)}")


def _import_sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"BLEU needs sacrebleu: {_INSTALL_HINT}") from err
    return sacrebleu


# --------------------------------------------------------------------------- BLEU


def corpus_bleu(hypotheses: list[str], references: list[str] | list[list[str]], *,
                tokenize: str = "13a") -> dict[str, Any]:
    """Corpus BLEU with sacrebleu (default settings: ``exp`` smoothing, mixed case, 4-grams).

    Args:
        hypotheses: system outputs, one string per segment.
        references: one entry per hypothesis, a string or a list of strings (module docstring).
        tokenize: sacrebleu tokenizer name (``"13a"``, ``"intl"``, ``"char"``, ``"none"``, ...).

    Returns:
        ``{"bleu", "signature", "precisions", "bp", "ratio", "sys_len", "ref_len"}``: the score
        (0-100), sacrebleu's signature string (report it with the score), the 1- to 4-gram
        precisions (0-100), the brevity penalty, hypothesis/reference length ratio and the
        total hypothesis and (closest) reference lengths in tokens.
    """
    sacrebleu = _import_sacrebleu()
    hyps = _check_texts(hypotheses)
    refs = _check_references(references, len(hyps))
    _check_tokenize(tokenize)
    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
    score = metric.corpus_score(hyps, streams)
    return {
        "bleu": float(score.score),
        "signature": str(metric.get_signature()),
        "precisions": [float(p) for p in score.precisions],
        "bp": float(score.bp),
        "ratio": float(score.ratio),
        "sys_len": int(score.sys_len),
        "ref_len": int(score.ref_len),
    }


def bleu_by_length(hypotheses: list[str], references: list[str] | list[list[str]], *,
                   buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                   tokenize: str = "13a") -> list[dict[str, Any]]:
    """Corpus BLEU per bucket of *reference* length (whitespace tokens of the first reference).

    ``buckets`` are increasing edges; the default ``(10, 20, 30, 40, 50)`` gives the rows
    ``"<10"``, ``"10-19"``, ``"20-29"``, ``"30-39"``, ``"40-49"``, ``">=50"``. Every bucket is
    reported, in order, so tables from different systems line up: an empty bucket has
    ``count == 0`` and ``bleu is None``. Each row is ``{"bucket", "count", "bleu"}`` and its
    BLEU is :func:`corpus_bleu` on that subset of pairs.
    """
    hyps = _check_texts(hypotheses)
    refs = _check_references(references, len(hyps))
    edges = list(buckets)
    if not edges or any(isinstance(e, bool) or not isinstance(e, int) for e in edges):
        raise ValueError(f"buckets must be a non-empty list of ints, got {buckets!r}")
    if edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"buckets must be strictly increasing positive ints, got {edges}")
    labels = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    members: list[list[int]] = [[] for _ in labels]
    for i, ref in enumerate(refs):
        members[bisect.bisect_right(edges, len(ref[0].split()))].append(i)
    rows = []
    for label, idx in zip(labels, members):
        bleu = (corpus_bleu([hyps[i] for i in idx], [refs[i] for i in idx], tokenize=tokenize)["bleu"]
                if idx else None)
        rows.append({"bucket": label, "count": len(idx), "bleu": bleu})
    return rows


def self_bleu(texts: list[str], *, max_texts: int | None = None, seed: int = 0,
              tokenize: str = "13a") -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): mean sentence BLEU of each text against all others.

    Each text ``i`` is scored with sacrebleu's *sentence* BLEU (``sacrebleu.sentence_bleu``
    defaults: ``exp`` smoothing, effective order, closest reference length) using every other
    text as a reference; the result is the mean over ``i`` (0-100, higher = less diverse).
    The value equals that loop exactly, but is computed in one pass over the n-grams (for each
    n-gram the two largest per-text counts are kept, so "max count over the others" is O(1)),
    instead of re-extracting ``N - 1`` references for each of the ``N`` texts.

    Self-BLEU grows with the number of texts, so compare values at equal set sizes only. With
    ``max_texts`` (< ``len(texts)``), a random subset of that size (``random.Random(seed)``) is
    drawn and self-BLEU is computed *within* the subset.
    """
    sacrebleu = _import_sacrebleu()
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    items = _check_texts(texts, "texts", min_len=2)
    if max_texts is not None:
        if isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 2:
            raise ValueError(f"max_texts must be an int >= 2 or None, got {max_texts!r}")
        if max_texts < len(items):
            keep = sorted(random.Random(seed).sample(range(len(items)), max_texts))
            items = [items[i] for i in keep]
    _check_tokenize(tokenize)
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize, effective_order=True)
    order = metric.max_ngram_order
    counts, lengths = [], []
    for text in items:  # same preprocessing as BLEU.sentence_score (no lowercasing)
        ngrams, length = extract_all_word_ngrams(metric.tokenizer(text.rstrip()), 1, order)
        counts.append(ngrams)
        lengths.append(length)
    # n-gram -> [largest count, index of the text holding it, second largest count]
    top: dict[tuple[str, ...], list[int]] = {}
    for i, ngrams in enumerate(counts):
        for gram, c in ngrams.items():
            entry = top.get(gram)
            if entry is None:
                top[gram] = [c, i, 0]
            elif c > entry[0]:
                entry[2], entry[0], entry[1] = entry[0], c, i
            elif c > entry[2]:
                entry[2] = c
    length_count = Counter(lengths)
    sorted_lengths = sorted(length_count)
    scores = []
    for i, ngrams in enumerate(counts):
        hyp_len = lengths[i]
        correct, total = [0] * order, [0] * order
        for gram, c in ngrams.items():
            best, holder, second = top[gram]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, second if holder == i else best)
        scores.append(metric.compute_bleu(
            correct=correct, total=total, sys_len=hyp_len,
            ref_len=_closest_other_length(hyp_len, sorted_lengths, length_count),
            smooth_method=metric.smooth_method, smooth_value=metric.smooth_value,
            effective_order=True, max_ngram_order=order).score)
    return float(sum(scores) / len(scores))


def _closest_other_length(own: int, sorted_lengths: list[int], count: Counter) -> int:
    """sacrebleu's closest reference length (ties -> shorter) over all lengths but one ``own``."""
    if count[own] > 1:
        return own
    pos = bisect.bisect_left(sorted_lengths, own)
    shorter = sorted_lengths[pos - 1] if pos > 0 else None
    longer = sorted_lengths[pos + 1] if pos + 1 < len(sorted_lengths) else None
    if shorter is None:
        return longer  # type: ignore[return-value]  # >= 2 texts, so one side exists
    if longer is None or own - shorter <= longer - own:
        return shorter
    return longer


# --------------------------------------------------------------------------- ROUGE / METEOR


def rouge(hypotheses: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0-100), averaged over hypothesis-reference pairs.

    Uses ``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
    use_stemmer=True)`` (its tokenizer lowercases and keeps only ``[a-z0-9]`` runs).
    With several references, the best-F reference per ROUGE type is used (``score_multi``).
    Returns ``{"rouge1", "rouge2", "rougeL"}``.
    """
    hyps = _check_texts(hypotheses)
    refs = _check_references(references, len(hyps))
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"ROUGE needs rouge-score: {_INSTALL_HINT}") from err
    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    sums = dict.fromkeys(types, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(ref[0], hyp) if len(ref) == 1 else scorer.score_multi(ref, hyp)
        for key in types:
            sums[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(hyps) for key, total in sums.items()}


def meteor_available() -> bool:
    """Whether METEOR can run: NLTK is installed and WordNet data exists locally.

    Only checks that the files exist (cheap); see :mod:`seqebm.eval.wordnet` for where it looks.
    """
    return find_wordnet() is not None


def meteor(hypotheses: list[str], references: list[str] | list[list[str]]) -> float | None:
    """Mean METEOR (0-100) with ``nltk.translate.meteor_score.meteor_score`` and local WordNet.

    Hypotheses and references are lowercased by NLTK and tokenised on whitespace here
    (``str.split``); several references per hypothesis are passed to NLTK together (it keeps
    the best). If no WordNet data is available locally, returns ``None`` and warns that METEOR
    is skipped (WordNet is never downloaded).
    """
    hyps = _check_texts(hypotheses)
    refs = _check_references(references, len(hyps))
    try:
        from nltk.translate.meteor_score import meteor_score
    except ImportError:
        meteor_score = None
    with wordnet_session() as wordnet:
        if meteor_score is None or wordnet is None:
            warnings.warn(f"METEOR skipped: no local WordNet data found (or NLTK missing); to enable it, "
                          f"{WORDNET_HELP}", stacklevel=2)
            return None
        total = sum(meteor_score([r.split() for r in ref], hyp.split(), wordnet=wordnet)
                    for hyp, ref in zip(hyps, refs))
    return 100.0 * total / len(hyps)


# --------------------------------------------------------------------------- diversity


def _ngram_stats(token_lists: list[list[str]], n: int) -> float:
    distinct: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return 100.0 * len(distinct) / total if total else 0.0


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def unique_ngram_fraction(texts: list[str], n: int) -> float:
    """Percentage of distinct n-grams among all n-grams of ``texts`` (distinct-n, 0-100).

    Tokens are whitespace-separated; n-grams do not cross text boundaries; distinctness is over
    the whole set. Texts shorter than ``n`` contribute nothing; if no text has ``n`` tokens the
    result is 0.0. Example: ``["a a b"]``, n=1: 2 distinct of 3 unigrams = 66.67.
    """
    _check_n(n)
    return _ngram_stats([t.split() for t in _check_texts(texts, "texts")], n)


def unique_ngrams(texts: list[str], max_n: int = 4) -> dict[str, float]:
    """:func:`unique_ngram_fraction` for n = 1..``max_n``: ``{"unique_1": ..., "unique_4": ...}``."""
    _check_n(max_n)
    token_lists = [t.split() for t in _check_texts(texts, "texts")]
    return {f"unique_{n}": _ngram_stats(token_lists, n) for n in range(1, max_n + 1)}


# --------------------------------------------------------------------------- bundle


def text_metrics(hypotheses: list[str], references: list[str] | list[list[str]] | None = None, *,
                 tokenize: str = "13a", self_bleu_max_texts: int | None = None, seed: int = 0,
                 length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> dict[str, Any]:
    """All applicable metrics in one flat dict.

    Always: ``unique_1``..``unique_4`` and ``self_bleu`` (``None`` for a single hypothesis).
    With references, also: ``bleu``, ``bleu_signature``, ``bleu_bp``, ``rouge1``, ``rouge2``,
    ``rougeL``, ``meteor`` (``None``, with a warning, when WordNet is not available locally)
    and ``bleu_by_length`` (the list of rows from :func:`bleu_by_length`).
    """
    hyps = _check_texts(hypotheses)
    out: dict[str, Any] = dict(unique_ngrams(hyps))
    out["self_bleu"] = (self_bleu(hyps, max_texts=self_bleu_max_texts, seed=seed, tokenize=tokenize)
                        if len(hyps) > 1 else None)
    if references is not None:
        refs = _check_references(references, len(hyps))
        bleu = corpus_bleu(hyps, refs, tokenize=tokenize)
        out.update(bleu=bleu["bleu"], bleu_signature=bleu["signature"], bleu_bp=bleu["bp"])
        out.update(rouge(hyps, refs))
        out["meteor"] = meteor(hyps, refs)
        out["bleu_by_length"] = bleu_by_length(hyps, refs, buckets=length_buckets, tokenize=tokenize)
    return out
