"""N-best rescoring (issue #10): the JSONL format and its errors, the LM flip, tuning that never
raises dev WER over λ = 0 (property sweep), WER by hand, Kneser–Ney by hand and normalisation,
the AR-LM scorer batched == one at a time == a hand sum, and ``seqebm rescore`` end to end."""

from __future__ import annotations

import argparse
import json
import math

import jiwer
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqebm.config import load_config, save_config
from seqebm.data.tokenizers import BOS_ID, EOS_ID, CharTokenizer
from seqebm.eval.rescoring import (
    ARLMScorer,
    NBestHypothesis,
    NBestList,
    NGramSentenceScorer,
    SentenceScorer,
    TableScorer,
    parse_nbest,
    read_nbest,
    register_rescore_command,
    rescore,
    rescore_files,
    tune,
    wer_report,
    write_nbest,
)
from seqebm.models import build_model
from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM
from seqebm.training.checkpoint import save_model
from seqebm.training.experiment import ExperimentConfig


def _line(uid, ref, hyps):
    return json.dumps({"id": uid, "reference": ref,
                       "hypotheses": [{"text": t, "acoustic": a, "lm": lm, "score": None} for t, a, lm in hyps]})


def _rec(uid, ref, hyps):
    """hyps: (text, acoustic, lm) triples."""
    return NBestList(uid, ref, tuple(NBestHypothesis(t, a, lm) for t, a, lm in hyps))


# --------------------------------------------------------------------------- the format


def test_read_write_round_trip_and_the_acoustic_fallback(tmp_path):
    """Missing/null acoustic takes the score; lm may be missing; blank lines are skipped."""
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "u1", "reference": "a b", "extra": 1, "hypotheses": [
            {"text": "a b", "acoustic": -1.5, "lm": -3, "score": -4.5}, {"text": "a", "score": -2.0}]}),
        "",
        json.dumps({"id": 7, "reference": "ünï", "hypotheses": [{"text": "ünï", "acoustic": None, "score": 0}]}),
    ]) + "\n")
    recs = read_nbest(path)
    assert [r.id for r in recs] == ["u1", 7]
    assert recs[0].hypotheses[0] == NBestHypothesis("a b", -1.5, -3.0, -4.5)
    assert recs[0].hypotheses[1] == NBestHypothesis("a", -2.0, None, -2.0)  # AM := score
    assert recs[1].hypotheses[0].acoustic == 0.0 and recs[1].reference == "ünï"
    write_nbest(tmp_path / "copy.jsonl", recs)
    assert read_nbest(tmp_path / "copy.jsonl") == recs
    assert parse_nbest(path.read_text().split("\n")) == recs


