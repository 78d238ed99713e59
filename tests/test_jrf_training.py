"""Semi-supervised tagging runs (seqebm.training.jrf) on a tiny synthetic tagged corpus.

Grammar: DET (ADJ) NOUN VERB (DET (ADJ) NOUN), sometimes two clauses joined by "and"/CC (longer than
m = 8 words: CRF part only). "walk"/"run" are NOUN after DET/ADJ and VERB after a plural NOUN, so the
tag does not follow from the word alone.
"""

from __future__ import annotations

import json
import random

import pytest

from seqebm.config import load_config
from seqebm.training.jrf import METHODS, SslConfig, compare_ssl, phase_plan, run_ssl

LEX = {"DET": ["the", "a", "every"], "ADJ": ["big", "small", "red", "old"],
       "NOUN": ["cat", "dog", "bird", "fish", "man", "walk", "run"], "PL": ["cats", "dogs", "birds"],
       "VERB": ["sees", "likes", "eats"], "PLVERB": ["walk", "run", "see"]}


def clause(r: random.Random) -> list[tuple[str, str]]:
    out = [(r.choice(LEX["DET"]), "DET")]
    if r.random() < 0.5:
        out.append((r.choice(LEX["ADJ"]), "ADJ"))
    if r.random() < 0.5:
        out += [(r.choice(LEX["PL"]), "NOUN"), (r.choice(LEX["PLVERB"]), "VERB")]
    else:
        out += [(r.choice(LEX["NOUN"]), "NOUN"), (r.choice(LEX["VERB"]), "VERB")]
    if r.random() < 0.5:
        out += [(r.choice(LEX["DET"]), "DET"), (r.choice(LEX["NOUN"]), "NOUN")]
    return out


def write_conll(path, n: int, seed: int) -> None:
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        s = clause(r) + ([("and", "CC")] + clause(r) if r.random() < 0.15 else [])
        lines += [f"{w} {t}" for w, t in s] + [""]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssl-data")
    for split, n, seed in (("train", 200, 0), ("valid", 40, 1), ("test", 40, 2)):
        write_conll(d / f"{split}.txt", n, seed)
    return d


def base(corpus) -> list[str]:
    return ["data.corpus=conll", f"data.train_file={corpus / 'train.txt'}", f"data.valid_file={corpus / 'valid.txt'}",
            f"data.test_file={corpus / 'test.txt'}", "data.include_wiki=false", "data.max_length=8",
            "data.min_count=1", "model.word_dim=8", "model.hidden=8", "model.lm_dim=8",
            "objective.noise_pretrain_steps=10", "objective.pretrain_steps=20", "objective.self_training_rounds=1",
            "objective.self_training_steps=10", "objective.self_training_threshold=0.0", "train.steps=30",
            "train.eval_every=15", "train.labeled_batch=8", "train.unlabeled_batch=8", "train.progress=false"]


def tiny(corpus, method: str, *extra: str) -> SslConfig:
    return load_config(SslConfig, None, [*base(corpus), "data.labeled_fraction=0.2", f"objective.method={method}",
                                         *extra])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_reports(corpus, tmp_path, method):
    emitter = "model.emitter=wordchar" if method == "jrf" else "model.emitter=word"
    cfg = tiny(corpus, method, emitter)
    res = run_ssl(cfg, tmp_path / "run", log=lambda *_: None)
    for name in ("results.json", "report.md", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert res["method"] == method and res["num_labeled"] == 40 and res["steps"] == res["steps_planned"]
    assert res["steps_planned"] == sum(n for _, n in phase_plan(cfg))
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and 0.0 <= res["valid"]["accuracy"] <= 1.0
    assert res["num_unlabeled"] > 0 and res["pool_too_long"] > 0  # two-clause sentences are left out of the pool
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "valid" for r in records)
    if method == "self_training":
        assert (tmp_path / "run" / "pseudo.json").is_file() and res["pseudo_counts"][0] > 0
    if method in ("pretrain", "jrf"):
        assert any("dnce" in r for r in records)


def test_resume_of_finished_run_does_not_retrain(corpus, tmp_path):
    cfg = tiny(corpus, "crf")
    first = run_ssl(cfg, tmp_path / "run", log=lambda *_: None)
    lines = []
    again = run_ssl(cfg, tmp_path / "run", resume=True, log=lines.append)
    assert again == first and any("not retraining" in x for x in lines)
    with pytest.raises(FileExistsError):
        run_ssl(cfg, tmp_path / "run", log=lambda *_: None)


