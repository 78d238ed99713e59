"""The n-gram perplexity baseline of the energy-based LMs: ``seqebm elm ngram`` (issue #10, item 5).

An interpolated Kneser–Ney word n-gram (:class:`~seqebm.eval.sentence_scorers.NGramSentenceScorer`)
estimated on an ELM recipe's training text, evaluated with the same vocabulary, the same kept
sentences and the same unit W = Σ (l + 1) as :func:`seqebm.training.elm.run_elm`, so its valid/test
perplexities sit in one table with the ALM's and the TRF-LMs'.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from seqebm.config import load_config, to_dict
from seqebm.data.tagged import WordVocabulary
from seqebm.io import atomic_write_text
from seqebm.training.elm import ElmConfig, _load_text

__all__ = ["OOV_WORD", "register_elm_ngram_command", "run_ngram_baseline"]


#: the token that stands for every out-of-vocabulary word in the n-gram baseline (not a reserved word of
#: :class:`~seqebm.eval.sentence_scorers.NGramSentenceScorer`, so it is counted like any other word)
OOV_WORD = "<oov>"


def run_ngram_baseline(cfg: ElmConfig, run_dir: str | Path, *, order: int = 3, log=print) -> dict[str, Any]:
    """Interpolated Kneser–Ney ``order``-gram on the recipe's training text: the perplexity baseline (#10, item 5).

    Same text, vocabulary and units as :func:`~seqebm.training.elm.run_elm`: the vocabulary is built from the training
    sentences with ``data.min_count`` / ``data.max_vocab``, every other word becomes one token (as
    ``<unk>`` does for the neural LMs), and valid/test perplexity is per word with one end of
    sentence per sentence over the sentences of 1..``data.max_length`` words
    (:func:`~seqebm.training.elm.evaluate_split`'s W). Writes ``config.yaml`` (the data section and the order),
    ``vocab.json``, the model as ``kn.json`` and ``results.json`` into ``run_dir`` (must not exist).
    """
    from seqebm.eval.sentence_scorers import NGramSentenceScorer
    from seqebm.training.experiment import prepare_run_dir

    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order must be a positive int, got {order!r}")
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    text = _load_text(cfg)
    prepare_run_dir(run_dir, False)
    vocab = WordVocabulary.build(text["train"], min_count=cfg.data.min_count, max_size=cfg.data.max_vocab)
    if OOV_WORD in vocab:
        raise ValueError(f"the training text contains the word {OOV_WORD!r}, which stands for unknown words here")
    mapped = lambda sentences: [" ".join(w if w in vocab else OOV_WORD for w in s) for s in sentences]  # noqa: E731
    config = {"name": f"kn{order}", "task": "elm", "data": to_dict(cfg.data), "model": {"kind": "kn", "order": order}}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(run_dir / "vocab.json", json.dumps(vocab.to_dict()))
    kn = NGramSentenceScorer.fit(mapped(text["train"]), order)
    kn.save(run_dir / "kn.json")
    results: dict[str, Any] = {"name": f"kn{order}", "task": "elm", "kind": "kn", "order": order,
                               "vocab": len(vocab), "train_sentences": len(text["train"])}
    for split in ("valid", "test"):
        kept = [s for s in text[split] if 1 <= len(s) <= cfg.data.max_length]
        if not kept:
            raise ValueError(f"no {split} sentence has 1..{cfg.data.max_length} words")
        ll = kn(mapped(kept))
        words = float(sum(len(s) + 1 for s in kept))
        nll = float(-ll.sum()) / words
        results[split] = {"loss": nll, "ppl": math.exp(min(nll, 700.0)), "sentences": len(kept),
                          "excluded_longer": len(text[split]) - len(kept), "words": words}
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    log(f"[seqebm] kn{order}: valid ppl {results['valid']['ppl']:.2f}, test ppl {results['test']['ppl']:.2f} "
        f"(vocab {len(vocab)}) -> {run_dir}")
    return results


def register_elm_ngram_command(subparsers) -> None:
    """``seqebm elm ngram``."""

    def _cmd(args) -> int:
        cfg = load_config(ElmConfig, args.config, args.overrides)
        run_dir = Path(args.run_dir or f"runs/kn{args.order}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_ngram_baseline(cfg, run_dir, order=args.order)
        return 0

    n = subparsers.add_parser("ngram", help="Kneser-Ney n-gram perplexity baseline on an ELM recipe's text and "
                                            "vocabulary (configs/elm-*.yaml)")
    n.add_argument("--config")
    n.add_argument("--run-dir")
    n.add_argument("--order", type=int, default=3)
    n.add_argument("overrides", nargs="*", help="data.* overrides (the other sections are not used)")
    n.set_defaults(func=_cmd)