GOOD = _line("u0", "a b", [("a b", -1.0, -2.0)])
BAD_LINES = [
    ("{not json", r"not valid JSON"),
    ('["a list"]', r"expected a JSON object"),
    (json.dumps({"reference": "a", "hypotheses": [{"text": "a", "acoustic": 0}]}), r"missing key\(s\) id"),
    (json.dumps({"id": "u1", "hypotheses": [{"text": "a", "acoustic": 0}]}), r"missing key\(s\) reference"),
    (json.dumps({"id": "u1", "reference": "a"}), r"missing key\(s\) hypotheses"),
    (json.dumps({"id": True, "reference": "a", "hypotheses": [{"text": "a", "acoustic": 0}]}), r"id must be"),
    (json.dumps({"id": "u1", "reference": 3, "hypotheses": [{"text": "a", "acoustic": 0}]}), r"reference must be"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": {"text": "a"}}), r"hypotheses must be a list"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": []}), r"empty hypotheses list"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": ["a"]}), r"hypothesis 1 must be a JSON object"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": 0}, {"acoustic": -1}]}),
     r"hypothesis 2 has no text"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": 5, "acoustic": 0}]}), r"text must be a string"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": "-1"}]}),
     r"acoustic must be a number or null, got '-1'"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": True}]}),
     r"acoustic must be a number"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": 0, "lm": [1]}]}),
     r"lm must be a number or null"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "score": "x"}]}),
     r"score must be a number or null"),
    ('{"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": NaN}]}', r"acoustic must be finite"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "lm": -1.0}]}),
     r"hypothesis 1 has neither an acoustic score nor a score"),
    (json.dumps({"id": "u1", "reference": "a", "hypotheses": [{"text": "a", "acoustic": None, "score": None}]}),
     r"neither an acoustic score nor a score"),
    (GOOD, r"duplicate utterance id 'u0' \(first on line 1\)"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_malformed_lines_name_the_file_and_line(tmp_path, bad, message):
    """The bad record sits on physical line 3 (after a good line and a blank line)."""
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n")
    with pytest.raises(ValueError, match=rf"broken\.jsonl, line 3: .*{message}"):
        read_nbest(path)
    with pytest.raises(ValueError, match=rf"<n-best>, line 3: .*{message}"):
        parse_nbest([GOOD, "", bad])


def test_non_utf8_line_and_missing_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + "{\"id\": \"é\"}".encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not UTF-8"):
        read_nbest(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_nbest(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- WER, the flip, tuning


def test_wer_report_by_hand():
    """Refs "the cat sat down" (4 words) and "a dog" (2 words), 6 words in all.

    Utterance 1: hyp 0 "the cat sat up" (1 substitution), hyp 1 "the cat sat down" (0 edits).
    Utterance 2: hyp 0 "a dog" (0), hyp 1 "a frog barks" (1 sub + 1 ins = 2).
    choice (0, 1): 1 + 2 = 3 edits -> WER 3/6; first (0, 0): 1/6; oracle (1, 0): 0/6.
    CER is checked against jiwer.cer on the chosen texts. Utterance 1 alone with hyp 0: 1 substitution
    in 4 words = 25%.
    """
    recs = [_rec("u1", "the cat sat down", [("the cat sat up", -1.0, None), ("the cat sat down", -2.0, None)]),
            _rec("u2", "a dog", [("a dog", -1.0, None), ("a frog barks", -2.0, None)])]
    rep = wer_report(recs, [0, 1])
    assert rep["wer"] == pytest.approx(3 / 6) and rep["first_wer"] == pytest.approx(1 / 6)
    assert rep["oracle_wer"] == 0.0 and rep["utterances"] == 2
    assert rep["cer"] == pytest.approx(jiwer.cer(["the cat sat down", "a dog"], ["the cat sat up", "a frog barks"]))
    assert wer_report(recs[:1], [0])["wer"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="choice 2 is not a hypothesis index"):
        wer_report(recs, [0, 2])
    with pytest.raises(ValueError, match="choice has 1 entries for 2 utterances"):
        wer_report(recs, [0])
    with pytest.raises(ValueError, match="references have no words"):
        wer_report([_rec("e", "", [("x", 0.0, None)])], [0])


def test_an_empty_reference_counts_insertions():
    """Refs "" and "a b c" (3 words, 5 characters); hyps "a b" (2 word / 3 character insertions) and
    "a b c" (exact): WER 2/3, CER 3/5; the other hypothesis "" of the empty reference is exact."""
    recs = [_rec("e", "", [("a b", 0.0, None), ("", -1.0, None)]), _rec("f", "a b c", [("a b c", 0.0, None)])]
    rep = wer_report(recs, [0, 0])
    assert rep["wer"] == pytest.approx(2 / 3) and rep["cer"] == pytest.approx(3 / 5)
    assert rep["oracle_wer"] == 0.0 and rep["first_wer"] == pytest.approx(2 / 3)


def _flip_records():
    """The AM prefers the wrong "the cat sad" by 0.5; the LM prefers "the cat sat" by 6 nats
    (-4 vs -10). Equal lengths, so β changes nothing; λ flips the choice iff 6 λ > 0.5, λ > 1/12."""
    recs = [_rec("u1", "the cat sat", [("the cat sad", -1.0, -10.0), ("the cat sat", -1.5, -4.0)]),
            _rec("u2", "a dog", [("a dog", -0.5, -3.0), ("a dog dog", -2.0, -6.0)])]
    table = TableScorer({"the cat sad": -10.0, "the cat sat": -4.0, "a dog": -3.0, "a dog dog": -6.0})
    return recs, table


def test_the_lm_flips_the_one_best_and_lowers_wer():
    recs, table = _flip_records()
    assert isinstance(table, SentenceScorer)
    assert rescore(recs, table, lm_weight=0.0, length_bonus=0.0) == [0, 0]
    assert wer_report(recs, [0, 0])["wer"] == pytest.approx(1 / 5)  # 1 substitution in 3 + 2 words
    for scorer in (table, None):  # the scorer's scores or the lists' own lm field
        assert rescore(recs, scorer, lm_weight=0.1, length_bonus=0.0) == [1, 0]
        assert rescore(recs, scorer, lm_weight=0.08, length_bonus=0.0) == [0, 0]
    assert wer_report(recs, [1, 0])["wer"] == 0.0
    res = tune(recs, table, lm_weights=[0.05, 0.1, 0.5, 1.0], length_bonuses=[-1, 1])
    assert (res.lm_weight, res.length_bonus, res.wer, res.errors, res.ref_words) == (0.1, 0.0, 0.0, 0, 5)
    assert res.lm_weights == [0.0, 0.05, 0.1, 0.5, 1.0] and res.length_bonuses == [-1.0, 0.0, 1.0]
    assert res.grid_wer[0] == [pytest.approx(1 / 5)] * 3 and res.grid_wer[1][1] == pytest.approx(1 / 5)


def test_a_kneser_ney_lm_flips_it_too():
    """"sad" never occurs in the LM text: <unk> costs log 1e-4 where "sat" after "cat" is likely."""
    recs, _ = _flip_records()
    lm = NGramSentenceScorer.fit(["the cat sat on the mat", "a cat sat", "a dog ran", "the dog sat"], 3)
    s = lm(["the cat sad", "the cat sat"])
    assert s[1] > s[0] + 5
    res = tune(recs, lm)
    assert res.lm_weight > 0 and res.wer == 0.0
    assert rescore(recs, lm, lm_weight=res.lm_weight, length_bonus=res.length_bonus)[0] == 1


def test_a_useless_lm_keeps_lambda_zero():
    """A constant LM never changes a choice: every grid point ties, so λ = 0 and β = 0 win."""
    recs, _ = _flip_records()
    res = tune(recs, TableScorer({}, default=-5.0), lm_weights=[-1, 0.5, 2], length_bonuses=[0.5])
    assert (res.lm_weight, res.length_bonus) == (0.0, 0.0)
    assert res.wer == pytest.approx(1 / 5)


def test_missing_list_lm_and_bad_scorers_are_errors():
    recs = [_rec("u1", "a", [("a", 0.0, -1.0), ("b", -1.0, None)])]
    with pytest.raises(ValueError, match=r"utterance 'u1', hypothesis 2 has no lm score"):
        rescore(recs, lm_weight=1.0, length_bonus=0.0)
    with pytest.raises(ValueError, match=r"TableScorer has no score for 'b'"):
        rescore(recs, TableScorer({"a": 0.0}), lm_weight=1.0, length_bonus=0.0)
    with pytest.raises(ValueError, match=r"must return a \(2,\) tensor"):
        rescore(recs, lambda texts: torch.zeros(3), lm_weight=1.0, length_bonus=0.0)
    with pytest.raises(ValueError, match=r"non-finite score for 'b'"):
        rescore(recs, lambda texts: torch.tensor([0.0, -math.inf]), lm_weight=1.0, length_bonus=0.0)
    with pytest.raises(ValueError, match="length must be one of words, chars"):
        rescore(recs, TableScorer({}, default=0.0), lm_weight=1.0, length_bonus=0.0, length="tokens")


WORDS = ["a", "b", "c"]
sentence = st.lists(st.sampled_from(WORDS), min_size=0, max_size=4).map(" ".join)
half = st.integers(-8, 0).map(lambda x: x / 2)  # coarse scores: ties happen
hyp = st.tuples(sentence, half, half)
utterance = st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join),
                      st.lists(hyp, min_size=1, max_size=4))
grid = st.lists(st.sampled_from([-1.0, -0.5, 0.25, 0.5, 1.0, 2.0]), min_size=1, max_size=4)


def _plain_choice(recs, lam, beta):
    """argmax of AM + λ LM + β words per list, first on ties (pure Python)."""
    out = []
    for r in recs:
        s = [h.acoustic + lam * h.lm + beta * len(h.text.split()) for h in r.hypotheses]
        out.append(s.index(max(s)))
    return out


@settings(max_examples=60, deadline=None)
@given(utts=st.lists(utterance, min_size=1, max_size=4), lams=grid, betas=grid)
def test_tuning_never_raises_dev_wer_over_lambda_zero(utts, lams, betas):
    """Property: over random small n-best lists and grids, the tuned (λ, β) has a dev WER (by jiwer on
    the chosen texts) no higher than λ = 0 with any β of the grid (0 included), and the reported WER
    (from per-hypothesis edit counts) equals jiwer's on rescore()'s choice."""
    recs = [_rec(f"u{i}", ref, hyps) for i, (ref, hyps) in enumerate(utts)]
    refs = [r.reference for r in recs]
    res = tune(recs, lm_weights=lams, length_bonuses=betas)
    choice = rescore(recs, lm_weight=res.lm_weight, length_bonus=res.length_bonus)
    tuned_wer = jiwer.wer(refs, [r.hypotheses[i].text for r, i in zip(recs, choice)])
    assert res.wer == pytest.approx(tuned_wer, abs=1e-12)
    chosen = [r.hypotheses[i].text for r, i in zip(recs, choice)]
    rep = wer_report(recs, choice)
    assert rep["wer"] == pytest.approx(tuned_wer, abs=1e-12)
    assert rep["cer"] == pytest.approx(jiwer.cer(refs, chosen), abs=1e-12)
    assert rep["first_wer"] == pytest.approx(jiwer.wer(refs, [r.hypotheses[0].text for r in recs]), abs=1e-12)
    assert choice == _plain_choice(recs, res.lm_weight, res.length_bonus)
    for beta in [0.0, *betas]:
        base = _plain_choice(recs, 0.0, beta)
        assert tuned_wer <= jiwer.wer(refs, [r.hypotheses[i].text for r, i in zip(recs, base)]) + 1e-12
    am_only = tune(recs, lm_weights=[0.0], length_bonuses=betas)
    assert am_only.lm_weight == 0.0 and res.wer <= am_only.wer + 1e-12


# --------------------------------------------------------------------------- Kneser–Ney


def test_kneser_ney_bigram_by_hand():
    """Corpus "a b", "b"; bigram events <s>a, ab, b</s>, <s>b, b</s>.

    Bigram counts 1, 1, 2, 1: n1 = 3, n2 = 1, D2 = 3/5. Unigram continuation counts a: {<s>} = 1,
    b: {a, <s>} = 2, </s>: {b} = 1 (total 4, 3 types): n1 = 2, n2 = 1, D1 = 1/2; uniform 1/3.
    p1(a) = 0.5/4 + 0.5·3/4·1/3 = 0.25, p1(b) = 1.5/4 + 0.125 = 0.5, p1(</s>) = 0.25.
    p(a|<s>) = 0.4/2 + 0.6·2/2·0.25 = 0.35; p(b|a) = 0.4 + 0.6·0.5 = 0.7;
    p(</s>|b) = 1.4/2 + 0.6·1/2·0.25 = 0.775. Every known symbol also gets the factor 1 - unk_prob.
    """
    eps = 1e-3
    lm = NGramSentenceScorer.fit(["a b", "b"], 2, unk_prob=eps)
    assert lm.discounts == pytest.approx([0.5, 0.6])
    assert lm.prob("a", ["<s>"]) == pytest.approx((1 - eps) * 0.35)
    assert lm.prob("b", ["a"]) == pytest.approx((1 - eps) * 0.7)
    assert lm.prob("</s>", ["b"]) == pytest.approx((1 - eps) * 0.775)
    assert lm.prob("a", ["a"]) == pytest.approx((1 - eps) * 0.6 * 0.25)
    assert lm.prob("zebra", ["a"]) == eps and lm.prob("<unk>", []) == eps
    assert lm(["a b"]).item() == pytest.approx(3 * math.log(1 - eps) + math.log(0.35 * 0.7 * 0.775))
    assert lm(["a zebra"]).item() == pytest.approx(math.log((1 - eps) * 0.35) + math.log(eps)
                                                   + math.log((1 - eps) * 0.25))  # </s> after <unk>: p1


def test_kneser_ney_trigram_continuation_counts():
    """Corpus "x a", "y a", "x b": the unigram count of a is its number of distinct left words {x, y} = 2,
    of b it is {x} = 1, while raw counts of bigrams starting with <s> stay raw (<s> x: 2)."""
    lm = NGramSentenceScorer.fit(["x a", "y a", "x b"], 3)
    assert lm.counts[0][()]["a"] == 2 and lm.counts[0][()]["b"] == 1 and lm.counts[0][()]["</s>"] == 2
    assert lm.counts[1][("<s>",)] == {"x": 2, "y": 1}
    assert lm.counts[2][("<s>", "x")] == {"a": 1, "b": 1}


CORPUS = ["the cat sat on the mat", "the dog sat", "a cat ran on a mat", "the the cat", "", "dogs ran fast"]
HISTORIES = [[], ["<s>"], ["the"], ["cat", "sat"], ["mat", "the"], ["zzz"], ["the", "zzz"], ["on", "the"],
             ["<s>", "a"], ["sat", "sat", "sat"]]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_sums_to_one(order, tmp_path):
    """Σ over the words, </s> and <unk> of p(w | h) = 1 for seen, unseen and <unk> histories; the
    JSON round trip gives the same scores."""
    lm = NGramSentenceScorer.fit(CORPUS, order)
    vocab = lm.vocabulary()
    assert vocab[-2:] == ["</s>", "<unk>"] and len(vocab) == 10 + 2
    for h in HISTORIES:
        probs = [lm.prob(w, h) for w in vocab]
        assert min(probs) > 0
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-12), h
    lm.save(tmp_path / "lm.json")
    again = NGramSentenceScorer.load(tmp_path / "lm.json")
    texts = ["the cat sat", "zzz the mat", "", "a a a a"]
    assert torch.equal(again(texts), lm(texts))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(ValueError, match="not a saved NGramSentenceScorer"):
        NGramSentenceScorer.load(tmp_path / "bad.json")


