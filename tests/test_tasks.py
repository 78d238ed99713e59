"""Every task trains end to end on a tiny budget and reports its metrics."""

import json

import pytest
import torch

from seqebm.config import load_config
from seqebm.training.experiment import ExperimentConfig, build_task, run_experiment

COMMON = ["train.progress=false", "train.eval_every=5", "train.checkpoint_every=5", "eval.num_samples=2"]


def _run(tmp_path, overrides):
    cfg = load_config(ExperimentConfig, None, COMMON + overrides)
    return run_experiment(cfg, tmp_path / "run", log=lambda *_: None)


def test_oracle_task_reports_nll_test_and_nll_oracle(tmp_path):
    res = _run(tmp_path, ["data.corpus=oracle", "data.synthetic.n_words=30", "data.synthetic.length=8",
                          "data.synthetic.n_train=256", "data.synthetic.n_valid=64", "data.synthetic.n_test=64",
                          "data.synthetic.oracle_samples=64", "model.arch=gru", "model.d_model=32",
                          "data.batch_size=32", "train.max_steps=10", "optim.lr=1e-2"])
    test = res["test"]
    assert test["nll_test"] == test["loss"] and 0 < test["nll_oracle"] < 20
    assert (tmp_path / "run" / "oracle" / "oracle.safetensors").exists()
    assert len(res["samples"]) == 2 and all(len(s.split()) == 8 for s in res["samples"])


def test_oracle_model_samples_stay_in_support(tmp_path):
    """NLL_oracle is finite: model samples never contain ids outside the oracle's support."""
    cfg = load_config(ExperimentConfig, None, ["data.corpus=oracle", "data.synthetic.n_words=5",
                                               "data.synthetic.length=4", "data.synthetic.n_train=64",
                                               "data.batch_size=8"])
    task = build_task(cfg, None)
    from seqebm.models import TransformerLM

    model = TransformerLM(task.vocab_size, d_model=16, n_layers=1, n_heads=2, max_len=5).eval()
    torch.nn.init.normal_(model.head.weight, std=5.0)  # a wild, untrained model
    seqs = task.model_samples(model, 200)
    assert all(len(s) == 4 and all(4 <= t < task.vocab_size for t in s) for s in seqs)
    assert torch.isfinite(task.oracle.log_prob(seqs)).all()


def test_translation_task_trains_and_decodes(tmp_path):
    res = _run(tmp_path, ["data.corpus=synthetic-translation", "data.synthetic.n_words=50",
                          "data.synthetic.n_train=300", "data.synthetic.n_valid=20", "data.synthetic.n_test=10",
                          "data.tokenizer=char", "data.max_tokens=2048", "model.arch=seq2seq", "model.d_model=32",
                          "model.n_layers=1", "model.n_heads=2", "model.max_len=512", "train.max_steps=5",
                          "eval.beam_size=3"])
    assert {"bleu_greedy", "bleu_beam3"} <= set(res["test"]) and res["test"]["ppl"] > 1
    assert res["samples"][0].startswith("src: w")


def test_users_parallel_files(tmp_path):
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(f"a{i % 7} b{i % 5}" for i in range(60)))
    tgt.write_text("\n".join(f"x{i % 5} y{i % 7}" for i in range(60)))
    res = _run(tmp_path, [f"data.source_file={src}", f"data.target_file={tgt}", "data.tokenizer=char",
                          "data.max_tokens=256", "model.arch=seq2seq", "model.d_model=16", "model.n_layers=1",
                          "model.n_heads=2", "train.max_steps=3"])
    assert res["task"] == "translation"
    with pytest.raises(ValueError, match="must be given together"):
        load_config(ExperimentConfig, None, [f"data.source_file={src}"])


@pytest.mark.parametrize("arch", ["pixelcnn", "gated_pixelcnn"])
def test_digits_task_reports_bits_per_dim(tmp_path, arch):
    res = _run(tmp_path, ["data.corpus=digits", f"model.arch={arch}", "model.channels=16", "model.n_layers=2",
                          "data.batch_size=64", "train.max_steps=5", f"data.cache_dir={tmp_path / 'cache'}"])
    bpd = res["test"]["bits_per_dim"]
    assert 0 < bpd < 5  # untrained ≈ log2(17) = 4.09
    assert len(res["samples"]) == 2 and res["samples"][0].count("\n") == 7


def test_architecture_task_mismatch_is_explained(tmp_path):
    cfg = load_config(ExperimentConfig, None, ["data.corpus=digits", "model.arch=transformer",
                                               f"data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="digits task needs model.arch pixelcnn"):
        run_experiment(cfg, tmp_path / "r", log=lambda *_: None)


TINY_TRANSLATION = ["data.corpus=synthetic-translation", "data.synthetic.n_words=50", "data.synthetic.n_train=300",
                    "data.synthetic.n_valid=20", "data.synthetic.n_test=10", "data.tokenizer=char",
                    "data.max_tokens=2048", "model.arch=seq2seq", "model.d_model=32", "model.n_layers=1",
                    "model.n_heads=2", "model.max_len=512"]


def test_translation_reports_length_buckets_rouge_meteor_and_energy_resampling(tmp_path):
    """E-Forcing Tab. 5 (BLEU by reference length), Tab. 12 (ROUGE/METEOR), Tab. 7 (Top-K resampling)."""
    from seqebm.eval.metrics import corpus_bleu, meteor_available
    from seqebm.training.experiment import build_model_for

    cfg = load_config(ExperimentConfig, None, TINY_TRANSLATION + ["eval.beam_size=2", "eval.resample_k=[0, 1, 3]",
                                                                  "eval.resample_mode=sample"])
    assert cfg.eval.resample_k == [0, 1, 3]
    task = build_task(cfg, None)
    assert task.resample_k == [0, 1, 3] and task.resample_mode == "sample"
    torch.manual_seed(0)
    model = build_model_for(cfg, task)
    out = task.evaluate(model, "test")
    for key in ("bleu_by_length_greedy", "bleu_by_length_beam2"):
        assert list(out[key]) == ["<25", "25-49", ">=50"]
        assert all(v is None or 0 <= v <= 100 for v in out[key].values())
    assert {"rouge1", "rouge2", "rougeL"} <= set(out) and all(0 <= out[k] <= 100 for k in ("rouge1", "rougeL"))
    assert ("meteor" in out) == meteor_available()
    assert {"bleu_resample1", "bleu_resample3"} <= set(out) and "bleu_resample0" not in out
    # k = 1 is one plain sample per source, seeded by the task's seed + k
    srcs, refs = [s for s, _ in task.pairs["test"]], [t for _, t in task.pairs["test"]]
    hyps = task.translate(model, srcs, num_candidates=1, generator=torch.Generator().manual_seed(task.seed + 1))
    assert out["bleu_resample1"] == corpus_bleu(hyps, refs)["bleu"]
    json.dumps(out)  # results.json stays serialisable


@pytest.mark.parametrize("override,match", [(["eval.resample_k=[-1]"], "eval.resample_k must be a list of ints"),
                                            (["eval.resample_mode=argmax"], "eval.resample_mode must be")])
def test_bad_resampling_settings_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(ExperimentConfig, None, override)
