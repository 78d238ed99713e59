"""``seqebm rescore-table`` (issue #10, item 7): many LMs x many recognisers in one table.

Checks: every cell equals ``rescore_files`` on that run alone; seeds of a system are averaged
(mean and sample std by hand); finished pairs are reused and a changed grid recomputes them; an
n-gram that should flip the 1-best does; bad specs and missing lists fail before any LM is built.
"""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from seqebm.eval.rescoring import ScorerSpec, rescore_files
from seqebm.eval.rescoring_table import LMEntry, compare_rescoring, parse_lm_entry, register_rescore_table_command

TEXT = ["the cat sat on the mat", "the cat sat", "a dog ran home", "the dog sat on the mat"] * 3


def _list(uid, ref, hyps):
    return json.dumps({"id": uid, "reference": ref,
                       "hypotheses": [{"text": t, "acoustic": a, "lm": lm} for t, a, lm in hyps]})


def _write_run(root, name, shift):
    """An n-best run: the acoustic 1-best is wrong by one word, the LM-preferred one is right."""
    nb = root / name / "nbest"
    nb.mkdir(parents=True)
    for split in ("dev", "test", "test_unseen"):
        lines = [
            _list(f"{split}-1", "the cat sat", [("the cat sad", -1.0, -9.0), ("the cat sat", -1.2 - shift, -2.0)]),
            _list(f"{split}-2", "a dog ran home", [("a dog ran home", -0.5, -1.0), ("a dog ran hum", -0.9, -8.0)]),
            _list(f"{split}-3", "the dog sat on the mat",
                  [("the dog sad on the mat", -2.0, -7.0), ("the dog sat on a mat", -2.1, -6.0),
                   ("the dog sat on the mat", -2.3 - shift, -1.0)]),
        ]
        if split == "test_unseen":
            lines.append(_list("u-4", "the cat sat on the mat", [("the cat sat on the mat", -1.0, -1.0)]))
        (nb / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root / name


@pytest.fixture
def setup(tmp_path):
    runs = [_write_run(tmp_path, "rec-s0", 0.0), _write_run(tmp_path, "rec-s1", 0.5),
            _write_run(tmp_path, "other", 3.0)]
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(TEXT) + "\n")
    return tmp_path, runs, text


def test_cells_equal_rescore_files_and_seeds_are_averaged(setup):
    root, runs, text = setup
    lms = [parse_lm_entry(f"kn2=ngram:{text}:2"), parse_lm_entry("own=list")]
    grid = dict(lm_weights=[0.5, 1.0, 2.0], length_bonuses=[-1.0, 0.5])
    an = compare_rescoring(runs, lms, root / "out", log=lambda *_: None, **grid)
    assert set(an.data["systems"]) == {"rec", "other"}
    for lm, spec in ((lms[0], ScorerSpec("ngram", ngram_train=str(text), ngram_order=2)),
                     (lms[1], ScorerSpec("list"))):
        per_run = {}
        for run in runs:
            alone = rescore_files(run / "nbest/dev.jsonl", [run / "nbest/test.jsonl", run / "nbest/test_unseen.jsonl"],
                                  spec, **grid).data
            per_run[run.name] = {s["name"]: s for s in alone["sets"]}
        for test in ("test", "test_unseen"):
            vals = [100 * per_run[r][test]["rescored"]["wer"] for r in ("rec-s0", "rec-s1")]
            cell = an.data["summary"][lm.name][f"rec/{test}"]
            assert cell["values"] == pytest.approx(vals)
            assert cell["mean"] == pytest.approx(statistics.mean(vals))
            assert cell["std"] == pytest.approx(statistics.stdev(vals))
            other = an.data["summary"][lm.name][f"other/{test}"]
            assert other["values"] == pytest.approx([100 * per_run["other"][test]["rescored"]["wer"]])
            assert other["std"] is None
        first = an.data["summary"]["lists' 1-best"]["rec/test"]["values"]
        assert first == pytest.approx([100 * per_run[r]["test"]["first_wer"] for r in ("rec-s0", "rec-s1")])
    # the acoustic 1-best has 2 wrong words in 13; both LMs fix them on the seed-0 lists
    assert an.data["summary"]["lists' 1-best"]["rec/test"]["values"][0] == pytest.approx(100 * 2 / 13)
    assert an.data["summary"]["kn2"]["rec/test"]["values"][0] == 0.0
    assert an.data["summary"]["own"]["rec/test"]["values"][0] == 0.0
    assert an.data["summary"]["oracle"]["rec/test"]["values"] == [0.0, 0.0]
    assert "| kn2 (ngram:" in an.markdown and "rec test_unseen WER (%)" in an.markdown