def test_kneser_ney_validates():
    with pytest.raises(ValueError, match="reserved word"):
        NGramSentenceScorer.fit(["a </s> b"], 2)
    with pytest.raises(ValueError, match="no sentences"):
        NGramSentenceScorer.fit([], 2)
    with pytest.raises(ValueError, match="order must be a positive int"):
        NGramSentenceScorer.fit(["a"], 0)


# --------------------------------------------------------------------------- the AR-LM scorer

TEXTS = ["the cat", "", "a dog sat on the mat", "cat", "the the the cat sat", "tac"]


@pytest.fixture(scope="module")
def char_lm():
    torch.manual_seed(0)
    tok = CharTokenizer.train(TEXTS)
    return TransformerLM(tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_len=32, dropout=0.3), tok


def _hand_log_prob(model, ids):
    """Σ_t log softmax(model(x[:-1]))[t, x[t+1]] for x = [BOS] + ids + [EOS]."""
    x = torch.tensor([[BOS_ID, *ids, EOS_ID]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]), -1)[0]  # (T-1, V)
    return sum(float(logp[t, x[0, t + 1]]) for t in range(x.shape[1] - 1))


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_ar_scorer_batched_equals_one_at_a_time_and_a_hand_sum(char_lm, arch):
    model, tok = char_lm
    if arch == "gru":
        torch.manual_seed(1)
        model = RNNLM(tok.vocab_size, cell="gru", d_model=16, n_layers=2, dropout=0.3)
    model.train()  # the scorer switches dropout off and restores the mode
    scorer = ARLMScorer(model, tok, batch_size=4)
    batched = scorer(TEXTS)
    assert model.training and batched.dtype == torch.float64 and batched.shape == (len(TEXTS),)
    single = torch.cat([ARLMScorer(model, tok, batch_size=1)([t]) for t in TEXTS])
    assert torch.allclose(batched, single, atol=1e-5, rtol=0)
    model.eval()
    hand = torch.tensor([_hand_log_prob(model, tok.encode(t)) for t in TEXTS], dtype=torch.float64)
    assert torch.allclose(batched, hand, atol=1e-4, rtol=0)
    no_eos = ARLMScorer(model, tok, add_eos=False)(TEXTS)
    assert no_eos[1] == 0.0 and bool((no_eos[[0, 2, 3, 4, 5]] > batched[[0, 2, 3, 4, 5]]).all())


