"""Residual-EBM analyses (residual-EBM seed Figs. 1–3, Tab. 2): the pure helpers on hand-computed
numbers, the batched estimators against exact enumeration on a tiny GRU LM, and every
``seqebm analyze`` residual command end to end on a tiny base LM + residual run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from seqebm.cli import _load_run, main
from seqebm.eval.residual_analysis import (
    ab_pairs,
    bound_inputs,
    per_text_unique_ngrams,
    perplexity_by_num_samples,
    position_log_probs,
    position_perplexities,
)
from seqebm.models.residual import ResidualEBM
from seqebm.models.rnn import RNNLM
from seqebm.sampling.scoring import sequence_log_prob

# --------------------------------------------------------------------------- pure helpers


def test_perplexity_by_num_samples_by_hand():
    """One prefix, weights w = (1, 3), log P_LM = −2, E = 0, one token.

    T_2 = log((1 + 3)/2) = log 2; leave-one-out T̄_1 = (log 3 + log 1)/2; U_2 = 3 T_2 − 2 T̄_1 =
    log(8/3); jackknife 2 T_2 − T̄_1 = log(4/√3). ppl_lower = exp(2 + T_2) = 2e², ppl_upper =
    exp(2 + U_2) = (8/3)e², jackknife (4/√3)e². ESS = (1 + 3)² / (1 + 9) = 1.6.
    """
    (row,) = perplexity_by_num_samples(torch.tensor([-2.0]), torch.tensor([0.0]),
                                       torch.tensor([[0.0, math.log(3.0)]]), [2], num_tokens=1)
    e2 = math.exp(2)
    assert row["n"] == 2
    assert row["ppl_lower"] == pytest.approx(2 * e2)
    assert row["ppl_upper"] == pytest.approx(8 / 3 * e2)
    assert row["ppl_jackknife"] == pytest.approx(4 / math.sqrt(3) * e2)
    assert row["log_z_lower"] == pytest.approx(math.log(2)) and row["log_z_upper"] == pytest.approx(math.log(8 / 3))
    assert row["ess"] == pytest.approx(1.6)


def test_perplexity_by_num_samples_zero_energy_is_the_lm():
    """E ≡ 0: every weight is 1, log Z = 0 exactly for every n, so all estimates equal the LM ppl."""
    lp = torch.tensor([-3.0, -5.0])  # 2 windows of 2 tokens: LM ppl = exp(8 / 4) = e²
    rows = perplexity_by_num_samples(lp, torch.zeros(2), torch.zeros(2, 8), [2, 4, 8], num_tokens=4)
    for r in rows:
        for key in ("ppl_lower", "ppl_upper", "ppl_jackknife"):
            assert r[key] == pytest.approx(math.exp(2.0))
        assert r["ess"] == pytest.approx(r["n"])


def test_perplexity_by_num_samples_validates():
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        perplexity_by_num_samples(torch.zeros(1), torch.zeros(1), torch.zeros(1, 4), [2, 8], num_tokens=1)
    with pytest.raises(ValueError, match="shapes"):
        perplexity_by_num_samples(torch.zeros(2), torch.zeros(1), torch.zeros(1, 4), [2], num_tokens=1)


def test_per_text_unique_ngrams_by_hand():
    """[a a b], [c]: unigrams 2/3 and 1/1 -> 83.33; bigrams only in the first text, 2/2 -> 100;
    no text has 4 tokens -> None."""
    out = per_text_unique_ngrams([["a", "a", "b"], ["c"]], 4)
    assert out["unique_1"] == pytest.approx(250 / 3)
    assert out["unique_2"] == pytest.approx(100.0)
    assert out["unique_3"] == pytest.approx(100.0)
    assert out["unique_4"] is None
    assert per_text_unique_ngrams([["x", "x", "x", "x"]], 2) == {"unique_1": 25.0, "unique_2": pytest.approx(100 / 3)}


def test_position_perplexities_by_hand():
    """Position 1: LM log-probs (−1, −3) -> ppl e²; lower (−2, −2) -> ppl_upper e²; upper (−1, −1) ->
    ppl_lower e; estimate −1.5 -> e^1.5; gain e² − e^1.5 in [0, e² − e]. Position 2: all −1 -> gain 0."""
    lm = torch.tensor([[-1.0, -1.0], [-3.0, -1.0]])
    lower = torch.tensor([[-2.0, -1.0], [-2.0, -1.0]])
    upper = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    est = torch.tensor([[-1.5, -1.0], [-1.5, -1.0]])
    first, last = position_perplexities(lm, lower, upper, est)
    e = math.e
    assert first["position"] == 1 and not first["exact"]
    assert first["lm_ppl"] == pytest.approx(e ** 2)
    assert (first["ppl_lower"], first["ppl_upper"], first["ppl_estimate"]) == pytest.approx((e, e ** 2, e ** 1.5))
    assert (first["gain_lower"], first["gain"], first["gain_upper"]) == pytest.approx((0.0, e ** 2 - e ** 1.5,
                                                                                        e ** 2 - e))
    assert last["position"] == 2 and last["exact"] and last["gain"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shape"):
        position_perplexities(lm, lower[:, :1], upper, est)


def test_ab_pairs_key_recovers_systems_balanced_and_reproducible():
    ids = [f"i{k}" for k in range(7)]
    prefixes = [f"p{k}" for k in range(7)]
    ta, tb = [f"A{k}" for k in range(7)], [f"B{k}" for k in range(7)]
    pairs, key = ab_pairs(ids, prefixes, ta, tb, a="joint", b="lm", seed=3)
    texts = {"joint": ta, "lm": tb}
    for k, (p, kk) in enumerate(zip(pairs, key)):
        assert p["id"] == kk["id"] == ids[k] and p["prefix"] == prefixes[k]
        assert {kk["text_1"], kk["text_2"]} == {"joint", "lm"}
        assert p["text_1"] == texts[kk["text_1"]][k] and p["text_2"] == texts[kk["text_2"]][k]
        assert set(p) == {"id", "prefix", "text_1", "text_2"}  # no system names for the raters
    a_first = sum(kk["text_1"] == "joint" for kk in key)
    assert a_first in (3, 4)  # balanced: ⌊7/2⌋ each way plus the odd one
    assert ab_pairs(ids, prefixes, ta, tb, a="joint", b="lm", seed=3) == (pairs, key)
    orders = {tuple(kk["text_1"] for kk in ab_pairs(ids, prefixes, ta, tb, a="joint", b="lm", seed=s)[1])
              for s in range(5)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match="differ"):
        ab_pairs(ids, prefixes, ta, tb, a="lm", b="lm")
    with pytest.raises(ValueError, match="unique"):
        ab_pairs(["x"] * 7, prefixes, ta, tb, a="joint", b="lm")


# --------------------------------------------------------------------------- exact enumeration

V, BOS, P, C = 4, 3, 3, 2  # vocabulary, BOS id, prefix length (BOS included), continuation length


class TokenEnergy(nn.Module):
    """E(x) = Σ_t w[x_t] over the whole sequence (a fixed table, spread enough to matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 0.8, -0.6, 0.3], dtype=torch.float64))

    def forward(self, tokens, mask):
        return (self.w[tokens] * mask).sum(1)


