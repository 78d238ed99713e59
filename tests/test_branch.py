"""Snapshots and branched runs: an E-Forcing run branched from a teacher-forcing run's snapshot at the
CD start step is the same run as one trained from scratch, and bad branches are refused."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from seqebm.cli import main

from test_cli import TINY, _err, corpus  # noqa: F401  (module-scoped corpus fixture)

BASE = [*TINY, "train.max_steps=8", "train.checkpoint_every=100", "train.log_every=1"]
EF = ["objective.name=eforcing", "objective.ef_start_step=4", "objective.ef_num_steps=6"]


def _weights(run):
    return {k: v for k, v in load_file(str(run / "checkpoint.safetensors")).items() if k.startswith("model.")}


def _curve(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("branch")
    data = f"data.corpus={corpus}"
    assert main(["train", "--run-dir", str(root / "tf"), data, *BASE, "train.snapshot_at=[4]"]) == 0
    assert main(["train", "--run-dir", str(root / "ef"), data, *BASE, *EF]) == 0
    assert main(["train", "--run-dir", str(root / "br"), "--branch-from", str(root / "tf/snapshots/step-4"),
                 *EF]) == 0
    return root


def test_snapshot_is_the_run_folder_at_that_step(runs):
    snap = runs / "tf/snapshots/step-4"
    for name in ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "config.yaml",
                 "tokenizer/tokenizer.json"):
        assert (snap / name).exists(), name
    assert not any((snap / n).exists() for n in ("snapshots", "results.json", "report.md"))
    assert max(r["step"] for r in _curve(snap)) == 4
    with safe_open(str(snap / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["trainer_state"])
    assert state["step"] == 4


def test_branched_run_equals_the_run_from_scratch(runs):
    br, ef, tf = runs / "br", runs / "ef", runs / "tf"
    assert json.loads((br / "branch.json").read_text())["step"] == 4
    assert "eforcing" in (br / "config.yaml").read_text()
    a, b, c = _weights(ef), _weights(br), _weights(tf)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)  # the CD term did change the weights after step 4
    assert _curve(br) == _curve(ef)
    assert json.loads((br / "results.json").read_text())["steps"] == 8


def test_bad_branches_are_refused(runs, capsys):
    snap = str(runs / "tf/snapshots/step-4")
    err = _err(capsys, ["train", "--run-dir", str(runs / "x1"), "--branch-from", snap, "model.d_model=16"])
    assert "differs in model.d_model" in err and not (runs / "x1").exists()
    err = _err(capsys, ["train", "--run-dir", str(runs / "x2"), "--branch-from", snap, "train.max_steps=4"])
    assert "does not go past the branch step 4" in err
    err = _err(capsys, ["train", "--run-dir", str(runs / "br"), "--branch-from", snap, *EF])
    assert "already exists" in err
    err = _err(capsys, ["train", "--run-dir", str(runs / "x3"), "--branch-from", str(runs / "nope")])
    assert "nope/config.yaml" in err and "not found" in err
    err = _err(capsys, ["train", "--run-dir", str(runs / "tf"), "--resume", "objective.name=eforcing"])
    assert "--branch-from" in err


def test_resume_with_a_larger_budget_updates_the_config(runs):
    with pytest.warns(UserWarning, match="cosine spans train.max_steps"):  # the default schedule
        assert main(["train", "--run-dir", str(runs / "tf"), "--resume", "train.max_steps=10"]) == 0
    assert "max_steps: 10" in (runs / "tf/config.yaml").read_text()
    assert json.loads((runs / "tf/results.json").read_text())["steps"] == 10
