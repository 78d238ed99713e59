"""Typed configs: YAML + dotted overrides, unknown keys rejected, shipped configs load."""

from pathlib import Path

import pytest

from seqebm.cli import DEMO_OVERRIDES
from seqebm.config import from_dict, load_config, parse_overrides, to_dict
from seqebm.training.experiment import ExperimentConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_yaml_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.5\n  warmup_steps: 7\nmodel:\n  arch: lstm\n")
    cfg = load_config(ExperimentConfig, p, ["optim.lr=2e-3", "model.n_layers=3", "eval.top_k=null"])
    assert cfg.optim.lr == pytest.approx(2e-3)  # override beats YAML ("2e-3" is a YAML 1.1 string)
    assert cfg.optim.warmup_steps == 7  # YAML beats default
    assert cfg.model.arch == "lstm" and cfg.model.n_layers == 3
    assert cfg.eval.top_k is None
    assert cfg.train.max_steps == ExperimentConfig().train.max_steps  # default kept


def test_round_trip():
    cfg = load_config(ExperimentConfig, None, ["data.vocab_size=123"])
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,match", [
    (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'.*allowed keys: .*lr"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["model.arch=mamba"], "model.arch must be one of"),
    (["data.batch_size=zero"], "data.batch_size' must be an integer"),
    (["train.bf16=maybe"], "train.bf16' must be true/false"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["noequals"], "must look like key.sub=value"),
])
def test_bad_overrides_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(ExperimentConfig, None, override)


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ValueError, match="unknown config key 'train.max_step'"):
        load_config(ExperimentConfig, p)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(ExperimentConfig, bad)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


TAGGING_PREFIXES = ("pos-", "truecase-")  # `seqebm tag` recipes (TaggingConfig)
ASR_PREFIXES = ("asr-",)  # `seqebm asr` recipes (AsrConfig); the rest are `seqebm train` (ExperimentConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    from seqebm.training.asr import AsrConfig
    from seqebm.training.controlled import GenerateConfig
    from seqebm.training.elm import ElmConfig
    from seqebm.training.jem import JemConfig
    from seqebm.training.jrf import SslConfig
    from seqebm.training.nlu import NluConfig
    from seqebm.training.tagging import TaggingConfig

    by_prefix = {TAGGING_PREFIXES: TaggingConfig, ASR_PREFIXES: AsrConfig, ("elm-",): ElmConfig,
                 ("jem-",): JemConfig, ("ssl-",): SslConfig, ("nlu-",): NluConfig,
                 ("generate-",): GenerateConfig}
    cls = next((c for pre, c in by_prefix.items() if path.name.startswith(pre)), ExperimentConfig)
    cfg = load_config(cls, path)
    assert cfg.name != cls().name  # each recipe names its runs
    if cls is not ExperimentConfig:  # compare tables are keyed by the file stem: keep name and file in step
        assert cfg.name == path.stem


def test_demo_yaml_matches_builtin_demo():
    shipped = load_config(ExperimentConfig, Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert shipped == load_config(ExperimentConfig, None, DEMO_OVERRIDES)