def test_ar_scorer_rejects_sentences_longer_than_the_context(char_lm):
    model, tok = char_lm
    with pytest.raises(ValueError, match=r"longer than the LM's context \(max_len=32"):
        ARLMScorer(model, tok)(["cat " * 10])


def _fake_lm_run(root, tok):
    """A run folder that load_base_lm accepts: config.yaml, tokenizer/, model.safetensors (untrained)."""
    run = root / "lm-run"
    run.mkdir()
    cfg = load_config(ExperimentConfig, None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                                               "data.seq_len=40", "data.tokenizer=char"])
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer")
    torch.manual_seed(3)
    m = cfg.model
    model = build_model(m.arch, tok.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                        d_ff=m.d_ff, dropout=0.0, max_len=cfg.data.seq_len + 1, tie_embeddings=m.tie_embeddings)
    save_model(model, run / "model.safetensors")
    return run, model


def test_ar_scorer_from_run(tmp_path, char_lm):
    _, tok = char_lm
    run, model = _fake_lm_run(tmp_path, tok)
    from_run = ARLMScorer.from_run(run, device="cpu")
    assert torch.allclose(from_run(TEXTS), ARLMScorer(model.eval(), tok)(TEXTS), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- files and CLI


def _rescore_cli(argv):
    parser = argparse.ArgumentParser(prog="seqebm")
    register_rescore_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rescore", *argv])
    return args.func(args)


@pytest.fixture
def nbest_files(tmp_path):
    """Dev = the flip example. Test: "the cat sad" (AM -1, lm -10) vs "the cat sat" (AM -1.2, lm -4),
    reference "the cat sat on" (4 words): the list's 1-best has 2 edits (sad->sat, on deleted),
    the other 1; with λ = 0.1 (tuned on dev) it wins: 1/4 vs 2/4; oracle 1/4."""
    recs, _ = _flip_records()
    write_nbest(tmp_path / "dev.jsonl", recs)
    (tmp_path / "test.jsonl").write_text(_line("t1", "the cat sat on", [("the cat sad", -1.0, -10.0),
                                                                       ("the cat sat", -1.2, -4.0)]) + "\n")
    (tmp_path / "lm.txt").write_text("the cat sat on the mat\n\na cat sat\na dog ran\nthe dog sat\n")
    return tmp_path


def test_rescore_cli_with_the_list_lm(nbest_files, capsys):
    d = nbest_files
    out = d / "out"
    argv = ["--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl"), "--use-list-lm", "--lm-weights", "0.05",
            "0.1", "1", "--length-bonuses", "-1", "1", "--out", str(out)]
    assert _rescore_cli(argv) == 0
    data = json.loads((out / "rescore.json").read_text())
    assert (data["lm_weight"], data["length_bonus"], data["am_only_length_bonus"]) == (0.1, 0.0, 0.0)
    dev, test = data["sets"]
    assert dev["role"] == "dev" and dev["rescored"]["wer"] == 0.0 and dev["am_only"]["wer"] == pytest.approx(0.2)
    assert test["name"] == "test" and test["first_wer"] == pytest.approx(0.5) and test["oracle_wer"] == 0.25
    assert test["am_only"]["wer"] == pytest.approx(0.5) and test["rescored"]["wer"] == pytest.approx(0.25)
    md = (out / "rescore.md").read_text()
    assert "| test | 1 | 50.00 | 25.00 | 50.00 | 25.00 | 0.1 | 0 | 0 |" in md
    assert "| dev (dev, tuning set) | 2 | 20.00 | 0.00 | 20.00 | 0.00 |" in md
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        _rescore_cli(argv)
    assert _rescore_cli([*argv, "--force"]) == 0


