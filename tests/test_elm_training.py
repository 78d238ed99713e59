"""``seqebm elm train``: every model kind end to end on a tiny text corpus, the importance-sampling
normalisers against enumeration, and the ELM rescoring scorer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seqebm.cli import main
from seqebm.config import load_config
from seqebm.data.elm_text import SentenceBatchSource, encode_sentences, read_sentence_file
from seqebm.data.tagged import WordVocabulary
from seqebm.estimators.elm_exact import exact_log_partition, exact_trf_log_normalizers
from seqebm.models.elm import GNELM, TRFLM, length_prior
from seqebm.models.rnn import RNNLM
from seqebm.models.sentence_lm import BoundedSentenceLM
from seqebm.training.elm import ELMScorer, ElmConfig, importance_log_normalizers

WORDS = "the cat dog sat ran on a mat".split()


def write_corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        n = int(torch.randint(2, 7, (1,), generator=g))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g)))
    for split, part in (("train", lines[:300]), ("valid", lines[300:350]), ("test", lines[350:])):
        (tmp_path / f"{split}.txt").write_text("\n".join(part) + "\n")
    return {s: str(tmp_path / f"{s}.txt") for s in ("train", "valid", "test")}


def common(files):
    return [f"data.train_file={files['train']}", f"data.valid_file={files['valid']}",
            f"data.test_file={files['test']}", "data.corpus=files", "data.max_length=8", "data.min_count=1",
            "data.batch_size=16", "model.d_model=16", "model.lm_d_model=16", "train.max_steps=6",
            "train.eval_every=3", "train.checkpoint_every=3", "train.progress=false", "eval.is_samples=200",
            "objective.noise_pretrain_steps=3", "objective.num_chains=8"]


@pytest.mark.parametrize("kind,obj,pot", [("trf", "dnce", "neural"), ("trf", "augsa", "discrete"),
                                          ("gn", "dnce", "neural"), ("residual", "nce", "mixed"),
                                          ("alm", "mle", "neural"), ("electric", "nce", "neural"),
                                          ("mlm", "mle", "neural")])
def test_every_kind_trains_evaluates_and_scores(tmp_path, kind, obj, pot, capsys):
    files = write_corpus(tmp_path)
    run = tmp_path / f"run-{kind}-{obj}"
    args = ["elm", "train", "--run-dir", str(run), *common(files), f"model.kind={kind}", f"objective.name={obj}",
            f"model.potential={pot}"]
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["kind"] == kind and res["steps"] == 6
    assert math.isfinite(res["test"]["loss"]) and res["test"]["sentences"] == 50
    if kind not in ("alm", "electric", "mlm"):
        assert len(res["is_log_normalizers"]["estimate"]) == (9 if kind == "trf" else 1)
    scorer = ELMScorer(run, device="cpu")
    scores = scorer(["the cat sat", "cat the sat on a mat the dog ran on the mat", ""])
    assert scores.shape == (3,) and torch.isfinite(scores[:2]).all() and scores[2] == float("-inf")
    # out-of-vocabulary words pay the penalty once each (no word type is folded into <unk> here: 0)
    plain = ELMScorer(run, device="cpu", unk_penalty=0.0)(["the zebra gnu sat"])
    assert ELMScorer(run, device="cpu", unk_penalty=2.5)(["the zebra gnu sat"]).item() == pytest.approx(
        plain.item() - 5.0, abs=1e-6)
    assert scorer.unk_penalty == 0.0
    # `seqebm elm evaluate`: with the training-time draws and seed it repeats the estimate exactly;
    # more draws from another seed give another estimate; runs without a normaliser are refused
    ev = ["elm", "evaluate", str(run), "--no-progress", "--device", "cpu"]
    if kind in ("alm", "electric", "mlm"):
        assert main([*ev, "--is-samples", "200"]) == 2
        assert "no normaliser" in capsys.readouterr().err
    else:
        assert main([*ev, "--is-samples", "200"]) == 0
        again = json.loads((run / "is-200-s17.json").read_text())
        assert again["is_log_normalizers"] == res["is_log_normalizers"]
        assert again["test"]["ppl"] == pytest.approx(res["test_is"]["ppl"], rel=1e-9)
        assert again["test"]["learned_ppl"] == pytest.approx(res["test"]["ppl"], rel=1e-9)
        assert main([*ev, "--is-samples", "600", "--seed", "3", "--out", str(tmp_path / "more.json")]) == 0
        more = json.loads((tmp_path / "more.json").read_text())
        assert more["num_samples"] == 600 and more["seed"] == 3
        assert more["is_log_normalizers"]["estimate"] != res["is_log_normalizers"]["estimate"]
        assert math.isfinite(more["valid"]["learned_ppl"])
        if kind == "residual":  # the base LM's own perplexity, next to the joint model's
            assert more["test"]["base_ppl"] == pytest.approx(res["base"]["test"], rel=1e-9)
            assert math.isfinite(res["base"]["valid"])
    # resuming a finished run changes nothing and still evaluates
    assert main(args[:4] + ["--resume", *args[4:]]) == 0


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="objective.name"):
        load_config(ElmConfig, None, ["model.kind=alm", "objective.name=dnce"])
    with pytest.raises(ValueError, match="model.kind"):
        load_config(ElmConfig, None, ["model.kind=bert"])
    with pytest.raises(ValueError, match="corpus"):
        load_config(ElmConfig, None, ["data.corpus=web"])


def test_sentence_source_is_deterministic_and_files_load(tmp_path):
    files = write_corpus(tmp_path)
    sents = read_sentence_file(files["train"])
    vocab = WordVocabulary.build(sents)
    a = SentenceBatchSource(sents, vocab, 16, seed=3).batch(2, 5)
    b = SentenceBatchSource(sents, vocab, 16, seed=3).batch(2, 5)
    assert torch.equal(a.tokens, b.tokens) and a.num_tokens == 16
    enc = encode_sentences([["the", "zebra"]], vocab)
    assert enc.tokens[0, 1].item() == vocab.unk_id
    with pytest.raises(ValueError, match="empty"):
        encode_sentences([[]], vocab)
    with pytest.raises(FileNotFoundError):
        read_sentence_file(tmp_path / "missing.txt")


def _tiny_models():
    torch.manual_seed(0)
    lm = RNNLM(6, d_model=8, n_layers=1, dropout=0.0)
    q = BoundedSentenceLM(lm.double(), max_length=3)

    class Pot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))

        def forward(self, tokens, mask):
            return (self.a[tokens] * mask).sum(1)

    return q, Pot()


def test_importance_normalizers_match_enumeration_within_their_error_bars():
    q, pot = _tiny_models()
    trf = TRFLM(pot, length_prior([1, 2, 3], 3))
    g = torch.Generator().manual_seed(1)
    est, se = importance_log_normalizers(trf, q, 20000, generator=g)
    exact = exact_trf_log_normalizers(pot, [3, 4, 5], 3)
    assert torch.all((est[1:] - exact[1:]).abs() < 4 * se[1:] + 1e-3), (est, exact, se)
    assert bool((se[1:] < 0.05).all())
    gn = GNELM(pot, eos_id=2, max_length=3)
    est, se = importance_log_normalizers(gn, q, 20000, generator=g)
    exact = exact_log_partition(gn.log_unnormalized, [3, 4, 5], 3)
    assert abs(float(est[0]) - exact.item()) < 4 * float(se[0]) + 1e-3


def test_rescore_cli_with_an_elm_run(tmp_path):
    files = write_corpus(tmp_path)
    run = tmp_path / "trf"
    assert main(["elm", "train", "--run-dir", str(run), *common(files)]) == 0
    nbest = []
    for i, ref in enumerate(["the cat sat on a mat", "a dog ran"]):
        hyps = [{"text": ref.replace("a", "o", 1), "acoustic": -1.0}, {"text": ref, "acoustic": -1.5}]
        nbest.append(json.dumps({"id": i, "reference": ref, "hypotheses": hyps}))
    (tmp_path / "dev.jsonl").write_text("\n".join(nbest) + "\n")
    out = tmp_path / "rescore"
    assert main(["rescore", "--dev", str(tmp_path / "dev.jsonl"), "--test", str(tmp_path / "dev.jsonl"),
                 "--elm-run", str(run), "--out", str(out), "--device", "cpu"]) == 0
    data = json.loads(next(out.glob("*.json")).read_text())
    assert "ELMScorer" in data["scorer"]


def test_ngram_baseline_perplexity_by_hand(tmp_path, capsys):
    """elm ngram: the KN baseline's perplexity uses the ELM runs' vocabulary and units (W = Σ(l + 1))."""
    from seqebm.eval.sentence_scorers import NGramSentenceScorer
    from seqebm.training.elm_ngram import OOV_WORD

    files = {}
    train = ["the cat sat", "the dog sat", "the cat ran", "a dog ran on the mat"] * 4 + ["the emu sat"]
    for split, lines in (("train", train), ("valid", ["the cat sat on a mat", "the yak ran", "x " * 12]),
                         ("test", ["a cat sat"])):
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
        files[split] = str(tmp_path / f"{split}.txt")
    run = tmp_path / "kn2"
    args = ["elm", "ngram", "--config", "configs/elm-alm.yaml", "--run-dir", str(run), "--order", "2",
            "data.corpus=files", f"data.train_file={files['train']}", f"data.valid_file={files['valid']}",
            f"data.test_file={files['test']}", "data.min_count=4", "data.max_length=10", "data.batch_size=4"]
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    # min_count=4 keeps the words seen >= 4 times; "emu" (once) and the unseen "yak" become one token
    kept = {"the", "cat", "sat", "dog", "ran", "a", "on", "mat"}
    kn = NGramSentenceScorer.fit([" ".join(w if w in kept else OOV_WORD for w in s.split()) for s in train], 2)
    ll = kn(["the cat sat on a mat", f"the {OOV_WORD} ran"])
    assert res["valid"]["words"] == 7 + 4 and res["valid"]["excluded_longer"] == 1  # the 12-word line is left out
    assert res["valid"]["ppl"] == pytest.approx(math.exp(-float(ll.sum()) / 11))
    assert res["test"]["ppl"] == pytest.approx(math.exp(-float(kn(["a cat sat"]).sum()) / 4))
    reloaded = NGramSentenceScorer.load(run / "kn.json")
    assert reloaded(["the cat sat"]).item() == pytest.approx(kn(["the cat sat"]).item())
    assert main(args) == 2  # the run folder exists: nothing is overwritten
    assert "exists" in capsys.readouterr().err


def test_evaluate_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["elm", "evaluate", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a finished ELM run" in err and "checkpoint.safetensors" in err
    with pytest.raises(ValueError, match="num_samples"):
        from seqebm.training.elm_eval import reestimate_normalizers
        reestimate_normalizers(tmp_path, num_samples=1)
