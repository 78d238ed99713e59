"""JEM on digits (seqebm.training.jem): tiny end-to-end runs of both recipes, the comparison table,
exact resumption, config validation, the labeled subset and the OOD sets."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqebm.config import load_config
from seqebm.training.jem import (CHECKPOINT, JemConfig, balanced_subset, check_label_budget, compare_jem, ood_sets,
                                 register_jem_commands, run_jem)

ROOT = Path(__file__).parents[1]
CONFIGS = [ROOT / "configs" / "jem-digits.yaml", ROOT / "configs" / "jem-digits-supervised.yaml"]
TINY = ["model.hidden=16", "model.depth=1", "optim.steps=6", "optim.labeled_batch=8", "optim.unlabeled_batch=16",
        "objective.sgld_steps=2", "objective.buffer_size=64", "eval.every=3", "eval.sample_steps=3",
        "eval.samples_per_class=2", "eval.ood_size=32", "optim.progress=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    return TINY + [f"data.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    return out, compare_jem(CONFIGS, [0], [20], out, tiny, log=lambda *a: None)


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    return not isinstance(tree, float) or math.isfinite(tree)


def test_recipes_load_with_matching_names() -> None:
    for path in CONFIGS:
        cfg = load_config(JemConfig, path)
        assert cfg.name == path.stem
    jem, sup = (load_config(JemConfig, p) for p in CONFIGS)
    assert sup.objective.alpha_g == 0 < jem.objective.alpha_g
    assert sup.model == jem.model and sup.optim == jem.optim and sup.data == jem.data  # only alpha_g differs


def test_tiny_runs_of_both_recipes(compared) -> None:
    out, _ = compared
    for stem, kind in (("jem-digits", "jem"), ("jem-digits-supervised", "supervised")):
        run = out / f"{stem}-n20-s0"
        res = json.loads((run / "results.json").read_text())
        assert res["kind"] == kind and res["num_labels"] == 20 and res["labeled_per_class"] == [2] * 10
        assert res["steps"] == 6 and res["diverged_at"] is None and _finite(res)
        t = res["test"]
        for k in ("accuracy", "nll", "ece", "ece_classwise", "ece_ts", "ece_classwise_ts", "nll_ts", "temperature"):
            assert math.isfinite(t[k])
        assert 0 <= t["accuracy"] <= 1 and t["temperature"] > 0
        assert set(res["ood"]) == {"noise", "flipped", "shuffled"}
        assert all(0 <= v <= 1 for d in res["ood"].values() for v in d.values())
        for f in ("config.yaml", "metrics.jsonl", "model.safetensors", CHECKPOINT, "report.md", "reliability.png",
                  "reliability_ts.png", "curves.png"):
            assert (run / f).is_file(), f
        assert ((run / "samples.png").is_file() and (run / "buffer.png").is_file()) == (kind == "jem")
        assert ("samples" in res) == (kind == "jem")
        report = (run / "report.md").read_text()
        assert "| test |" in report and "![reliability](reliability.png)" in report


def test_compare_writes_table_and_reuses_finished_runs(compared, tiny) -> None:
    out, summary = compared
    assert set(summary) == {"jem-digits-n20", "jem-digits-supervised-n20"}
    text = (out / "comparison.md").read_text()
    assert "| config | labels | accuracy (%) |" in text and "AUROC flipped log p(x)" in text
    assert "| jem-digits | 20 |" in text and "| jem-digits-supervised | 20 |" in text
    assert json.loads((out / "comparison.json").read_text())["labels"] == [20]
    # re-running reuses the finished runs: nothing is retrained or rewritten
    ckpt = out / "jem-digits-n20-s0" / CHECKPOINT
    stamp = ckpt.stat().st_mtime_ns
    logs: list[str] = []
    again = compare_jem(CONFIGS, [0], [20], out, tiny, log=logs.append)
    assert ckpt.stat().st_mtime_ns == stamp and sum("not retraining" in m for m in logs) == 2
    assert again["jem-digits-n20"]["accuracy (%)"]["values"] == summary["jem-digits-n20"]["accuracy (%)"]["values"]


def test_resume_is_exact_and_cli(tmp_path, tiny, compared) -> None:
    full_dir = compared[0] / "jem-digits-n20-s0"  # the uninterrupted 6-step run
    full = load_config(JemConfig, full_dir / "config.yaml")
    # the same run cut at step 3, then resumed (through the CLI) to step 6
    parser = argparse.ArgumentParser()
    register_jem_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["jem", "train", "--config", str(CONFIGS[0]), "--run-dir", str(tmp_path / "cut"),
                              *tiny, "data.num_labels=20", "optim.steps=3"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["steps"] == 3
    args = parser.parse_args(["jem", "train", "--run-dir", str(tmp_path / "cut"), "--resume", "optim.steps=6"])
    assert args.func(args) == 0
    a, b = load_file(str(full_dir / CHECKPOINT)), load_file(str(tmp_path / "cut" / CHECKPOINT))
    for k in a:
        if k.startswith(("model.", "extra.replay.", "extra.gen", "optim.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full_dir, tmp_path / "cut"))
    assert ra["test"] == rb["test"] and ra["ood"] == rb["ood"]
    # a finished run is not retrained, and a fresh run refuses a non-empty folder
    stamp = (full_dir / CHECKPOINT).stat().st_mtime_ns
    assert run_jem(full, full_dir, resume=True, log=lambda *a: None)["test"] == ra["test"]
    assert (full_dir / CHECKPOINT).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        run_jem(full, full_dir, log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run_jem(full, tmp_path / "nothing", resume=True)
    c = parser.parse_args(["jem", "compare", "--configs", "a.yaml", "--out", "x"])
    assert (c.seeds, c.labels, c.overrides) == ([0, 1, 2], [50, 100], [])


def test_config_validation(tmp_path, tiny) -> None:
    bad = {"data.num_labels=0": "labeled fraction is 0", "data.num_labels=5": "at least one labeled digit per class",
           "model.arch=resnet": "model.arch", "objective.buffer_size=8": "buffer_size",
           "objective.reinit_prob=2": "reinit_prob", "optim.steps=0": "optim.steps", "eval.num_bins=0": "num_bins",
           "objective.alpha_d=0": None, "data.colour=1": "unknown config key"}
    for override, msg in bad.items():
        if msg is None:
            with pytest.raises(ValueError, match="both 0"):
                load_config(JemConfig, None, [override, "objective.alpha_g=0"])
            continue
        with pytest.raises(ValueError, match=msg):
            load_config(JemConfig, None, [override])
    cfg = load_config(JemConfig, None, ["data.num_labels=1437"])
    with pytest.raises(ValueError, match="unlabeled pool is empty"):
        check_label_budget(cfg, 1437)
    check_label_budget(load_config(JemConfig, None, ["data.num_labels=1437", "objective.alpha_g=0"]), 1437)
    with pytest.raises(ValueError, match="exceeds the 1437 training digits"):
        run_jem(load_config(JemConfig, None, tiny + ["data.num_labels=5000"]), tmp_path / "r")
    assert not (tmp_path / "r").exists()  # checked before the run folder is made


def test_pretraining_uses_no_labels_then_only_labels(tmp_path, tiny, monkeypatch) -> None:
    """objective.pretrain_steps (§5.4): p(x) alone first, then p(y|x) alone; selection after pre-training."""
    from seqebm.objectives.jem import JEMLoss

    calls, forward = [], JEMLoss.forward

    def spy(self, model, lx, ly, ux, generator=None):
        calls.append((lx is None, ux is None, self.alpha_d, self.alpha_g))
        return forward(self, model, lx, ly, ux, generator=generator)

    monkeypatch.setattr(JEMLoss, "forward", spy)
    cfg = load_config(JemConfig, ROOT / "configs" / "jem-digits-pretrain.yaml",
                      tiny + ["data.num_labels=20", "objective.pretrain_steps=3", "eval.sample_steps=0"])
    res = run_jem(cfg, tmp_path / "pre", log=lambda *a: None)
    assert res["kind"] == "pretrain" and res["best_step"] == 6 and _finite(res)
    assert calls == [(True, False, 0.0, 1.0)] * 3 + [(False, True, 1.0, 0.0)] * 3
    assert "pre-training" in (tmp_path / "pre" / "report.md").read_text()
    for bad, msg in (("objective.pretrain_steps=6", "no step would be left"), ("objective.pretrain_steps=-1", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            load_config(JemConfig, None, tiny + [bad])
    with pytest.raises(ValueError, match="needs alpha_g > 0"):
        load_config(JemConfig, None, tiny + ["objective.pretrain_steps=2", "objective.alpha_g=0"])


def test_balanced_subset_and_ood_sets() -> None:
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    idx = balanced_subset(labels, 25, seed=3)
    counts = torch.bincount(labels[idx], minlength=10)
    assert idx.unique().numel() == 25 and counts.min() == 2 and counts.max() == 3
    assert torch.equal(idx, balanced_subset(labels, 25, seed=3))
    assert not torch.equal(idx, balanced_subset(labels, 25, seed=4))
    x = torch.rand(7, 64) * 2 - 1
    sets = ood_sets(x, 10)
    assert all(v.shape == (10, 64) and v.min() >= -1 and v.max() <= 1 for v in sets.values())
    torch.testing.assert_close(sets["flipped"][:7].view(7, 8, 8).flip(1, 2).reshape(7, 64), x)
    torch.testing.assert_close(sets["shuffled"][:7].sort(1).values, x.sort(1).values)
