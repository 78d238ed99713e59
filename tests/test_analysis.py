"""`seqebm analyze`: tables over fake run folders (numbers checked by hand) and the exposure-bias test
(E-Forcing §5.3, Tab. 4) on two tiny untrained translation models, with its batched scoring checked
against a per-token loop."""

import argparse
import json
import math
import shutil

import pytest
import torch

from seqebm.config import load_config, save_config
from seqebm.data.tokenizers import BOS_ID
from seqebm.eval.analysis import (
    exposure_bias,
    format_mean_std,
    greedy_decode_ids,
    load_runs,
    mean_std,
    reference_log_probs,
    register_analysis_commands,
)
from seqebm.training.checkpoint import save_model
from seqebm.training.experiment import ExperimentConfig, build_model_for, build_task


def _analyze(argv):
    parser = argparse.ArgumentParser(prog="seqebm")
    register_analysis_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def _fake_run(root, name, overrides, results, metrics=None):
    run = root / name
    run.mkdir(parents=True)
    save_config(load_config(ExperimentConfig, None, overrides), run / "config.yaml")
    (run / "results.json").write_text(json.dumps(results))
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


@pytest.fixture
def seed_runs(tmp_path):
    """Teacher forcing: 3 seeds, test ppl 10, 12, 14. E-Forcing (start epoch 5): 2 seeds, ppl 9, 10."""
    runs = []
    for seed, ppl in enumerate([10.0, 12.0, 14.0]):
        results = {"name": "x", "valid": {"loss": 2.0 + seed}, "test": {"ppl": ppl, "loss": math.log(ppl)}}
        runs.append(_fake_run(tmp_path / "runs", f"tf{seed}", [f"train.seed={seed}"], results))
    for seed, ppl in enumerate([9.0, 10.0]):
        runs.append(_fake_run(tmp_path / "runs", f"ef{seed}", [f"train.seed={seed}", "objective.name=eforcing",
                                                                "objective.ef_start_epoch=5"],
                              {"name": "x", "valid": {"loss": 1.0}, "test": {"ppl": ppl, "loss": math.log(ppl)}}))
    return runs


def test_mean_std_is_the_sample_std():
    """[10, 12, 14]: mean 12, squared deviations 4 + 0 + 4 = 8, / (n − 1) = 4, std 2."""
    s = mean_std([10.0, 12.0, 14.0])
    assert (s.mean, s.std, s.n) == (12.0, 2.0, 3)
    assert format_mean_std(s) == "12.00 ± 2.00"
    assert format_mean_std(mean_std([3.0]), 1) == "3.0" and mean_std([3.0]).std is None
    assert format_mean_std(mean_std([])) == "n/a"
    assert format_mean_std(s, expected_n=4) == "12.00 ± 2.00 (n=3)"


def test_summary_groups_runs_and_reports_mean_std(seed_runs, tmp_path, capsys):
    """E-Forcing [9, 10]: mean 9.5, std sqrt(0.5²·2 / 1) = 0.7071."""
    out = tmp_path / "out"
    assert _analyze(["summary", *map(str, seed_runs), "--metrics", "test.ppl", "valid.loss",
                     "--group-by", "objective.name", "--out", str(out)]) == 0
    data = json.loads((out / "summary.json").read_text())
    groups = {g["group"]["objective.name"]: g for g in data["groups"]}
    assert list(groups) == ["eforcing", "teacher_forcing"]  # sorted by value
    tf, ef = groups["teacher_forcing"], groups["eforcing"]
    assert tf["metrics"]["test.ppl"]["mean"] == 12.0 and tf["metrics"]["test.ppl"]["std"] == 2.0
    assert tf["seeds"] == [0, 1, 2] and tf["metrics"]["valid.loss"]["mean"] == 3.0
    assert ef["metrics"]["test.ppl"]["mean"] == 9.5
    assert ef["metrics"]["test.ppl"]["std"] == pytest.approx(math.sqrt(0.5))
    md = (out / "summary.md").read_text()
    assert "| teacher_forcing | 3 | 0, 1, 2 | 12.00 ± 2.00 | 3.00 ± 1.00 |" in md
    assert "| eforcing | 2 | 0, 1 | 9.50 ± 0.71 | 1.00 ± 0.00 |" in md
    assert "12.00 ± 2.00" in capsys.readouterr().out  # the table is printed
    # E-Forcing differs from teacher forcing in ef_start_epoch too, but within each group only seeds differ
    assert "also differ" not in md