def test_interrupted_run_resumes_exactly(corpus, tmp_path, monkeypatch):
    from seqebm.training import jrf as module

    cfg = tiny(corpus, "self_training", "objective.self_training_steps=20")  # checkpoints at 15, 30, 45, 50
    full = run_ssl(cfg, tmp_path / "full", log=lambda *_: None)
    calls, real = [], module.evaluate_tagger

    def crash_at_step_50(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, "evaluate_tagger", crash_at_step_50)
    with pytest.raises(KeyboardInterrupt):
        run_ssl(cfg, tmp_path / "run", log=lambda *_: None)
    monkeypatch.setattr(module, "evaluate_tagger", real)
    assert not (tmp_path / "run" / "results.json").exists()
    res = run_ssl(cfg, tmp_path / "run", resume=True, log=lambda *_: None)  # from step 45, inside round 1
    for key in ("steps", "best_step", "pseudo_counts", "valid", "test"):
        assert res[key] == full[key], key
    with pytest.raises(FileNotFoundError):
        run_ssl(cfg, tmp_path / "none", resume=True, log=lambda *_: None)


def test_validation_errors(corpus, tmp_path):
    for f in ("0", "0.0", "1.5", "-0.1"):
        with pytest.raises(ValueError, match="labeled_fraction"):
            tiny(corpus, "crf", f"data.labeled_fraction={f}")
    with pytest.raises(ValueError, match="objective.method"):
        tiny(corpus, "mixup")
    with pytest.raises(ValueError, match="unlabelled pool is empty"):
        run_ssl(tiny(corpus, "jrf", "data.labeled_fraction=1.0"), tmp_path / "a", log=lambda *_: None)
    assert not (tmp_path / "a").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text((corpus / "test.txt").read_text() + "the DET\ncat XYZ\n\n")
    with pytest.raises(ValueError, match="outside the tag set"):
        run_ssl(tiny(corpus, "crf", f"data.test_file={bad}"), tmp_path / "b", log=lambda *_: None)


def test_compare_writes_table(corpus, tmp_path):
    paths = []
    for method in ("crf", "jrf"):
        p = tmp_path / f"ssl-{method}.yaml"
        p.write_text(json.dumps({"objective": {"method": method}}))
        paths.append(p)
    summary = compare_ssl(paths, [0, 1], [0.2], tmp_path / "cmp", base(corpus), log=lambda *_: None)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| ssl-crf | crf |" in text and "| ssl-jrf | jrf |" in text
    assert "| accuracy 20% | OOV accuracy 20% | time (s) 20% |" in text
    assert set(summary) == {"ssl-crf-f0.2", "ssl-jrf-f0.2"} and summary["ssl-crf-f0.2"]["test_accuracy"]["n"] == 2
    assert (tmp_path / "cmp" / "ssl-jrf-f0.2-s1" / "results.json").is_file()
    again = compare_ssl(paths, [0, 1], [0.2], tmp_path / "cmp", base(corpus), log=lambda *_: None)  # all reused
    assert again == summary



def test_wiki_sentences_are_tokenised_like_the_pos_corpus(monkeypatch):
    from types import SimpleNamespace

    from seqebm.data import corpora
    from seqebm.training.jrf import wiki_sentences

    text = "Marx\u2019s ideas don't fit. They're \"here\", I'm sure! It's 3.5 km."
    monkeypatch.setattr(corpora, "load_corpus", lambda *a, **k: SimpleNamespace(split=lambda s: [text]))
    wiki_sentences.cache_clear()
    try:
        got = [" ".join(s) for s in wiki_sentences("/nonexistent")]
    finally:
        wiki_sentences.cache_clear()
    assert got == ["Marx 's ideas do n't fit .", "They 're \" here \" , I 'm sure !", "It 's 3.5 km ."]


def test_cli_commands_parse():
    import argparse

    from seqebm.training.jrf import register_ssl_commands

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register_ssl_commands(sub)
    parser = sub._name_parser_map["ssl"]
    a = parser.parse_args(["compare", "--configs", "a.yaml", "b.yaml", "--out", "o", "train.steps=5"])
    assert (a.configs, a.seeds, a.fractions, a.overrides) == (["a.yaml", "b.yaml"], [0, 1, 2], [0.02, 0.1],
                                                              ["train.steps=5"])
    a = parser.parse_args(["train", "--config", "c.yaml", "--run-dir", "r", "--resume"])
    assert a.resume and a.run_dir == "r" and callable(a.func)


def test_labelled_subsets_are_nested_and_keep_long_sentences(corpus):
    from seqebm.training.jrf import prepare_ssl_data

    small = prepare_ssl_data(tiny(corpus, "jrf", "data.labeled_fraction=0.1"))
    big = prepare_ssl_data(tiny(corpus, "jrf", "data.labeled_fraction=0.5"))
    other = prepare_ssl_data(tiny(corpus, "jrf", "data.labeled_fraction=0.5", "train.seed=1"))
    assert len(small.labeled) == 20 and small.labeled == big.labeled[:20] and other.labeled != big.labeled
    assert any(len(w) > 8 for w, _ in big.labeled)  # longer than m: kept for the CRF part
    assert all(1 <= len(s) <= 8 for s in big.pool) and len(big.pool) + len(big.labeled) + big.pool_too_long == 200
