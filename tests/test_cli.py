"""The command line end to end on a small user corpus, and every bad-input case of issue #2."""

import json
import random

import pytest

from seqebm.cli import main

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=24", "data.batch_size=8",
        "data.tokenizer=char", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
        "train.progress=false", "eval.num_samples=2", "eval.sample_tokens=10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran far away quickly slowly".split()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(300)))
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--run-dir", str(run_dir), f"data.corpus={corpus}", "name=tiny", *TINY]) == 0
    return run_dir


def test_train_writes_run_folder(run):
    for name in ("config.yaml", "checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "curves.png",
                 "results.json", "report.md", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and results["test"]["ppl"] > 1
    assert "| ppl |" in (run / "report.md").read_text()


def test_eval_reproduces_results(run, capsys):
    assert main(["eval", "--run-dir", str(run), "--split", "test", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = json.loads((run / "results.json").read_text())["test"]["ppl"]
    assert out["test"]["ppl"] == pytest.approx(expected, rel=1e-6)
    # evaluation settings may be overridden (batching changes nothing); model settings are refused
    assert main(["eval", "--run-dir", str(run), "--split", "test", "--device", "cpu", "data.eval_batch_size=3"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["ppl"] == pytest.approx(expected, rel=1e-5)
    err = _err(capsys, ["eval", "--run-dir", str(run), "--device", "cpu", "model.d_model=8"])
    assert "data.* or eval.*" in err and "model.d_model=8" in err


def test_sample_writes_jsonl(run, tmp_path):
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run-dir", str(run), "-n", "3", "--max-new-tokens", "8", "--top-k", "5",
                 "--prompt", "the ", "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"].startswith("the ") for r in rows)
    assert all(r["log_q"] >= r["log_p"] - 1e-6 and r["token_ids"] for r in rows)  # top-k at T = 1


def test_resume_continues_to_more_steps(run, capsys):
    assert main(["train", "--run-dir", str(run), "--resume", "train.max_steps=8"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 8


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    assert "wiki-mini" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input: clear error, nothing lost
def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(run, corpus, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    err = _err(capsys, ["train", "--run-dir", str(run), f"data.corpus={corpus}", *TINY])
    assert "run folder already exists" in err and "nothing was overwritten" in err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*")}


def test_missing_corpus_file(tmp_path, capsys):
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "x"), f"data.corpus={tmp_path / 'nope.txt'}", *TINY])
    assert "no such file or directory" in err and "nope.txt" in err


def test_empty_corpus_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "x"), f"data.corpus={empty}", *TINY])
    assert "is empty" in err and "empty.txt" in err


def test_unknown_corpus_name(tmp_path, capsys):
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "x"), "data.corpus=wiki-huge", *TINY])
    assert "unknown corpus 'wiki-huge'" in err and "wiki-mini" in err


def test_unknown_config_key(tmp_path, capsys):
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "x"), "model.layers=3"])
    assert "unknown config key 'model.layers'" in err
    assert not (tmp_path / "x").exists()


def test_tokenizer_checkpoint_vocabulary_mismatch(run, tmp_path, capsys):
    import shutil

    from seqebm.data.tokenizers import CharTokenizer

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    shutil.rmtree(bad / "tokenizer")
    CharTokenizer(["a", "b", "c"]).save(bad / "tokenizer")
    err = _err(capsys, ["eval", "--run-dir", str(bad), "--device", "cpu"])
    assert "does not fit this model" in err and "vocabulary" in err


def test_corrupt_or_truncated_checkpoint(run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    data = (bad / "checkpoint.safetensors").read_bytes()
    (bad / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    err = _err(capsys, ["train", "--run-dir", str(bad), "--resume"])
    assert "corrupt or truncated" in err
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    err = _err(capsys, ["eval", "--run-dir", str(bad), "--device", "cpu"])
    assert "corrupt or truncated" in err


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("name: x\n")
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "r"), "--resume"])
    assert "no checkpoint" in err


def test_missing_run_folder(tmp_path, capsys):
    err = _err(capsys, ["eval", "--run-dir", str(tmp_path / "none")])
    assert "run folder not found" in err


def test_residual_ebm_on_top_of_a_run_trains_resumes_and_reports_bounds(run, corpus, tmp_path, capsys):
    """model.arch=residual: offline negatives, conditional NCE, perplexity bounds; resuming or another energy
    (data.residual.negatives_dir) reuses the negatives."""
    res = tmp_path / "res"
    args = ["train", "--run-dir", str(res), f"data.corpus={corpus}", "model.arch=residual", f"model.base_run={run}",
            "objective.name=cnce", "data.batch_size=8", "data.residual.prefix_len=8", "data.residual.cont_len=4",
            "data.residual.num_negatives=3", "data.residual.bound_samples=4", "data.residual.max_eval_rows=16",
            "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.progress=false",
            "eval.num_samples=2", "optim.warmup_steps=1"]
    assert main(args) == 0
    results = json.loads((res / "results.json").read_text())
    assert 0 <= results["valid"]["accuracy"] <= 1
    t = results["test"]
    assert t["joint_ppl_lower"] <= t["joint_ppl_upper"] and t["lm_ppl"] > 1
    manifest = (res / "negatives" / "train" / "manifest.json").read_text()
    assert main(["train", "--run-dir", str(res), "--resume", "train.max_steps=6"]) == 0
    assert (res / "negatives" / "train" / "manifest.json").read_text() == manifest
    assert json.loads((res / "results.json").read_text())["steps"] == 6

    # a second energy reuses the first run's negatives (same LM, prefixes, settings) without resampling
    shard = res / "negatives" / "train" / "shard-00000.safetensors"
    mtime = shard.stat().st_mtime_ns
    bit = args[3:]  # everything but "train --run-dir <res>"
    assert main(["train", "--run-dir", str(tmp_path / "bit"), *bit, "model.energy=bit", "model.d_model=16",
                 "model.n_layers=1", "model.n_heads=2", f"data.residual.negatives_dir={res / 'negatives'}"]) == 0
    assert shard.stat().st_mtime_ns == mtime and not (tmp_path / "bit" / "negatives").exists()
    # other sampling settings against the same folder: refused, nothing mixed in
    err = _err(capsys, ["train", "--run-dir", str(tmp_path / "bad"), *bit, "data.residual.num_negatives=2",
                        f"data.residual.negatives_dir={res / 'negatives'}"])
    assert "different run" in err
    assert (res / "negatives" / "train" / "manifest.json").read_text() == manifest


def test_ralm_baseline_on_top_of_a_run(run, corpus, tmp_path):
    """model.arch=ralm: the base LM frozen, a residual LM trained by exact likelihood (seed Eq. 6)."""
    res = tmp_path / "ralm"
    args = ["train", "--run-dir", str(res), f"data.corpus={corpus}", "model.arch=ralm", f"model.base_run={run}",
            *[a for a in TINY if not a.startswith("data.tokenizer")]]
    assert main(args) == 0
    results = json.loads((res / "results.json").read_text())
    base = json.loads((run / "results.json").read_text())
    assert results["test"]["ppl"] > 1 and results["params"] > base["params"]