def test_summary_start_epoch_sweep_and_partial_metrics(tmp_path):
    """Tab. 9 style: group on ef_start_epoch (None sorts first); a metric missing in one run shows its n."""
    root = tmp_path / "runs"
    runs = [_fake_run(root, "a", ["objective.ef_start_epoch=10", "train.seed=0"], {"test": {"ppl": 30.0}}),
            _fake_run(root, "b", ["objective.ef_start_epoch=10", "train.seed=1"], {"test": {"ppl": 31.0, "x": 1}}),
            _fake_run(root, "c", ["objective.ef_start_epoch=5", "train.seed=0"], {"test": {"ppl": 33.0, "x": 2}}),
            _fake_run(root, "d", ["train.seed=0"], {"test": {"ppl": 35.0, "x": 3}})]
    _analyze(["summary", *map(str, runs), "--metrics", "test.ppl", "test.x", "--group-by", "objective.ef_start_epoch",
              "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| none", "| 5.0", "| 10.0"]
    assert "| 10.0 | 2 | 0, 1 | 30.50 ± 0.71 | 1.00 (n=1) |" in md
    assert "test.x is absent in run(s) a" in md


def test_summary_notes_config_differences_and_repeated_seeds(tmp_path):
    root = tmp_path / "runs"
    runs = [_fake_run(root, "a", ["optim.lr=0.1"], {"test": {"ppl": 1.0}}),
            _fake_run(root, "b", ["optim.lr=0.2"], {"test": {"ppl": 2.0}})]
    _analyze(["summary", *map(str, runs), "--metrics", "test.ppl", "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "runs also differ in optim.lr" in md and "train.seed repeats" in md


def test_summary_errors_name_the_problem(seed_runs, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"unknown key 'test\.pplx'.*test has loss, ppl.*top-level keys: name, test"):
        _analyze(["summary", *map(str, seed_runs), "--metrics", "test.pplx", *out])
    with pytest.raises(ValueError, match=r"unknown key 'objective\.nam'.*top-level keys: data, eval, model"):
        _analyze(["summary", *map(str, seed_runs), "--metrics", "test.ppl", "--group-by", "objective.nam", *out])
    with pytest.raises(ValueError, match="is a section, not a value"):
        _analyze(["summary", *map(str, seed_runs), "--metrics", "test.ppl", "--group-by", "objective", *out])
    with pytest.raises(ValueError, match="is not a number"):
        _analyze(["summary", str(seed_runs[0]), "--metrics", "test", *out])
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        _analyze(["summary", str(tmp_path / "nope"), "--metrics", "test.ppl", *out])
    (seed_runs[0] / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        _analyze(["summary", str(seed_runs[0]), "--metrics", "test.ppl", *out])
    assert not (tmp_path / "o").exists()


def test_outputs_are_never_overwritten_silently(seed_runs, tmp_path):
    out = tmp_path / "o"
    argv = ["summary", *map(str, seed_runs), "--metrics", "test.ppl", "--out", str(out)]
    _analyze(argv)
    (out / "summary.md").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite .*summary.md.*--force"):
        _analyze(argv)
    assert (out / "summary.md").read_text() == "mine"
    _analyze(argv + ["--name", "other"])  # another stem is fine
    _analyze(argv + ["--force"])
    assert "12.00 ± 2.00" in (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["other.json", "other.md", "summary.json", "summary.md"]


def test_curves_writes_png_and_table(tmp_path):
    root = tmp_path / "runs"
    runs = []
    for name, obj in (("base", "teacher_forcing"), ("ef", "eforcing")):
        metrics = [{"split": "train", "step": s, "epoch": 0, "loss": 3.0 - 0.1 * s, "nll": 3.0 - 0.1 * s}
                   for s in range(1, 11)]
        metrics += [{"split": "valid", "step": s, "loss": 2.5 - 0.05 * s + (0.1 if s == 10 else 0), "ppl": 9.0}
                    for s in (5, 10)]
        runs.append(_fake_run(root, name, [f"objective.name={obj}"], {}, metrics))
    with (runs[1] / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "st')  # a line cut short by a killed run
    out = tmp_path / "o"
    _analyze(["curves", *map(str, runs), "--keys", "loss", "nll", "--label-by", "objective.name", "--out", str(out)])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "curves.md").read_text()
    # valid loss: step 5 -> 2.25, step 10 -> 2.1 (2.0 + 0.1 bump): last 2.1, best 2.1 at step 10
    assert "| teacher_forcing | base | loss | 2.0000 (step 10) | 2.1000 (step 10) | 2.1000 (step 10) |" in md
    assert "| eforcing | ef | nll | 2.0000 (step 10) | n/a | n/a |" in md
    assert "skipped 1 malformed line" in md
    series = json.loads((out / "curves.json").read_text())["series"]
    assert len(series) == 4 and series[0]["valid"] == [[5, 2.25], [10, pytest.approx(2.1)]]
    with pytest.raises(ValueError, match="key 'bleu' is in no run's metrics.jsonl; available keys: loss, nll, ppl"):
        _analyze(["curves", *map(str, runs), "--keys", "bleu", "--out", str(tmp_path / "o2")])
    with pytest.raises(FileExistsError):
        _analyze(["curves", *map(str, runs), "--out", str(out)])


def test_length_buckets_table_with_missing_keys(tmp_path):
    """Greedy <10: runs a, b give 40, 42 -> 41.00 ± 1.41; run c predates the per-length keys."""
    root = tmp_path / "runs"
    runs = [_fake_run(root, "a", ["train.seed=0"], {"test": {"bleu_greedy": 30.0, "bleu_by_length_greedy":
                                                              {"<10": 40.0, "10-19": 30.0, ">=50": None}}}),
            _fake_run(root, "b", ["train.seed=1"], {"test": {"bleu_greedy": 32.0, "bleu_by_length_greedy":
                                                              {">=50": 10.0, "<10": 42.0, "10-19": 34.0}}}),
            _fake_run(root, "c", ["train.seed=2"], {"test": {"bleu_greedy": 34.0}})]
    out = tmp_path / "o"
    _analyze(["length-buckets", *map(str, runs), "--out", str(out)])
    md = (out / "length_buckets.md").read_text()
    assert "| objective.name | decoding | runs with key | <10 | 10-19 | >=50 | all |" in md
    assert "| teacher_forcing | greedy | 2/3 | 41.00 ± 1.41 | 32.00 ± 2.83 | 10.00 (n=1) | 32.00 ± 2.00 |" in md
    assert "| teacher_forcing | beam5 | 0/3 | n/a | n/a | n/a | n/a |" in md
    assert "`test.bleu_by_length_greedy` is absent in run(s) c\n" in md
    assert "`test.bleu_by_length_beam5` is absent in every run" in md
    rows = json.loads((out / "length_buckets.json").read_text())["rows"]
    assert rows[0]["buckets"]["<10"]["values"] == [40.0, 42.0] and rows[0]["runs_without_key"] == ["c"]


def test_length_buckets_accepts_rows_with_counts(tmp_path):
    """bleu_by_length's own row format ({"bucket", "count", "bleu"}) is read too."""
    run = _fake_run(tmp_path / "runs", "a", [], {"test": {"bleu_by_length_greedy": [
        {"bucket": "[0, 25)", "count": 3, "bleu": 20.0}, {"bucket": "[25, 49)", "count": 0, "bleu": None}]}})
    _analyze(["length-buckets", str(run), "--decodings", "greedy", "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "length_buckets.md").read_text()
    assert "| teacher_forcing | greedy | 1/1 | 20.00 | n/a | n/a |" in md


def test_text_metrics_table_with_missing_values(tmp_path):
    """ROUGE-1 of 60, 62 -> 61.00 ± 1.41; METEOR null in both (no WordNet) -> n/a; ROUGE-2 in one run."""
    root = tmp_path / "runs"
    runs = [_fake_run(root, "a", ["train.seed=0"], {"test": {"rouge1": 60.0, "rougeL": 50.0, "rouge2": 40.0,
                                                              "meteor": None, "bleu_beam5": 30.0,
                                                              "bleu_greedy": 29.0}}),
            _fake_run(root, "b", ["train.seed=1"], {"test": {"rouge1": 62.0, "rougeL": 52.0, "meteor": None,
                                                              "bleu_beam5": 31.0, "bleu_greedy": 30.0}})]
    out = tmp_path / "o"
    _analyze(["text-metrics", *map(str, runs), "--label-by", "objective.name", "--out", str(out)])
    md = (out / "text_metrics.md").read_text()
    assert "| objective.name | n | ROUGE-1 | ROUGE-2 | ROUGE-L | METEOR | BLEU (beam 5) | BLEU (greedy) |" in md
    assert ("| teacher_forcing | 2 | 61.00 ± 1.41 | 40.00 (n=1) | 51.00 ± 1.41 | n/a | 30.50 ± 0.71 "
            "| 29.50 ± 0.71 |") in md
    assert "`test.rouge2` is absent in 1 of 2 runs" in md and "absent in every run (n/a): `test.meteor`" in md
    _analyze(["text-metrics", *map(str, runs), "--beam-size", "4", "--out", str(out), "--name", "b4"])
    assert "BLEU (beam 4)" in (out / "b4.md").read_text()
    beam3 = _fake_run(root, "c", ["eval.beam_size=3"], {"test": {"bleu_beam3": 20.0}})
    _analyze(["text-metrics", str(beam3), "--out", str(out), "--name", "b3"])  # the run's own beam size
    assert "| BLEU (beam 3) |" in (out / "b3.md").read_text() and "| 20.00 |" in (out / "b3.md").read_text()
    with pytest.raises(ValueError, match=r"different beam sizes \(eval.beam_size \[3, 5\]\).*--beam-size"):
        _analyze(["text-metrics", *map(str, runs), str(beam3), "--out", str(out), "--name", "mixed"])


# --------------------------------------------------------------------------- exposure bias

TINY_TRANSLATION = ["data.corpus=synthetic-translation", "data.synthetic.n_words=30", "data.synthetic.n_train=200",
                    "data.synthetic.n_valid=10", "data.synthetic.n_test=20", "data.tokenizer=bpe",
                    "data.vocab_size=400", "model.arch=seq2seq", "model.d_model=16", "model.n_layers=1",
                    "model.n_heads=2", "model.max_len=256"]


@pytest.fixture(scope="module")
def translation_runs(tmp_path_factory):
    """Two run folders with one tokenizer and differently initialised (untrained) models."""
    root = tmp_path_factory.mktemp("translation")
    runs = []
    for i, name in enumerate(("baseline", "candidate")):
        cfg = load_config(ExperimentConfig, None, TINY_TRANSLATION + [f"train.seed={i}", f"name={name}"])
        run = root / name
        run.mkdir()
        if runs:
            shutil.copytree(runs[0] / "tokenizer", run / "tokenizer")
        save_config(cfg, run / "config.yaml")
        task = build_task(cfg, run)
        torch.manual_seed(i)
        save_model(build_model_for(cfg, task), run / "model.safetensors")
        runs.append(run)
    return runs


def _task_and_model(run):
    cfg = load_config(ExperimentConfig, run / "config.yaml")
    task = build_task(cfg, run)
    model = build_model_for(cfg, task)
    from seqebm.training.checkpoint import load_model

    load_model(model, run / "model.safetensors")
    return task, model.eval()


def test_greedy_ids_match_translate(translation_runs):
    task, model = _task_and_model(translation_runs[0])
    srcs = [s for s, _ in task.pairs["test"][:6]]
    ids = greedy_decode_ids(model, task.tokenizer.encode_batch(srcs), max_len=task.max_len, batch_size=4)
    assert task.tokenizer.decode_batch(ids) == task.translate(model, srcs, batch_size=4)


def test_batched_reference_log_probs_match_a_per_token_loop(translation_runs):
    """log q(y_t | x, ŷ_<t) for t < min(L, H + 1), one forward per token on a single sentence."""
    task, model = _task_and_model(translation_runs[0])
    pairs = task.pairs["test"][:3]
    srcs = task.tokenizer.encode_batch([s for s, _ in pairs])
    refs = task.tokenizer.encode_batch([t for _, t in pairs])
    hyps = greedy_decode_ids(model, srcs, max_len=task.max_len)
    hyps[1] = hyps[1][:4]  # a short hypothesis: only H + 1 = 5 positions are scored
    fast = reference_log_probs(model, srcs, hyps, refs, batch_size=3)
    assert [len(f) for f in fast] == [min(len(r), len(h) + 1) for r, h in zip(refs, hyps)]
    assert len(fast[1]) == 5
    with torch.no_grad():
        for src, hyp, ref, got in zip(srcs, hyps, refs, fast):
            slow = [model(torch.tensor([[BOS_ID, *hyp[:t]]]), source=torch.tensor([src]))[0, -1]
                    .log_softmax(-1)[ref[t]].item() for t in range(len(got))]
            torch.testing.assert_close(got, torch.tensor(slow), atol=1e-5, rtol=1e-5)


def test_exposure_bias_counts(translation_runs, tmp_path):
    """Self-comparison: N = 0 and every position ties; a vs b and b vs a split the non-tied positions."""
    base, cand = translation_runs
    kw = {"split": "test", "n": 8, "seed": 1, "device": "cpu", "batch_size": 5}
    same = exposure_bias(base, base, **kw).data
    assert same["N"] == 0 and same["ratio"] == 0.0 and same["ties"] == same["total"] > 0
    task, model = _task_and_model(base)
    pairs = [task.pairs["test"][i] for i in same["indices"]]
    refs = task.tokenizer.encode_batch([t for _, t in pairs])
    hyps = greedy_decode_ids(model, task.tokenizer.encode_batch([s for s, _ in pairs]), max_len=task.max_len)
    assert same["total"] == sum(min(len(r), len(h) + 1) for r, h in zip(refs, hyps))
    ab = exposure_bias(base, cand, **kw).data
    ba = exposure_bias(cand, base, **kw).data
    assert 0.0 <= ab["ratio"] <= 1.0 and ab["total"] == ba["total"] > 0 and ab["indices"] == same["indices"]
    assert ab["N"] + ba["N"] + ab["ties"] == ab["total"]
    assert ab["N"] / ab["total"] == ab["ratio"]
    out = tmp_path / "o"
    assert _analyze(["exposure-bias", "--baseline", str(base), "--candidate", str(cand), "--split", "test",
                     "--n", "8", "--seed", "1", "--batch-size", "5", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "exposure_bias.json").read_text())
    assert (data["N"], data["total"]) == (ab["N"], ab["total"])
    assert f"| {ab['N']} | {ab['total']} | {100 * ab['ratio']:.2f}% |" in (out / "exposure_bias.md").read_text()


def test_exposure_bias_input_errors(translation_runs, tmp_path):
    base, cand = translation_runs
    lm = _fake_run(tmp_path / "runs", "lm", [], {})
    with pytest.raises(ValueError, match="needs translation runs .*candidate .* is a 'lm' run"):
        exposure_bias(base, lm, device="cpu")
    other = tmp_path / "other"
    shutil.copytree(cand, other)
    tok_file = other / "tokenizer" / "tokenizer.json"
    tok_file.write_text(json.dumps(json.loads(tok_file.read_text()), indent=1))  # same tokenizer, other bytes
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        exposure_bias(base, other, device="cpu")
    shutil.rmtree(other / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        exposure_bias(base, other, device="cpu")
    with pytest.raises(ValueError, match="n must be positive"):
        exposure_bias(base, cand, n=0)
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        exposure_bias(base, tmp_path / "missing")


def test_load_runs_rejects_duplicates_and_non_runs(seed_runs, tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        load_runs([seed_runs[0], seed_runs[0]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_runs([tmp_path / "empty"])
