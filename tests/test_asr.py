"""`seqebm asr train|transcribe` end to end on a tiny synthesized corpus (users' manifest format)."""

import json

import pytest

from seqebm.cli import main

TINY = ["model.d_model=16", "model.num_layers=1", "model.pred_dim=8", "model.joint_dim=8", "data.n_mels=20",
        "data.batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "train.progress=false", "eval.beam_size=3", "eval.nbest=3", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("soundfile")
    from seqebm.data.espeak import ESpeakNotFoundError
    from seqebm.data.speech import build_speech_mini

    try:
        root = build_speech_mini(tmp_path_factory.mktemp("cache"), n_train=12, n_dev=3, n_test=3, n_test_unseen=3,
                                 progress=False)
    except ESpeakNotFoundError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"no eSpeak NG: {e}")
    return root


def _data(root):
    return ["data.corpus=manifest", f"data.train_manifest={root / 'train.jsonl'}",
            f"data.dev_manifest={root / 'dev.jsonl'}", f"data.test_manifest={root / 'test.jsonl'}",
            f"data.test_unseen_manifest={root / 'test_unseen.jsonl'}"]


@pytest.mark.parametrize("kind", ["ctc", "ctc_crf", "rnnt"])
def test_train_writes_error_rates_and_nbest_lists(corpus, tmp_path, kind, capsys):
    run = tmp_path / kind
    assert main(["asr", "train", "--run-dir", str(run), *_data(corpus), *TINY, f"model.kind={kind}",
                 f"name=tiny-{kind}"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 4 and res["train_utterances"] == 12
    for split in ("dev", "test", "test_unseen"):
        assert 0.0 <= res[split]["cer"] and res[split]["utterances"] == 3
        lines = [json.loads(x) for x in (run / "nbest" / f"{split}.jsonl").read_text().splitlines()]
        assert len(lines) == 3 and all(r["reference"] and 1 <= len(r["hypotheses"]) <= 3 for r in lines)
        scores = [h["score"] for h in lines[0]["hypotheses"]]
        assert scores == sorted(scores, reverse=True)
    assert (run / "label_lm.json").is_file() == (kind == "ctc_crf")
    # transcribe reuses the run's decoder on audio files
    audio = sorted((corpus / "audio" / "test").glob("*.flac"))[:2]
    capsys.readouterr()
    assert main(["asr", "transcribe", "--run-dir", str(run), *map(str, audio)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(str(audio[0]))
    # asr nbest: decoding again with the recipe's beam gives the training run's lists; a wider beam keeps more
    assert main(["asr", "nbest", str(run), "--beam-size", "3", "--nbest", "3", "--out-name", "again"]) == 0
    for split in ("dev", "test", "test_unseen"):
        assert (run / "again" / f"{split}.jsonl").read_text() == (run / "nbest" / f"{split}.jsonl").read_text()
    assert main(["asr", "nbest", str(run), "--beam-size", "6", "--nbest", "5", "--splits", "test"]) == 0
    wide = [json.loads(x) for x in (run / "nbest-wide" / "test.jsonl").read_text().splitlines()]
    assert len(wide) == 3 and all(1 <= len(r["hypotheses"]) <= 5 for r in wide)
    assert not (run / "nbest-wide" / "dev.jsonl").exists()
    capsys.readouterr()
    assert main(["asr", "nbest", str(run), "--splits", "test"]) == 2  # never overwrites without --force
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["asr", "nbest", str(run), "--splits", "train", "--force"]) == 2
    assert "no evaluation split 'train'" in capsys.readouterr().err
    assert main(["asr", "train", "--run-dir", str(run), "--resume", "train.max_steps=6"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 6


def test_bad_manifest_and_config_are_refused(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "missing.flac", "text": "hello"}) + "\n")
    assert main(["asr", "train", "--run-dir", str(tmp_path / "r"), "data.corpus=manifest",
                 f"data.train_manifest={bad}", f"data.test_manifest={bad}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "missing.flac" in err
    assert not (tmp_path / "r").exists()
    assert main(["asr", "train", "--run-dir", str(tmp_path / "r"), "model.kind=hmm"]) == 2
    assert "model.kind must be one of ctc, ctc_crf, rnnt" in capsys.readouterr().err


def test_compare_trains_missing_runs_and_no_train_only_tabulates(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["--configs", "configs/asr-ctc.yaml", "--fractions", "1.0", "--out", str(out), *_data(corpus), *TINY]
    stopped = out / "asr-ctc-f1-s0"  # a run killed before its first checkpoint: started again from scratch
    stopped.mkdir(parents=True)
    (stopped / "config.yaml").write_text("name: old\n")
    (stopped / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    assert main(["asr", "compare", "--seeds", "0", *base]) == 0
    assert (out / "asr-ctc-f1-s0" / "results.json").is_file()
    assert "name: old" not in (stopped / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["asr", "compare", "--seeds", "0", "1", "--no-train", *base]) == 0
    assert not (out / "asr-ctc-f1-s1").exists()  # nothing was trained
    table = (out / "comparison.md").read_text()
    assert "(n=1)" in table and "| asr-ctc | ctc | 1 |" in table
    summary = json.loads((out / "comparison.json").read_text())["summary"]
    assert len(summary["asr-ctc@1"]["test_cer"]["values"]) == 1