def _tiny_model() -> ResidualEBM:
    torch.manual_seed(0)
    lm = RNNLM(V, cell="gru", d_model=8, hidden=16, n_layers=1, dropout=0.0, tie_embeddings=False).double()
    with torch.no_grad():
        lm.head.weight.mul_(3.0)
    return ResidualEBM(lm, TokenEnergy()).eval()


def _exact(model: ResidualEBM, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log P_θ(continuation | prefix) (B,) and per-position log P_θ(x_t | x_<t) (B, 2) by
    enumerating the V² = 16 continuations of each prefix:
    log P(x1 | pre) = log Σ_v P_LM(x1, v) e^{−E(x1, v)} − log Z, log P(x2 | pre, x1) = the rest."""
    seq, pos = [], []
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (16, 2)
    for row in rows:
        cand = torch.cat([row[:P].expand(V * V, P), grid], 1)
        s = (sequence_log_prob(model.lm, cand, prefix_len=P) - model.energy(cand)).detach()  # (16,)
        log_z = torch.logsumexp(s, 0)
        own = s[int(row[P]) * V + int(row[P + 1])]
        first = torch.logsumexp(s[int(row[P]) * V:(int(row[P]) + 1) * V], 0) - log_z
        seq.append(own - log_z)
        pos.append(torch.stack([first, own - log_z - first]))
    return torch.stack(seq), torch.stack(pos)


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, V, (3, P + C), generator=g)
    rows[:, 0] = BOS
    return _tiny_model(), rows


def test_bounds_converge_to_the_exact_joint_perplexity(tiny):
    """Brute force: the exact joint ppl from enumeration lies near the jackknife at n = 2048, the
    bracket holds (lower <= upper) at every n and narrows from n = 2 to n = 2048."""
    model, rows = tiny
    exact_seq, _ = _exact(model, rows)
    exact_ppl = math.exp(-float(exact_seq.sum()) / (rows.shape[0] * C))
    lp, e, lw = bound_inputs(model, rows, prefix_len=P, num_samples=2048,
                             generator=torch.Generator().manual_seed(0), batch_size=2)
    assert lw.shape == (3, 2048)
    curve = perplexity_by_num_samples(lp, e, lw, [2, 8, 2048], num_tokens=rows.shape[0] * C)
    assert all(c["ppl_lower"] <= c["ppl_upper"] for c in curve)
    assert curve[-1]["ppl_upper"] - curve[-1]["ppl_lower"] < curve[0]["ppl_upper"] - curve[0]["ppl_lower"]
    assert curve[-1]["ppl_jackknife"] == pytest.approx(exact_ppl, rel=0.02)


def test_position_log_probs_match_enumeration_and_last_is_exact(tiny):
    """Eq. 5 per position, batched over chunks, against the enumerated conditionals: the last
    position equals the exact value to float precision, the first is within sampling error."""
    model, rows = tiny
    _, exact_pos = _exact(model, rows)
    out = position_log_probs(model, rows, prefix_len=P, num_samples=4096,
                             generator=torch.Generator().manual_seed(0), batch_size=2)
    assert all(v.shape == (3, C) for v in out.values())
    assert torch.allclose(out["lower"][:, -1], exact_pos[:, -1], atol=1e-9)
    assert torch.equal(out["lower"][:, -1], out["upper"][:, -1])
    assert (out["lower"] <= out["upper"] + 1e-12).all()
    assert torch.allclose(out["estimate"][:, 0], exact_pos[:, 0], atol=0.03)
    lm_first = torch.log_softmax(model.lm(rows[:, :P])[:, -1], -1).gather(1, rows[:, P:P + 1]).squeeze(1)
    assert torch.allclose(out["lm"][:, 0], lm_first.detach())


def test_last_position_check_enumerates_or_reuses_the_exact_value(tiny):
    """The last position's exact perplexity, enumerated inside the check or passed in from
    position_log_probs, equals brute force; the sampled bounds bracket it loosely."""
    from seqebm.eval.residual_metrics import last_position_check

    model, rows = tiny
    _, exact_pos = _exact(model, rows)
    want = math.exp(-float(exact_pos[:, -1].mean()))
    own = last_position_check(model, rows, num_samples=2048, generator=torch.Generator().manual_seed(0), batch_size=2)
    given = last_position_check(model, rows, num_samples=2048, generator=torch.Generator().manual_seed(0),
                                batch_size=2, exact=exact_pos[:, -1])
    assert own["ppl_exact"] == pytest.approx(want, rel=1e-6)
    assert given["ppl_exact"] == pytest.approx(want, rel=1e-6)
    assert own["ppl_estimate"] == given["ppl_estimate"]
    assert own["ppl_estimate"] == pytest.approx(want, rel=0.05)


# --------------------------------------------------------------------------- end to end (CLI)

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=24", "data.batch_size=8",
        "data.tokenizer=char", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
        "train.progress=false", "eval.num_samples=2", "eval.sample_tokens=10"]
CONT = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny char-level Transformer LM run and a residual (UniT) run on top of it (test_cli settings)."""
    root = tmp_path_factory.mktemp("residual_analysis")
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran far away quickly slowly".split()
    corpus = root / "text.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(300)))
    base, res = root / "base", root / "res"
    assert main(["train", "--run-dir", str(base), f"data.corpus={corpus}", "name=tiny", *TINY]) == 0
    assert main(["train", "--run-dir", str(res), f"data.corpus={corpus}", "model.arch=residual",
                 f"model.base_run={base}", "objective.name=cnce", "data.batch_size=8", "data.residual.prefix_len=8",
                 f"data.residual.cont_len={CONT}", "data.residual.num_negatives=3", "data.residual.bound_samples=4",
                 "data.residual.max_eval_rows=16", "train.max_steps=8", "train.eval_every=4",
                 "train.checkpoint_every=4", "train.progress=false", "eval.num_samples=2", "optim.warmup_steps=1",
                 "optim.lr=1e-2"]) == 0
    return base, res


def _json(path):
    return json.loads(path.read_text())


def test_residual_commands_end_to_end(runs, tmp_path, capsys):
    _, res = runs
    out = tmp_path / "out"
    common = ["--run", str(res), "--out", str(out), "--max-rows", "6", "--device", "cpu", "--batch-size", "4"]

    assert main(["analyze", "bounds-vs-samples", *common, "--ns", "2", "4", "16", "64"]) == 0
    data = _json(out / "bounds_vs_samples.json")
    curve = data["curve"]
    assert [c["n"] for c in curve] == [2, 4, 16, 64] and data["rows"] == 6 and data["lm_ppl"] > 1
    assert all(c["ppl_lower"] <= c["ppl_upper"] for c in curve)
    assert curve[-1]["ppl_upper"] - curve[-1]["ppl_lower"] < curve[0]["ppl_upper"] - curve[0]["ppl_lower"]
    assert (out / "bounds_vs_samples.png").stat().st_size > 0 and "| n |" in (out / "bounds_vs_samples.md").read_text()

    assert main(["analyze", "unique-ngrams", *common, "--num-candidates", "8"]) == 0
    src = _json(out / "unique_ngrams.json")["sources"]
    assert set(src) == {"real", "lm", "joint"}
    vals = [v for s in src.values() for scope in s.values() for v in scope.values() if v is not None]
    assert vals and all(0.0 <= v <= 100.0 for v in vals)
    assert (out / "unique_ngrams.png").is_file()

    assert main(["analyze", "log-prob-density", *common, "--num-candidates", "8", "--bound-samples", "8"]) == 0
    dens = _json(out / "log_prob_density.json")
    for scorer in ("lm", "joint"):
        for system in ("real", "lm", "joint"):
            s = dens["summary"][scorer][system]
            assert s["n"] == 6 and s["mean"] < 0 and s["std"] >= 0
            assert len(dens["scores"][scorer][system]) == 6
    assert dens["summary"]["lm"]["real"]["mean_minus_real"] == 0.0

    assert main(["analyze", "position-gain", *common, "--num-samples", "8"]) == 0
    pos = _json(out / "position_gain.json")["positions"]
    assert [p["position"] for p in pos] == list(range(1, CONT + 1))
    assert all(p["ppl_lower"] <= p["ppl_upper"] and p["gain_lower"] <= p["gain_upper"] for p in pos)
    assert pos[-1]["exact"] and pos[-1]["ppl_lower"] == pos[-1]["ppl_upper"]
    assert not any(p["exact"] for p in pos[:-1])
    check = _json(out / "position_gain.json")["last_position_check"]
    assert check["ppl_exact"] == pytest.approx(pos[-1]["ppl_estimate"]) and check["num_samples"] == 8
    assert check["ppl_lower"] <= check["ppl_estimate"] <= check["ppl_upper"]
    table = (out / "position_gain.md").read_text()
    assert "bound tightness at the last position" in table
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table.splitlines()) == CONT

    # A/B export: the key names the system behind each text; the real one is the window's own continuation
    ab = ["analyze", "ab-export", "--run", str(res), "--max-rows", "6", "--device", "cpu", "--a", "real",
          "--b", "joint", "--num-candidates", "8"]
    assert main([*ab, "--out", str(tmp_path / "ab0")]) == 0
    pairs = [json.loads(x) for x in (tmp_path / "ab0" / "pairs.jsonl").read_text().splitlines()]
    key = [json.loads(x) for x in (tmp_path / "ab0" / "key.jsonl").read_text().splitlines()]
    _, task, _, _ = _load_run(res, "cpu")
    rows = task.rows["test"][:6]
    real = task.tokenizer.decode_batch(rows[:, 1 + task.prefix_len:].tolist())
    prefixes = task.tokenizer.decode_batch(rows[:, 1:1 + task.prefix_len].tolist())
    assert len(pairs) == len(key) == 6
    for i, (p, k) in enumerate(zip(pairs, key)):
        assert p["id"] == k["id"] and p["prefix"] == prefixes[i] and {k["text_1"], k["text_2"]} == {"real", "joint"}
        assert p["text_1" if k["text_1"] == "real" else "text_2"] == real[i]
    first = [k["text_1"] for k in key]
    assert first.count("real") == 3  # balanced, so shuffled
    assert main([*ab, "--out", str(tmp_path / "ab0b")]) == 0  # same seed: same order and texts
    for f in ("pairs.jsonl", "key.jsonl"):
        assert (tmp_path / "ab0b" / f).read_text() == (tmp_path / "ab0" / f).read_text()
    assert main([*ab, "--out", str(tmp_path / "ab1"), "--seed", "1"]) == 0
    key1 = [json.loads(x)["text_1"] for x in (tmp_path / "ab1" / "key.jsonl").read_text().splitlines()]
    assert key1 != first

    # outputs are never overwritten without --force
    capsys.readouterr()
    assert main([*ab, "--out", str(tmp_path / "ab0")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main([*ab, "--out", str(tmp_path / "ab0"), "--force"]) == 0


def test_residual_commands_validate_inputs(runs, tmp_path, capsys):
    base, res = runs
    out = str(tmp_path / "o")
    assert main(["analyze", "bounds-vs-samples", "--run", str(base), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not a residual-EBM run" in err and "model.arch='transformer'" in err
    assert main(["analyze", "bounds-vs-samples", "--run", str(res), "--out", out, "--ns", "1", "4"]) == 2
    assert "--ns must be ints >= 2" in capsys.readouterr().err
    assert main(["analyze", "ab-export", "--run", str(res), "--out", out, "--a", "lm", "--b", "lm"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["analyze", "position-gain", "--run", str(res), "--out", out, "--max-rows", "0"]) == 2
    assert "max_rows must be a positive int" in capsys.readouterr().err
    assert main(["analyze", "unique-ngrams", "--run", str(tmp_path / "nope"), "--out", out]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_window_ppl_scores_lms_on_the_residual_windows(runs, tmp_path, capsys):
    """The base LM scored by window-ppl reproduces the residual run's own lm_ppl (same windows, same
    conditioning), an LM run with another tokenizer is refused, and the joint bounds are listed."""
    base, res = runs
    out = tmp_path / "w"
    assert main(["analyze", "window-ppl", "--run", str(res), "--lm", str(base), "--out", str(out),
                 "--device", "cpu"]) == 0
    data = _json(out / "window_ppl.json")
    lm_ppl = _json(res / "results.json")["test"]["lm_ppl"]
    by = {e["system"]: e for e in data["entries"]}
    assert by["base LM"]["ppl"] == pytest.approx(lm_ppl, rel=1e-5)
    assert by["base"]["ppl"] == pytest.approx(lm_ppl, rel=1e-5)  # the same run, given as --lm
    joint = by["joint (UniT)"]
    assert joint["ppl_lower"] <= joint["ppl_upper"] and data["cont_len"] == CONT
    other = tmp_path / "other"
    other_tok = other / "tokenizer"
    other_tok.mkdir(parents=True)
    (other_tok / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert main(["analyze", "window-ppl", "--run", str(res), "--lm", str(other), "--out", str(tmp_path / "w2"),
                 "--device", "cpu"]) == 2
    assert "different tokenizer" in capsys.readouterr().err
