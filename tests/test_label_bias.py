"""Label bias (monograph §4.1.2): the ε-smoothed bigram ALM ties the two test sentences, the
bigram GN-ELM fitted by exact MLE ranks "Alice likes tea" above "Tom like tea"."""

import math

import pytest
import torch

from seqebm.cli import main
from seqebm.eval.label_bias import SPACE, TEST, TRAIN, EpsilonBigram, fit_bigram_elm, label_bias_tables


def test_alm_scores_both_test_sentences_equally():
    alm = EpsilonBigram.fit(TRAIN, epsilon=1e-3)
    a, b = (alm.log_prob(s) for s in TEST)
    assert a == pytest.approx(b, abs=1e-12)
    # local normalisation: every history's successors sum to one over the vocabulary and </s>
    for h in ("<s>", "Tom", "like", "likes", "tea"):
        assert sum(alm.prob(w, h) for w in (*alm.vocabulary, "</s>")) == pytest.approx(1.0)
    assert alm.prob("tea", "like") == alm.prob("tea", "likes")


@pytest.mark.parametrize("l2", [0.01, 0.1, 1.0])
def test_gn_elm_ranks_the_frequent_verb_form_higher(l2):
    elm = fit_bigram_elm(l2=l2)
    assert len(elm.features) == 9 and len(SPACE) == 6
    assert elm.log_prob("Alice likes tea") > elm.log_prob("Tom like tea")
    # a normalised distribution over the 6-sentence space
    assert math.fsum(math.exp(elm.log_prob(s)) for s in SPACE) == pytest.approx(1.0)
    # the MLE gradient vanishes: data feature means = model expectations - l2 * λ
    f = torch.tensor([[sum(1 for b in zip(["<s>", *s.split()], [*s.split(), "</s>"]) if b == feat)
                       for feat in elm.features] for s in SPACE], dtype=torch.float64)
    p = torch.tensor([math.exp(elm.log_prob(s)) for s in SPACE], dtype=torch.float64)
    data = f[[SPACE.index(s) for s in TRAIN]].mean(0)
    assert torch.allclose(data - p @ f - l2 * elm.weights, torch.zeros(9, dtype=torch.float64), atol=1e-6)


def test_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="infinite"):
        fit_bigram_elm(l2=0.0)
    with pytest.raises(ValueError, match="outside"):
        fit_bigram_elm(["Bob likes tea"])
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonBigram.fit(TRAIN, epsilon=0.5)
    assert main(["elm", "label-bias", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Alice likes tea" in out and (tmp_path / "label_bias.json").is_file()
    res = label_bias_tables()
    assert res["test"]["Alice likes tea"]["elm"] > res["test"]["Tom like tea"]["elm"]
