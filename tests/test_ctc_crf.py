"""CTC-CRF (monograph Eqs. 4.21-4.24), the label n-gram and CTC decoding against exact enumeration.

The oracle enumerates every CTC path pi in {0..V}^T of a tiny problem (V <= 3 labels, T <= 4
frames) and scores it with a pure-Python potential phi(pi) = log p_LM(B(pi)) + sum_t log p(pi_t|x).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from seqebm.structured.ctc_crf import (CTCCRFLoss, DenominatorGraph, ctc_crf_denominator,
                                       ctc_crf_denominator_autograd, ctc_crf_numerator)
from seqebm.structured.ctc_decode import NGramScorer, collapse, ctc_greedy_decode, ctc_prefix_beam_search
from seqebm.structured.label_ngram import LabelNGram

V = 2
TRAIN = [[1, 2, 1], [2, 2], [1], [1, 1, 2], [2, 1, 2, 2]]


def lm_of(order: int, num_labels: int = V) -> LabelNGram:
    return LabelNGram.fit(TRAIN, num_labels, order)


def frames(B: int, T: int, C: int, seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g, dtype=torch.float64) * scale).log_softmax(-1)


def path_potentials(lp_row: torch.Tensor, n: int, lm_log_prob) -> dict[tuple[int, ...], list[torch.Tensor]]:
    """Label sequence -> list of phi(pi) over its paths of length n (differentiable in ``lp_row``)."""
    out: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for pi in itertools.product(range(lp_row.shape[-1]), repeat=n):
        y = tuple(collapse(pi))
        out.setdefault(y, []).append(lm_log_prob(list(y)) + sum(lp_row[t, pi[t]] for t in range(n)))
    return out


# ----------------------------------------------------------------------------- label n-gram


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ngram_is_a_distribution_for_every_history(order):
    """Witten-Bell interpolation with a uniform base: sum_k p(k|h) = 1 over V labels + </s>, all > 0."""
    lm = lm_of(order, 3)
    for h in itertools.product(range(4), repeat=max(order - 1, 1)):
        probs = [lm.prob(k, h) for k in range(4)]
        assert min(probs) > 0 and math.isclose(sum(probs), 1.0, rel_tol=1e-12)
    table = lm.log_prob_table()
    assert torch.allclose(table.exp().sum(1), torch.ones(table.shape[0], dtype=torch.float64))


def test_ngram_log_prob_chains_conditionals_and_round_trips(tmp_path):
    lm = lm_of(3)
    y = [1, 2, 2]
    expected = (math.log(lm.prob(1, [0, 0])) + math.log(lm.prob(2, [0, 1])) + math.log(lm.prob(2, [1, 2]))
                + math.log(lm.prob(0, [2, 2])))
    assert lm.log_prob(y) == pytest.approx(expected, abs=1e-12)
    # "<s> 1" starts 3 of the 5 training sequences and "<s> 2" 2 of them: the bigram ranks them so
    big = lm_of(2)
    assert big.prob(1, [0]) > big.prob(2, [0])
    lm.save(tmp_path / "lm.json")
    again = LabelNGram.load(tmp_path / "lm.json")
    assert again.log_prob(y) == lm.log_prob(y)
    assert torch.equal(again.log_prob_table(), lm.log_prob_table())


def test_ngram_bad_input():
    with pytest.raises(ValueError, match=r"sequence 1: label ids must be in 1..2, got \[0, 3\]"):
        LabelNGram.fit([[1], [0, 3]], 2)
    with pytest.raises(ValueError, match="no sequences"):
        LabelNGram.fit([], 2)
    with pytest.raises(ValueError, match="order must be a positive int"):
        LabelNGram(2, 0)


# ----------------------------------------------------------------------------- denominator


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_denominator_equals_enumeration_with_ragged_lengths(order, sparse):
    lm = lm_of(order)
    graph = DenominatorGraph.build(lm, dtype=torch.float64, sparse=sparse)
    lp = frames(3, 4, V + 1).requires_grad_(True)
    lengths = torch.tensor([4, 2, 3])
    den = ctc_crf_denominator(lp, lengths, graph)
    ref = torch.stack([torch.logsumexp(torch.stack([p for ps in path_potentials(lp[b], int(n), lm.log_prob).values()
                                                    for p in ps]), 0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(den, ref, rtol=0, atol=1e-10)
    g_fast = torch.autograd.grad(den.sum(), lp)[0]
    g_ref = torch.autograd.grad(ref.sum(), lp)[0]
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10)
    assert g_fast[1, 2:].abs().max() == 0  # frames past an utterance's end get no gradient


def test_denominator_hand_written_backward_passes_gradcheck_and_matches_autograd():
    lm = lm_of(2)
    graph = DenominatorGraph.build(lm, dtype=torch.float64)
    lengths = torch.tensor([3, 1])
    z = torch.randn(2, 3, V + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ctc_crf_denominator(x.log_softmax(-1), lengths, graph), (z,))
    lp = frames(2, 3, V + 1, seed=3).requires_grad_(True)
    a = torch.autograd.grad(ctc_crf_denominator(lp, lengths, graph).sum(), lp)[0]
    b = torch.autograd.grad(ctc_crf_denominator_autograd(lp, lengths, graph).sum(), lp)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_denominator_is_stable_for_long_confident_inputs():
    """T = 400 frames of near one-hot scores: scaled recursion stays finite and equals the log-space one."""
    lm = lm_of(2)
    graph = DenominatorGraph.build(lm, dtype=torch.float32)
    lp = (torch.randn(2, 400, V + 1) * 30).log_softmax(-1)
    lengths = torch.tensor([400, 250])
    den = ctc_crf_denominator(lp, lengths, graph)
    ref = ctc_crf_denominator_autograd(lp.double(), lengths, DenominatorGraph.build(lm, dtype=torch.float64))
    assert torch.isfinite(den).all()
    torch.testing.assert_close(den.double(), ref, rtol=1e-5, atol=1e-2)


def test_constant_edge_potential_makes_the_denominator_vanish_and_ctc_crf_equal_ctc():
    """With every LM weight set to 1 (a potential constant over label sequences) the denominator sums
    prod_t p(pi_t|x) over *all* paths, which is 1 for log-softmax frames: log Z = 0. Each path must
    be counted exactly once by the graph for this to hold."""
    graph = DenominatorGraph.build(lm_of(2), dtype=torch.float64)
    ones = graph.weights.clone()
    ones[ones > 0] = 1.0
    flat = DenominatorGraph(ones, ones.t().contiguous(), (graph.start > 0).double(), torch.ones_like(graph.end),
                            graph.symbol, graph.histories, graph.num_symbols)
    lp = frames(2, 4, V + 1, seed=5)
    torch.testing.assert_close(ctc_crf_denominator(lp, torch.tensor([4, 3]), flat),
                               torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- numerator and loss


def test_numerator_and_loss_equal_enumeration_and_posteriors_sum_to_one():
    lm = lm_of(2)
    lp = frames(2, 4, V + 1, seed=1).requires_grad_(True)
    lengths = torch.tensor([4, 3])
    targets = [[1, 2], [2, 2]]
    loss = CTCCRFLoss(lm, reduction="none", dtype=torch.float64)(lp, lengths, targets)
    for b, y in enumerate(targets):
        groups = path_potentials(lp[b], int(lengths[b]), lm.log_prob)
        log_z = torch.logsumexp(torch.stack([p for ps in groups.values() for p in ps]), 0)
        num = torch.logsumexp(torch.stack(groups[tuple(y)]), 0)
        num_fast = ctc_crf_numerator(lp[b:b + 1], lengths[b:b + 1], [y], None, lm)[0]
        torch.testing.assert_close(num_fast, num, rtol=0, atol=1e-10)
        torch.testing.assert_close(loss[b], log_z - num, rtol=0, atol=1e-10)
        total = sum(torch.logsumexp(torch.stack(ps), 0).exp() for ps in groups.values())
        assert float((total / log_z.exp()).detach()) == pytest.approx(1.0, abs=1e-12)  # p(y|x) sums to 1 over y
    # gradient of the whole loss (numerator via F.ctc_loss) through a log_softmax equals enumeration
    z = torch.randn(1, 4, V + 1, dtype=torch.float64, requires_grad=True)
    fast = CTCCRFLoss(lm, reduction="sum", dtype=torch.float64)(z.log_softmax(-1), torch.tensor([4]), [[1, 2]])
    g_fast = torch.autograd.grad(fast, z)[0]
    groups = path_potentials(z.log_softmax(-1)[0], 4, lm.log_prob)
    ref = torch.logsumexp(torch.stack([p for ps in groups.values() for p in ps]), 0) \
        - torch.logsumexp(torch.stack(groups[(1, 2)]), 0)
    torch.testing.assert_close(g_fast, torch.autograd.grad(ref, z)[0], rtol=0, atol=1e-10)


def test_ctc_part_equals_enumeration_of_alignments():
    """F.ctc_loss (the numerator's CTC term) = -log sum over alignments, checked by enumeration."""
    lp = frames(1, 4, 4, seed=2)
    y = [3, 1]
    ref = torch.logsumexp(torch.stack([sum(lp[0, t, pi[t]] for t in range(4))
                                       for pi in itertools.product(range(4), repeat=4) if collapse(pi) == y]), 0)
    ctc = F.ctc_loss(lp.transpose(0, 1), torch.tensor([y]), torch.tensor([4]), torch.tensor([2]), reduction="none")
    torch.testing.assert_close(-ctc[0], ref, rtol=0, atol=1e-10)


def test_uniform_unigram_keeps_ctc_ratios_between_equal_length_transcripts():
    """A uniform unigram LM gives log p_LM(y) = (|y| + 1) log(1/(V+1)), which depends on |y| only, so
    p_CRF(y|x)/p_CRF(y'|x) = p_CTC(y|x)/p_CTC(y'|x) when |y| = |y'| and is scaled by (V+1)^(|y'|-|y|)
    otherwise (not equal to CTC: the LM is not constant over sequences)."""
    lm = LabelNGram.fit([[1, 2]], 2, 1)  # each of 1, 2, </s> seen once: Witten-Bell gives exactly 1/3
    assert all(lm.prob(k, []) == pytest.approx(1 / 3) for k in range(3))
    lp = frames(1, 4, V + 1, seed=7)
    lengths = torch.tensor([4])
    loss = CTCCRFLoss(lm, reduction="none", dtype=torch.float64)

    def ctc(y):
        return -F.ctc_loss(lp.transpose(0, 1), torch.tensor([y]), lengths, torch.tensor([len(y)]), reduction="none")[0]

    crf = {tuple(y): -loss(lp, lengths, [y])[0] for y in ([1, 2], [2, 1], [1], [2, 1, 2])}
    torch.testing.assert_close(crf[(1, 2)] - crf[(2, 1)], ctc([1, 2]) - ctc([2, 1]), rtol=0, atol=1e-10)
    torch.testing.assert_close(crf[(1, 2)] - crf[(1,)], ctc([1, 2]) - ctc([1]) - math.log(3), rtol=0, atol=1e-10)
    torch.testing.assert_close(crf[(2, 1, 2)] - crf[(1,)], ctc([2, 1, 2]) - ctc([1]) - 2 * math.log(3),
                               rtol=0, atol=1e-10)


def test_loss_bad_input():
    lm = lm_of(2)
    loss = CTCCRFLoss(lm)
    lp = frames(1, 3, V + 1).float()
    with pytest.raises(ValueError, match="log_softmax over the symbols"):
        loss(lp.exp(), torch.tensor([3]), [[1]])
    with pytest.raises(ValueError, match="has 4 symbols but the graph has 3"):
        loss(torch.zeros(1, 3, 4).log_softmax(-1), torch.tensor([3]), [[1]])
    with pytest.raises(ValueError, match=r"lengths must be in 1..3"):
        loss(lp, torch.tensor([4]), [[1]])
    with pytest.raises(ValueError, match="transcript 0 is empty"):
        loss(lp, torch.tensor([3]), [[]])
    with pytest.raises(ValueError, match=r"transcript 0: label ids must be in 1..2, got \[3\]"):
        loss(lp, torch.tensor([3]), [[3]])
    with pytest.raises(ValueError, match="2 frames cannot carry its 2 labels .*at least 3 frames"):
        loss(frames(1, 2, V + 1).float(), torch.tensor([2]), [[1, 1]])
    with pytest.raises(ValueError, match="reduction must be"):
        CTCCRFLoss(lm, reduction="avg")


# ----------------------------------------------------------------------------- decoding


def _exact_label_scores(lp_row: torch.Tensor, lm=None, weight: float = 1.0) -> dict[tuple[int, ...], float]:
    groups = path_potentials(lp_row, lp_row.shape[0], lambda y: 0.0)
    return {y: float(torch.logsumexp(torch.stack(ps), 0)) + (weight * lm.log_prob(list(y)) if lm else 0.0)
            for y, ps in groups.items()}


@pytest.mark.parametrize("seed", range(4))
def test_prefix_beam_search_with_a_full_beam_is_exact(seed):
    lp = frames(1, 4, 4, seed=seed, scale=2.0)[0]
    exact = _exact_label_scores(lp)
    hyps = ctc_prefix_beam_search(lp, beam_size=10_000, nbest=len(exact))
    assert len(hyps) == len(exact)
    for h in hyps:
        assert h.acoustic == pytest.approx(exact[tuple(h.labels)], abs=1e-9) and h.lm == 0.0
    assert tuple(hyps[0].labels) == max(exact, key=exact.get)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ctc_crf_decoding_is_prefix_search_with_the_label_lm(order):
    """argmax_y p_CTC-CRF(y|x) = argmax_y log p_LM(y) + log sum_{B(pi)=y} prod p: the search with the
    n-gram at weight 1 (with </s>) returns it, and its scores are the numerators up to log Z."""
    lm = lm_of(order)
    lp = frames(1, 4, V + 1, seed=11, scale=1.0)
    exact = _exact_label_scores(lp[0], lm)
    hyps = ctc_prefix_beam_search(lp[0], beam_size=10_000, nbest=3, lm=NGramScorer(lm), lm_weight=1.0)
    assert tuple(hyps[0].labels) == max(exact, key=exact.get)
    for h in hyps:
        assert h.score == pytest.approx(exact[tuple(h.labels)], abs=1e-9)
        if h.labels:
            num = ctc_crf_numerator(lp, torch.tensor([4]), [h.labels], None, lm)[0]
            assert h.score == pytest.approx(float(num), abs=1e-9)


def test_narrow_beam_and_greedy_decoding():
    lp = frames(2, 6, 4, seed=3, scale=4.0)
    greedy = ctc_greedy_decode(lp, torch.tensor([6, 4]))
    assert greedy[0] == collapse(lp[0].argmax(-1).tolist()) and greedy[1] == collapse(lp[1, :4].argmax(-1).tolist())
    hyps = ctc_prefix_beam_search(lp[0], beam_size=2, nbest=5, label_threshold=math.log(1e-3))
    assert 1 <= len(hyps) <= 2  # nbest is capped by the beam
    with pytest.raises(ValueError, match=r"log_probs must be \(T, C\)"):
        ctc_prefix_beam_search(lp)
    with pytest.raises(ValueError, match="beam_size and nbest must be >= 1"):
        ctc_prefix_beam_search(lp[0], beam_size=0)


def test_model_scorer_restricts_and_renormalises_an_autoregressive_lm():
    """ModelScorer(prefix) = log softmax over [</s>, labels] of the LM's logits after BOS + prefix tokens,
    which equals the full forward pass's logits at that position; fusing it changes the ranking."""
    from seqebm.models.rnn import RNNLM
    from seqebm.structured.ctc_decode import ModelScorer

    torch.manual_seed(0)
    lm = RNNLM(8, d_model=8, hidden=8, n_layers=1, cell="lstm").eval()
    label_tokens = [5, 6, 7]  # labels 1, 2, 3 -> tokens 5, 6, 7; </s> = token 2, BOS = token 1
    scorer = ModelScorer(lm, label_tokens, bos_id=1, eos_id=2)
    prefix = (3, 1)
    with torch.no_grad():
        logits = lm(torch.tensor([[1, 7, 5]]))[0, -1]
    expected = torch.log_softmax(logits[[2, 5, 6, 7]], -1)
    torch.testing.assert_close(torch.tensor(scorer(prefix)), expected, rtol=0, atol=1e-5)
    assert math.isclose(sum(math.exp(x) for x in scorer(())), 1.0, rel_tol=1e-6)
    lp = frames(1, 4, 4, seed=9)[0]
    plain = ctc_prefix_beam_search(lp, beam_size=10_000, nbest=1)[0]
    fused = ctc_prefix_beam_search(lp, beam_size=10_000, nbest=1, lm=scorer, lm_weight=1.0)[0]
    assert fused.lm != 0.0 and fused.score == pytest.approx(fused.acoustic + fused.lm, abs=1e-9)
    assert plain.lm == 0.0
