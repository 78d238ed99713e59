"""Text metrics agree with their reference implementations called directly; hand-checked values."""

import random
import warnings

import pytest

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

from seqebm.eval import metrics as M  # noqa: E402
from seqebm.eval import wordnet as W  # noqa: E402

HYPS = [
    "The cat sat on the mat .",
    "A dog barked loudly at the postman this morning .",
    "It is raining in Paris today .",
    "We will meet at noon near the old bridge .",
]
REFS = [
    "The cat was sitting on the mat .",
    "The dog barked at the postman this morning .",
    "Today it rains in Paris .",
    "We meet at twelve by the old bridge .",
]
REFS_B = [
    "A cat sat on a mat .",
    "This morning a dog barked at the mailman .",
    "It is raining in Paris .",
    "At noon we will meet by the old bridge .",
]


def test_corpus_bleu_equals_sacrebleu_score_and_signature():
    ours = M.corpus_bleu(HYPS, REFS)
    direct = sacrebleu.corpus_bleu(HYPS, [REFS])
    metric = sacrebleu.metrics.BLEU(tokenize="13a")
    metric.corpus_score(HYPS, [REFS])
    assert ours["bleu"] == pytest.approx(direct.score, abs=1e-12)
    assert ours["signature"] == str(metric.get_signature())
    assert "tok:13a" in ours["signature"] and "nrefs:1" in ours["signature"]
    assert ours["precisions"] == pytest.approx(direct.precisions)
    assert (ours["bp"], ours["sys_len"], ours["ref_len"]) == (pytest.approx(direct.bp), direct.sys_len, direct.ref_len)
    assert 0 < ours["bleu"] < 100
    # tokenizer choice reaches sacrebleu
    assert M.corpus_bleu(HYPS, REFS, tokenize="char")["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="char").score)


def test_corpus_bleu_multi_reference_convention():
    """Per-hypothesis lists = sacrebleu streams transposed; a varying count maps to None padding."""
    per_hyp = [[a, b] for a, b in zip(REFS, REFS_B)]
    ours = M.corpus_bleu(HYPS, per_hyp)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS_B]).score)
    assert "nrefs:2" in ours["signature"]
    assert M.references_from_streams([REFS, REFS_B]) == per_hyp
    assert ours["bleu"] > M.corpus_bleu(HYPS, REFS)["bleu"]  # a second reference can only help

    varying = [[REFS[0], REFS_B[0]], REFS[1], [REFS[2]], [REFS[3], REFS_B[3]]]
    streams = [REFS, [REFS_B[0], None, None, REFS_B[3]]]
    assert M.corpus_bleu(HYPS, varying)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)


def test_rouge_equals_rouge_scorer_averaged_by_hand():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, REFS)]  # (target, prediction)
    ours = M.rouge(HYPS, REFS)
    assert set(ours) == {"rouge1", "rouge2", "rougeL"}
    for key in ours:
        assert ours[key] == pytest.approx(100 * sum(s[key].fmeasure for s in per_pair) / len(HYPS))
    # several references: the best one per type (rouge_score's score_multi), still averaged
    multi = M.rouge(HYPS, [[a, b] for a, b in zip(REFS, REFS_B)])
    for key in multi:
        best = [max(scorer.score(a, h)[key].fmeasure, scorer.score(b, h)[key].fmeasure)
                for h, a, b in zip(HYPS, REFS, REFS_B)]
        assert multi[key] == pytest.approx(100 * sum(best) / len(HYPS))


def test_unique_ngram_fraction_hand_example():
    """["a a b"]: unigrams a, a, b -> 2 distinct / 3 = 66.67%.

    ["a a b", "b a"]: unigrams a a b b a -> {a, b} = 2/5 = 40%; bigrams (a a), (a b), (b a) are all
    distinct = 3/3 = 100% (none crosses the text boundary, so no (b b)); one trigram -> 100%;
    no 4-gram at all -> 0.0 by convention.
    """
    assert M.unique_ngram_fraction(["a a b"], 1) == pytest.approx(200 / 3)
    texts = ["a a b", "b a"]
    assert M.unique_ngram_fraction(texts, 1) == pytest.approx(40.0)
    assert M.unique_ngram_fraction(texts, 2) == pytest.approx(100.0)
    assert M.unique_ngrams(texts) == pytest.approx(
        {"unique_1": 40.0, "unique_2": 100.0, "unique_3": 100.0, "unique_4": 0.0})
    assert M.unique_ngram_fraction(["x y", "x y"], 2) == pytest.approx(50.0)  # distinct over the set


def test_self_bleu_extremes():
    same = ["the quick brown fox jumps over the lazy dog"] * 4
    assert M.self_bleu(same) == pytest.approx(100.0)
    disjoint = ["a b c d e", "f g h i j", "k l m n o"]
    assert M.self_bleu(disjoint) == pytest.approx(0.0, abs=1e-9)


def test_self_bleu_equals_sentence_bleu_against_all_others():
    rng = random.Random(3)
    vocab = "a b c d e f g h".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(30)]
    texts += ["a b c", "a b c", "Hello, world!"]  # duplicates, an equal length, punctuation for 13a
    expected = sum(sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:]).score
                   for i, t in enumerate(texts)) / len(texts)
    assert M.self_bleu(texts) == pytest.approx(expected, abs=1e-9)
    # max_texts: self-BLEU within a seeded random subset
    keep = sorted(random.Random(7).sample(range(len(texts)), 10))
    assert M.self_bleu(texts, max_texts=10, seed=7) == pytest.approx(M.self_bleu([texts[i] for i in keep]))