def test_finished_pairs_are_reused_and_a_new_grid_recomputes(setup, monkeypatch):
    root, runs, text = setup
    lms = [parse_lm_entry(f"kn2=ngram:{text}:2")]
    logs = []
    first = compare_rescoring(runs[:2], lms, root / "out", lm_weights=[1.0], length_bonuses=[0.0], log=logs.append)
    assert sum("building LM" in m for m in logs) == 1 and sum("rescoring" in m for m in logs) == 2
    assert len(list((root / "out/cells").glob("*.json"))) == 2

    def no_build(self, **kw):
        raise AssertionError("the LM was rebuilt although every pair is cached")
    monkeypatch.setattr(LMEntry, "build", no_build)
    logs.clear()
    again = compare_rescoring(runs[:2], lms, root / "out", lm_weights=[1.0], length_bonuses=[0.0], log=logs.append)
    assert [m for m in logs if "warning" not in m] == [] and again.data == first.data
    monkeypatch.undo()
    logs.clear()
    compare_rescoring(runs[:2], lms, root / "out", lm_weights=[1.0, 2.0], length_bonuses=[0.0], log=logs.append)
    assert sum("rescoring" in m for m in logs) == 2  # the grid is part of a cell's key
    logs.clear()
    with open(runs[0] / "nbest" / "test.jsonl", "a") as f:  # new lists for one run: only its pair is redone
        f.write(_list("extra", "a dog ran", [("a dog ran", -1.0, -1.0)]) + "\n")
    compare_rescoring(runs[:2], lms, root / "out", lm_weights=[1.0, 2.0], length_bonuses=[0.0], log=logs.append)
    assert [m for m in logs if "rescoring" in m] == ["[seqebm] rescoring rec-s0 with kn2"]
    logs.clear()
    text.write_text("\n".join(TEXT[:4]) + "\n")  # the n-gram's text changed: every pair of that LM is redone
    compare_rescoring(runs[:2], lms, root / "out", lm_weights=[1.0, 2.0], length_bonuses=[0.0], log=logs.append)
    assert sum("rescoring" in m for m in logs) == 2


def test_bad_entries_and_inputs(setup):
    root, runs, text = setup
    for bad in ("kn2", "=list", "a b=list", "x=list:3", "x=elm:", "x=foo:bar", "x=ngram:"):
        with pytest.raises(ValueError):
            parse_lm_entry(bad)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        parse_lm_entry(f"x=elm:{root}")
    with pytest.raises(FileNotFoundError, match="not found"):
        parse_lm_entry(f"x=ngram:{root}/missing.txt")
    with pytest.raises(ValueError, match="order"):
        parse_lm_entry(f"x=ngram:{text}:0")
    assert parse_lm_entry("kn=ngram:speech-text:4") == LMEntry("kn", "ngram:speech-text:4")
    lm = [parse_lm_entry("own=list")]
    with pytest.raises(ValueError, match="share a folder name"):
        compare_rescoring([runs[0], runs[0]], lm, root / "out")
    with pytest.raises(ValueError, match="share a name"):
        compare_rescoring(runs, lm * 2, root / "out")
    (runs[2] / "nbest/test_unseen.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test_unseen"):
        compare_rescoring(runs, lm, root / "out")
    assert not (root / "out").exists()  # nothing was written before the inputs were checked


def test_cli_end_to_end(setup, capsys):
    root, runs, text = setup
    parser = argparse.ArgumentParser()
    register_rescore_table_command(parser.add_subparsers(dest="cmd"))
    argv = ["rescore-table", "--nbest-runs", *map(str, runs[:2]), "--lm", f"kn2=ngram:{text}:2", "own=list",
            "--lm-weights", "1", "--length-bonuses", "0", "--out", str(root / "t")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| kn2 (ngram:" in out and (root / "t/rescore-table.md").is_file()
    data = json.loads((root / "t/rescore-table.json").read_text())
    assert data["lms"] == {"kn2": f"ngram:{text}:2", "own": "list"}
    with pytest.raises(FileExistsError):
        args = parser.parse_args(argv)
        args.func(args)


def test_am_field_is_part_of_a_cells_key(setup):
    """Lists whose total score (acoustic + own lm) already picks the right words: 'AM only' is then perfect."""
    root, runs, text = setup
    for split in ("dev", "test", "test_unseen"):
        path = runs[0] / "nbest" / f"{split}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        for r in lines:
            for h in r["hypotheses"]:
                h["score"] = h["acoustic"] + h["lm"]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    lm = [parse_lm_entry(f"kn2=ngram:{text}:2")]
    grid = dict(lm_weights=[1.0], length_bonuses=[0.0], log=lambda *_: None)
    acoustic = compare_rescoring(runs[:1], lm, root / "out", **grid)
    total = compare_rescoring(runs[:1], lm, root / "out", am="score", **grid)
    assert acoustic.data["summary"]["AM only (β tuned)"]["rec/test"]["values"] == [pytest.approx(100 * 2 / 13)]
    assert total.data["summary"]["AM only (β tuned)"]["rec/test"]["values"] == [0.0]
    assert total.data["am"] == "score" and "AM: the hypotheses' `score`" in total.markdown
    with pytest.raises(ValueError, match="am must be"):
        compare_rescoring(runs[:1], lm, root / "out", am="lm", **grid)


def test_weights_tuned_at_the_edge_of_their_grid_are_reported(setup):
    root, runs, text = setup
    lms = [parse_lm_entry(f"kn2=ngram:{text}:2")]
    logs = []
    # on the seed-0 lists any λ > 0 fixes the 1-best: with the grid {0, 0.5}, λ = 0.5 is its last point
    an = compare_rescoring(runs[:1], lms, root / "out", lm_weights=[0.5], length_bonuses=[0.0], log=logs.append)
    assert an.data["summary"]["kn2"]["lm_weight"] == [0.5]
    assert [m for m in logs if "warning" in m] == [
        "[seqebm] warning: tuned λ is at the edge of its grid in 1 of 1 (run, LM) pairs (rec-s0/kn2): widen --lm-weights"]
    assert "widen --lm-weights" in an.markdown
    logs.clear()
    wide = compare_rescoring(runs[:1], lms, root / "out2", lm_weights=[0.25, 0.5, 1.0, 2.0], length_bonuses=[0.0],
                             log=logs.append)  # ties go to the smaller λ: an interior point now
    assert wide.data["summary"]["kn2"]["lm_weight"] == [0.25] and not [m for m in logs if "warning" in m]
