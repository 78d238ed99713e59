"""Import every module; run the README's Python snippet; the HF adapter inside an experiment."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import seqebm

ROOT = Path(__file__).parents[1]


def test_import_every_module():
    names = [m.name for m in pkgutil.walk_packages(seqebm.__path__, "seqebm.")]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"## The Python API\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api-example" / "checkpoint.safetensors").exists()


def test_hf_model_in_an_experiment_checks_the_vocabulary(tmp_path):
    from seqebm.config import load_config
    from seqebm.models.hf import HFCausalLM
    from seqebm.training.experiment import ExperimentConfig, run_experiment

    hf = HFCausalLM.from_config({"vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64,
                                 "bos_token_id": 1, "eos_token_id": 2}, model_type="gpt2")
    hf.model.save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["abc abd", "bca cab", "aab bba", "cab abc"] * 10))
    common = ["model.arch=hf", f"model.hf_path={tmp_path / 'hf'}", f"data.corpus={corpus}", "data.tokenizer=char",
              "data.seq_len=16", "data.batch_size=4", "train.max_steps=2", "train.progress=false", "eval.num_samples=1"]
    cfg = load_config(ExperimentConfig, None, common)
    with pytest.raises(ValueError, match=r"model vocabulary \(50\) != tokenizer vocabulary \(9\)"):
        run_experiment(cfg, tmp_path / "r1", log=lambda *_: None)
    hf = HFCausalLM.from_config({"vocab_size": 9, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64,
                                 "bos_token_id": 1, "eos_token_id": 2}, model_type="gpt2")
    hf.model.save_pretrained(tmp_path / "hf9")
    cfg = load_config(ExperimentConfig, None, common + [f"model.hf_path={tmp_path / 'hf9'}"])
    res = run_experiment(cfg, tmp_path / "r2", log=lambda *_: None)
    assert res["steps"] == 2 and res["test"]["ppl"] > 1