def test_bleu_by_length_buckets_and_subset_bleu():
    refs = [" ".join(["w"] * n) for n in (3, 9, 10, 19, 25, 50, 60)]
    hyps = [" ".join(["w"] * max(n - 2, 1)) + " x" for n in (3, 9, 10, 19, 25, 50, 60)]
    rows = M.bleu_by_length(hyps, refs)
    assert [r["bucket"] for r in rows] == ["<10", "10-19", "20-29", "30-39", "40-49", ">=50"]
    assert [r["count"] for r in rows] == [2, 2, 1, 0, 0, 2]
    members = {"<10": [0, 1], "10-19": [2, 3], "20-29": [4], ">=50": [5, 6]}
    for row in rows:
        if row["count"] == 0:
            assert row["bleu"] is None
        else:
            idx = members[row["bucket"]]
            direct = sacrebleu.corpus_bleu([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
            assert row["bleu"] == pytest.approx(direct)
    custom = M.bleu_by_length(hyps, refs, buckets=[20])
    assert [(r["bucket"], r["count"]) for r in custom] == [("<20", 4), (">=20", 3)]


def test_meteor_matches_nltk_when_wordnet_is_available():
    if not M.meteor_available():
        pytest.skip("no local WordNet (e.g. `apt-get install wordnet-base`): the None+warning path is tested")
    from nltk.translate.meteor_score import meteor_score

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "METEOR skipped" warning
        ours = M.meteor(HYPS, REFS)
    with W.wordnet_session() as wordnet:
        assert wordnet is not None
        expected = [meteor_score([r.split()], h.split(), wordnet=wordnet) for h, r in zip(HYPS, REFS)]
        assert {lemma.name() for s in wordnet.synsets("rug") for lemma in s.lemmas()} >= {"carpet"}
        assert wordnet.synset("dog.n.01").lexname() == "noun.animal"  # lexnames (served if missing)

        class NoSynonyms:
            def synsets(self, word):
                return []

        without_wordnet = meteor_score([["the", "carpet"]], ["the", "rug"], wordnet=NoSynonyms())
    assert ours == pytest.approx(100 * sum(expected) / len(expected))
    assert M.meteor(["the rug"], ["the carpet"]) > 100 * without_wordnet  # synonyms are matched


def test_meteor_skipped_with_warning_when_wordnet_is_missing():
    if M.meteor_available():
        pytest.skip(f"WordNet is available here ({W.find_wordnet()}); the forced-missing test covers this path")
    with pytest.warns(UserWarning, match="METEOR skipped"):
        assert M.meteor(HYPS, REFS) is None


def test_meteor_forced_missing_wordnet_returns_none_with_warning(monkeypatch):
    monkeypatch.setattr(W, "find_wordnet", lambda: None)
    monkeypatch.setattr(M, "find_wordnet", lambda: None)
    assert not M.meteor_available()
    with pytest.warns(UserWarning, match="METEOR skipped.*wordnet-base"):
        assert M.meteor(HYPS, REFS) is None


def test_text_metrics_bundles_what_applies():
    no_refs = M.text_metrics(HYPS)
    assert set(no_refs) == {"unique_1", "unique_2", "unique_3", "unique_4", "self_bleu"}
    assert no_refs["self_bleu"] == pytest.approx(M.self_bleu(HYPS))
    assert M.text_metrics(HYPS[:1])["self_bleu"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # METEOR may be skipped with a warning
        full = M.text_metrics(HYPS, REFS)
    assert full["bleu"] == pytest.approx(M.corpus_bleu(HYPS, REFS)["bleu"])
    assert full["bleu_signature"].startswith("nrefs:1|")
    assert full["rouge1"] == pytest.approx(M.rouge(HYPS, REFS)["rouge1"])
    assert full["bleu_by_length"] == M.bleu_by_length(HYPS, REFS)
    assert "meteor" in full and (full["meteor"] is None) == (not M.meteor_available())


@pytest.mark.parametrize("call, match", [
    (lambda: M.corpus_bleu(HYPS, REFS[:3]), "got 4 hypotheses but 3 references"),
    (lambda: M.rouge(HYPS[:2], REFS), "got 2 hypotheses but 4 references"),
    (lambda: M.corpus_bleu([], []), "at least 1"),
    (lambda: M.corpus_bleu("a hypothesis", ["a reference"]), "must be a list of strings"),
    (lambda: M.corpus_bleu(["a", "b"], ["a", []]), r"references\[1\] is an empty list"),
    (lambda: M.corpus_bleu(["a", "b"], ["a", 3]), r"references\[1\] must be a string or a list"),
    (lambda: M.corpus_bleu(["a", None], ["a", "b"]), r"hypotheses\[1\] must be a string"),
    (lambda: M.corpus_bleu(HYPS, REFS, tokenize="nope"), "unknown sacrebleu tokenize"),
    (lambda: M.meteor(HYPS, REFS[:1]), "got 4 hypotheses but 1 references"),
    (lambda: M.unique_ngram_fraction(["a b"], 0), "n must be a positive int"),
    (lambda: M.unique_ngrams([]), "at least 1"),
    (lambda: M.self_bleu(["only one"]), "at least 2"),
    (lambda: M.self_bleu(HYPS, max_texts=1), "max_texts must be an int >= 2"),
    (lambda: M.bleu_by_length(HYPS, REFS, buckets=[10, 10]), "strictly increasing"),
    (lambda: M.bleu_by_length(HYPS, REFS, buckets=[]), "non-empty list of ints"),
    (lambda: M.references_from_streams([REFS, REFS[:2]]), "different lengths"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
