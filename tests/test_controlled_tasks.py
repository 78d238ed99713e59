"""Controlled-generation recipes and ``seqebm generate`` (issue #12, parts 4-5): tiny end-to-end runs.

Data are tiny synthetic stand-ins (no downloads): Rotten-Tomatoes-like sentences whose label is carried by
sentiment words, and wiki-like paragraphs; the loaders are monkeypatched. Models are 1-layer, width 16,
trained for a few dozen steps: the tests check the bookkeeping (files, resumption, budgets, distinct
evaluation classifier, CLI errors), not the quality of the outputs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from seqebm.config import load_config
from seqebm.data.corpora import TextCorpus
from seqebm.data.text_classification import TextClassificationDataset
from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seqebm.training import controlled_parts as parts
from seqebm.training import controlled_tasks as tasks
from seqebm.training.controlled import GenerateConfig, register_generate_command, run_controlled

POS = ["great", "wonderful", "charming", "brilliant", "moving", "funny", "smart"]
NEG = ["dull", "awful", "boring", "tedious", "clumsy", "bland", "silly"]
NOUNS = ["movie", "film", "story", "cast", "script", "plot"]
PLACES = ["river", "city", "music", "history", "science", "language", "museum", "garden", "mountain", "library"]
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_len=24", "model.mlm_steps=20",
        "model.lm_steps=20", "model.fluency_lm_steps=20", "model.classifier_steps=20", "model.progress=false",
        "data.vocab_size=200", "data.num_sources=3", "data.max_words=12", "sampler.budget=8", "sampler.new_tokens=8",
        "eval.classifier=bow", "eval.fluency_lm=transformer", "distributional.fit_samples=64",
        "distributional.steps=3", "distributional.num_samples=8", "distributional.eval_every=2",
        "distributional.eval_samples=32", "distributional.max_new_tokens=8"]


def _sentence(rng: random.Random, label: int) -> str:
    w, n = (POS if label else NEG), rng.choice(NOUNS)
    return rng.choice([f"The {n} is {rng.choice(w)} and {rng.choice(w)}.",
                       f"A {rng.choice(w)} {n} with a {rng.choice(w)} {rng.choice(NOUNS)}.",
                       f"This {n} feels {rng.choice(w)} from start to finish."])


def tiny_rt(*_, **__) -> TextClassificationDataset:
    rng = random.Random(0)

    def split(k: int):
        ys = [i % 2 for i in range(k)]
        return [_sentence(rng, y) for y in ys], ys
    return TextClassificationDataset("rotten-tomatoes", ["rotten", "fresh"],
                                     {"train": split(240), "valid": split(40), "test": split(40)})


def tiny_wiki(*_, **__) -> TextCorpus:
    rng = random.Random(0)

    def para() -> str:
        return " ".join(f"The {rng.choice(PLACES)} near the {rng.choice(PLACES)} has a long {rng.choice(PLACES)} "
                        f"and a small {rng.choice(PLACES)}." for _ in range(3))
    return TextCorpus("wiki-mini", [para() for _ in range(120)], [para() for _ in range(10)],
                      [para() for _ in range(10)])


@pytest.fixture(autouse=True)
def _offline_data(monkeypatch):
    from seqebm.data import corpora
    from seqebm.data import text_classification as tc

    monkeypatch.setattr(tc, "load_rotten_tomatoes", tiny_rt)
    monkeypatch.setattr(corpora, "load_corpus", tiny_wiki)


def tiny_config(task: str, *extra: str) -> GenerateConfig:
    dataset = "wiki-mini" if task == "keywords" else "rotten-tomatoes"
    return load_config(GenerateConfig, None, TINY + [f"task={task}", f"data.dataset={dataset}", f"name=t-{task}",
                                                     *extra])


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory):
    """One tiny sentiment recipe run shared by the tests that only read it."""
    from seqebm.data import text_classification as tc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tc, "load_rotten_tomatoes", tiny_rt)
        run = tmp_path_factory.mktemp("gen") / "sentiment"
        cfg = tiny_config("sentiment")
        return cfg, run, run_controlled(cfg, run, log=lambda *_: None)


# ---------------------------------------------------------------------------------- recipes
def test_sentiment_run_writes_tables_samples_and_stays_in_budget(sentiment_run):
    cfg, run, res = sentiment_run
    assert json.loads((run / "results.json").read_text())["tables"].keys() == {"rotten-to-fresh", "fresh-to-rotten"}
    report = (run / "report.md").read_text()
    for col in ("attribute acc.", "BLEU to source", "fluency PPL", "acceptance (MH)", "energy evals"):
        assert col in report
    for key, rows in res["tables"].items():
        assert set(rows) == {"source (copy)", "mh", "cold", "snis"}
        assert rows["source (copy)"]["bleu"] == pytest.approx(100.0)
        assert rows["mh"]["acceptance"] is not None and rows["snis"]["ess"] is not None
        for sampler in ("mh", "cold", "snis"):
            outs = [json.loads(s) for s in (run / "samples" / f"{key}-{sampler}.jsonl").read_text().splitlines()]
            assert len(outs) == cfg.data.num_sources
            assert all(0 < o["energy_evals"] <= cfg.sampler.budget for o in outs)
            assert rows[sampler]["energy_evals_max"] <= cfg.sampler.budget
            assert 0.0 <= rows[sampler]["attribute_accuracy"] <= 1.0


def test_resume_neither_retrains_nor_regenerates(sentiment_run, monkeypatch):
    cfg, run, res = sentiment_run
    before = {p.name: p.stat().st_mtime_ns for p in (run / "components").glob("*.safetensors")}

    def boom(*_, **__):
        raise AssertionError("resume must reuse the cached components and samples")
    for name in ("train_lm", "train_mlm", "train_classifier"):
        monkeypatch.setattr(parts, name, boom)
    monkeypatch.setattr("seqebm.training.controlled.generate_one", boom)
    again = run_controlled(cfg, run, resume=True, log=lambda *_: None)
    assert again["tables"] == res["tables"]
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "components").glob("*.safetensors")}
    with pytest.raises(FileExistsError, match="already exists"):
        run_controlled(cfg, run, log=lambda *_: None)
    changed = load_config(GenerateConfig, run / "config.yaml", ["sampler.budget=6"])  # other settings: resample
    with pytest.raises(AssertionError, match="resume must reuse"):
        run_controlled(changed, run, resume=True, log=lambda *_: None)
    run_controlled(cfg, run, resume=True, log=lambda *_: None)  # the cached samples are still those of cfg


def test_keywords_run_reports_coverage(tmp_path):
    res = run_controlled(tiny_config("keywords"), tmp_path / "kw", log=lambda *_: None)
    rows = res["tables"]["keywords"]
    assert rows["held-out sentence"]["keyword_coverage"] == 1.0  # keywords are drawn from it
    assert rows["start (LM sample + keywords)"]["keyword_coverage"] == 1.0  # inserted into the start
    for s in ("mh", "cold", "snis"):
        assert 0.0 <= rows[s]["keyword_coverage"] <= 1.0 and rows[s]["energy_evals_max"] <= 8
    assert "keyword coverage (%)" in (tmp_path / "kw" / "report.md").read_text()


def test_prefix_run_keeps_the_prompt(tmp_path):
    cfg = tiny_config("prefix")
    res = run_controlled(cfg, tmp_path / "px", log=lambda *_: None)
    assert set(res["tables"]) == {"prefix-to-fresh", "prefix-to-rotten"}
    tok = parts.load_text_tokenizer(tmp_path / "px" / "components" / "tokenizer")
    for key in res["tables"]:
        for s in ("mh", "cold", "snis"):
            for o in map(json.loads, (tmp_path / "px" / "samples" / f"{key}-{s}.jsonl").read_text().splitlines()):
                prompt = tok.encode(o["prompt"])
                assert o["tokens"][: len(prompt)] == prompt
                if s != "snis":  # MH and COLD keep the length; SNIS may stop at EOS
                    assert len(o["tokens"]) == cfg.data.prompt_tokens + cfg.sampler.new_tokens


def test_distributional_run_fits_lambda_and_reports_kl(tmp_path):
    res = run_controlled(tiny_config("distributional"), tmp_path / "dc", log=lambda *_: None)
    d = res["distributional"]
    assert d["fit_converged"] and d["kl_target_vs_base"] > 0
    assert (d["lambda"] > 0) == (d["base"]["moment"] < d["target"])  # tilt toward the target
    assert [c["step"] for c in d["curve"]] == [0, 2, 3]
    assert (tmp_path / "dc" / "distributional.png").is_file() and (tmp_path / "dc" / "policy.safetensors").is_file()


# ---------------------------------------------------------------------------------- budgets and components
@pytest.mark.parametrize("budget", [8, 9, 64, 100])
@pytest.mark.parametrize("chains", [1, 2, 3])
def test_budget_plans_stay_within_the_budget(budget, chains):
    mh = tasks.budget_plan("mh", budget, mh_chains=chains)
    assert mh["max_evals"] == chains * (mh["num_steps"] + 1) <= budget < chains * (mh["num_steps"] + 2)
    for rescore in (False, True):
        if budget // chains < 3 + rescore:  # not even one Langevin step fits
            with pytest.raises(ValueError, match="no COLD step"):
                tasks.budget_plan("cold", budget, cold_chains=chains, cold_rescore=rescore)
            continue
        cold = tasks.budget_plan("cold", budget, cold_chains=chains, cold_rescore=rescore)
        assert cold["max_evals"] == chains * (cold["num_steps"] + 2 + rescore) <= budget
    assert tasks.budget_plan("snis", budget)["num_candidates"] == budget
    with pytest.raises(ValueError, match="no MH step"):
        tasks.budget_plan("mh", chains, mh_chains=chains)


def test_evaluation_classifier_is_distinct_from_the_energy_classifier(sentiment_run):
    cfg, run, _ = sentiment_run
    comps = tasks.load_components(cfg, run / "components")
    assert isinstance(comps.classifier, parts.CNNClassifier)
    assert isinstance(comps.eval_classifier, parts.BagOfNgramsClassifier)  # another architecture, reads text
    assert comps.stats["classifier"]["data"] == "train half A"
    assert comps.stats["eval_classifier"]["data"] == "train half B"
    texts = parts.load_task_texts("rotten-tomatoes", seed=cfg.seed)
    rebuilt = parts.BagOfNgramsClassifier.build(texts.train_b)
    assert comps.eval_classifier.ngrams == rebuilt.ngrams  # its features come from half B only
    names = [f"s{i}" for i in range(101)]
    a, b, _, _ = parts._halves(names, None, seed=3, cap=None)
    assert not set(a) & set(b) and len(a) + len(b) == 101


def test_cnn_classifier_ignores_right_padding():
    torch.manual_seed(0)
    clf = parts.CNNClassifier(30, dim=8, channels=4).eval()
    rows = [[5, 6, 7], [8, 9, 10, 11, 12]]
    ids, mask = parts._pad(rows)
    batched = clf(ids, mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i], clf(torch.tensor([r]))[0])


def test_banned_tokens_lm_never_emits_banned_ids():
    from seqebm.models.transformer import TransformerLM
    from seqebm.sampling.sampler import sample

    torch.manual_seed(0)
    lm = parts.BannedTokensLM(TransformerLM(12, d_model=8, n_layers=1, n_heads=2, max_len=10).eval(),
                              [PAD_ID, BOS_ID, UNK_ID])
    out = sample(lm, torch.tensor([[BOS_ID]]), max_new_tokens=8, num_samples=64, eos_id=EOS_ID,
                 generator=torch.Generator().manual_seed(0))
    real = out.tokens[out.mask]
    assert not bool(torch.isin(real, torch.tensor([PAD_ID, BOS_ID, UNK_ID])).any())
    assert bool(torch.isfinite(out.log_q).all())


def test_word_tokenizer_round_trip_and_keywords(tmp_path):
    tok = parts.WordTokenizer.train(["The film is great.", "The film is dull, sadly.", "great film"], 50, min_count=1)
    assert tok.decode(tok.encode("The film is great.")) == "the film is great."
    assert tok.encode("zebra") == [UNK_ID]
    tok.save(tmp_path)
    assert parts.load_text_tokenizer(tmp_path).encode("dull film") == tok.encode("dull film")
    assert parts.keyword_ids(tok, "Great") == tok.encode("great")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        parts.keyword_ids(tok, "zebra")
    with pytest.raises(ValueError, match="non-empty"):
        parts.keyword_ids(tok, " ")


# ---------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]):
    p = argparse.ArgumentParser()
    register_generate_command(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args, args.func(args)


def test_cli_generates_with_energy_specs(sentiment_run, capsys, tmp_path):
    _, run, _ = sentiment_run
    out = tmp_path / "o.jsonl"
    for sampler in ("mh", "cold", "snis"):
        args, rc = _cli(["generate", "--run-dir", str(run), "--energy", "ar:1.0", "--energy", "disc:positive:2.0",
                         "--energy", "hamming:0.5", "--sampler", sampler, "--source", "The film is dull and bland.",
                         "--num", "2", "--out", str(out)])
        assert rc == 0 and args.energy == ["ar:1.0", "disc:positive:2.0", "hamming:0.5"]
        lines = [json.loads(s) for s in out.read_text().splitlines()]
        assert len(lines) == 2 and all(o["energy_evals"] <= 8 for o in lines)
    printed = capsys.readouterr().out
    assert "acceptance" in printed and "ESS" in printed and "energy evaluations" in printed


def test_cli_task_subcommand_runs_a_recipe(tmp_path):
    from seqebm.config import save_config

    save_config(tiny_config("prefix", "data.num_sources=2", "sampler.samplers=[snis]"), tmp_path / "c.yaml")
    _, rc = _cli(["generate", "task", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r"),
                  "sampler.budget=6"])
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert rc == 0 and res["budget"] == 6 and res["samplers"] == ["snis"]


@pytest.mark.parametrize("argv, match", [
    (["--energy", "bogus:1.0"], "unknown expert 'bogus'"),
    (["--energy", "hamming:-1"], "finite and >= 0"),
    (["--energy", "hamming:heavy"], "numeric weight"),
    (["--energy", "hamming"], "has no weight"),
    (["--energy", "ar:1.0", "--energy", "keywords:2.0", "--keywords", "zyzzyva"], "outside the vocabulary"),
    (["--energy", "hamming:1.0", "--source", "   "], "source sentence is empty"),
    (["--energy", "disc:sideways:1.0", "--source", "the film is dull ."], "unknown attribute 'sideways'"),
])
def test_cli_errors_are_clear(sentiment_run, argv, match):
    _, run, _ = sentiment_run
    base = ["generate", "--run-dir", str(run), "--sampler", "mh"]
    if "--source" not in argv and "--keywords" not in argv:
        base += ["--source", "the film is dull ."]
    with pytest.raises(ValueError, match=match):
        _cli(base + argv)


def test_cli_needs_trained_components(tmp_path):
    cfg = tiny_config("sentiment")
    from seqebm.config import save_config

    (tmp_path / "empty").mkdir()
    save_config(cfg, tmp_path / "empty" / "config.yaml")
    with pytest.raises(FileNotFoundError, match="run the recipe first"):
        _cli(["generate", "--run-dir", str(tmp_path / "empty"), "--energy", "ar:1.0", "--source", "a film ."])


def test_shipped_generate_configs_load():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("generate-*.yaml"))
    assert {p.stem for p in configs} >= {"generate-sentiment", "generate-keywords", "generate-prefix"}
    for path in configs:
        cfg = load_config(GenerateConfig, path)
        assert cfg.name == path.stem and cfg.name != GenerateConfig().name
        text = path.read_text()
        assert f"--config configs/{path.name}" in text and "measured" in text.lower()


def test_bpe_tokenizer_recipe_and_keyword_phrases(tmp_path):
    cfg = tiny_config("sentiment", "data.tokenizer=bpe", "data.vocab_size=300", "data.max_words=20",
                      "model.max_len=30", "sampler.samplers=[mh,cold]", "data.num_sources=2")
    res = run_controlled(cfg, tmp_path / "bpe", log=lambda *_: None)
    assert all(r["mh"]["energy_evals_max"] <= 8 for r in res["tables"].values())
    tok = parts.load_text_tokenizer(tmp_path / "bpe" / "components" / "tokenizer")
    assert parts.keyword_ids(tok, "charming") == tok.encode(" charming")  # a phrase of sub-word ids