def test_rescore_cli_with_an_ngram_and_an_ar_lm(nbest_files, char_lm):
    d = nbest_files
    common = ["--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl"), str(d / "dev.jsonl")]
    assert _rescore_cli([*common, "--ngram-train", str(d / "lm.txt"), "--ngram-order", "2", "--out",
                         str(d / "o1")]) == 0
    data = json.loads((d / "o1" / "rescore.json").read_text())
    assert data["lm_weight"] > 0 and "2-gram" in data["scorer"] and len(data["sets"]) == 3
    assert data["sets"][1]["rescored"]["wer"] == pytest.approx(0.25)

    run, _ = _fake_lm_run(d, char_lm[1])
    assert _rescore_cli([*common[:4], "--lm-run", str(run), "--device", "cpu", "--out", str(d / "o2"),
                         "--name", "ar", "--length", "chars"]) == 0
    data = json.loads((d / "o2" / "ar.json").read_text())
    assert data["length"] == "chars" and "TransformerLM" in data["scorer"]
    assert data["sets"][0]["rescored"]["wer"] <= data["sets"][0]["am_only"]["wer"]


def test_rescore_cli_errors(nbest_files):
    d = nbest_files
    with pytest.raises(ValueError, match="--ngram-order needs --ngram-train"):
        _rescore_cli(["--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl"), "--use-list-lm",
                      "--ngram-order", "2", "--out", str(d / "o")])
    with pytest.raises(SystemExit):  # exactly one LM source
        _rescore_cli(["--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl"), "--out", str(d / "o")])
    (d / "bad.jsonl").write_text(GOOD + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        _rescore_cli(["--dev", str(d / "dev.jsonl"), "--test", str(d / "bad.jsonl"), "--use-list-lm",
                      "--out", str(d / "o")])
    assert not (d / "o").exists()


def test_rescore_files_with_a_ready_scorer(nbest_files):
    """Any SentenceScorer plugs in (e.g. a future energy-based LM); the grid-edge note fires at λ = 0.1."""
    _, table = _flip_records()
    a = rescore_files(nbest_files / "dev.jsonl", [nbest_files / "test.jsonl"], table, lm_weights=[0.1],
                      length_bonuses=[0.0])
    assert a.data["lm_weight"] == 0.1 and "TableScorer" in a.data["scorer"]
    assert "edge of its grid" in a.markdown


def test_am_score_uses_the_recognisers_total_score():
    """am="score": AM(y) is each hypothesis's total score (for CTC-CRF: acoustic + its label n-gram)."""
    recs = parse_nbest([
        json.dumps({"id": "u1", "reference": "a b", "hypotheses": [
            {"text": "a c", "acoustic": -1.0, "lm": -5.0, "score": -6.0},
            {"text": "a b", "acoustic": -1.5, "lm": -1.0, "score": -2.5}]}),
    ])
    assert rescore(recs, None, lm_weight=0.0, length_bonus=0.0) == [0]
    assert rescore(recs, None, lm_weight=0.0, length_bonus=0.0, am="score") == [1]
    # with am="score" the list's own lm then counts twice at λ = 1: still hypothesis 1, by a wider margin
    assert tune(recs, None, lm_weights=[1.0], length_bonuses=[0.0], am="score").wer == 0.0
    no_score = parse_nbest([_line("u2", "a", [("a", -1.0, -1.0), ("b", -2.0, -1.0)])])
    with pytest.raises(ValueError, match="'u2', hypothesis 1 has no score"):
        rescore(no_score, None, lm_weight=0.0, length_bonus=0.0, am="score")
    with pytest.raises(ValueError, match="am must be one of acoustic, score"):
        rescore(recs, None, lm_weight=0.0, length_bonus=0.0, am="total")
