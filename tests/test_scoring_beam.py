"""Batched scoring equals the per-sequence loop; beam search finds the exact best sequence."""

import math

import pytest
import torch

from seqebm.models.rnn import RNNLM
from seqebm.models.seq2seq import EncoderDecoderTransformer
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.beam import beam_search
from seqebm.sampling.sampler import enumerate_proposal
from seqebm.sampling.scoring import sequence_log_prob

V, EOS = 4, 3


def _lm(kind="transformer"):
    torch.manual_seed(2)
    m = (TransformerLM(V, d_model=16, n_layers=1, n_heads=2, max_len=10, dropout=0.0) if kind == "transformer"
         else RNNLM(V, cell="gru", d_model=8, n_layers=1, dropout=0.0))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m.eval()


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_batched_scoring_equals_loop_with_padding(kind):
    model = _lm(kind)
    seqs = [[0, 1, 2, 3], [0, 2], [0, 1, 1, 1, 2, 3]]
    prefix = torch.tensor([1, 1, 3])
    t = max(map(len, seqs))
    tokens = torch.zeros(3, t, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    batched = sequence_log_prob(model, tokens, prefix_len=prefix, lengths=lengths)
    for i, s in enumerate(seqs):
        logp = model(torch.tensor([s[:-1]])).log_softmax(-1)[0].double().detach()
        expected = sum(float(logp[j - 1, s[j]]) for j in range(int(prefix[i]), len(s)))
        assert float(batched[i]) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="need 1 <= prefix_len <= lengths"):
        sequence_log_prob(model, tokens, prefix_len=0)


def _best_by_enumeration(model, prefix, max_new, length_penalty):
    exact = enumerate_proposal(model, prefix, max_new, eos_id=EOS)  # T = 1, no truncation: q = p
    return max(exact.items(), key=lambda kv: kv[1] / (len(kv[0]) ** length_penalty))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_exhaustive_beam_finds_the_exact_best(kind, length_penalty):
    """beam = V^(L-1) keeps every prefix alive, so beam search is exhaustive; L = 2 with beam = V too."""
    model = _lm(kind)
    prefix = torch.tensor([[0, 2]])
    for max_new, beam in ((3, V ** 2), (2, V)):
        best, logp = _best_by_enumeration(model, prefix, max_new, length_penalty)
        out = beam_search(model, prefix, max_new_tokens=max_new, beam_size=beam, eos_id=EOS,
                          length_penalty=length_penalty)
        assert tuple(out.tokens[0, : out.lengths[0]].tolist()) == best
        assert float(out.log_probs[0]) == pytest.approx(logp, abs=1e-5)


def test_beam_one_is_greedy_and_wider_beams_never_score_worse():
    from seqebm.sampling.basic import generate

    model = _lm()
    prefix = torch.tensor([[0, 1], [0, 2]])
    greedy = generate(model, prefix, 5, greedy=True, eos_id=EOS)
    b1 = beam_search(model, prefix, max_new_tokens=5, beam_size=1, eos_id=EOS, length_penalty=0.0)
    for r in range(2):
        assert b1.tokens[r, : b1.lengths[r]].tolist() == greedy[r, : b1.lengths[r]].tolist()
    scores = [beam_search(model, prefix, max_new_tokens=5, beam_size=k, eos_id=EOS, length_penalty=0.0).scores
              for k in (1, 3, 16)]
    assert (scores[1] >= scores[0] - 1e-9).all() and (scores[2] >= scores[1] - 1e-9).all()


def test_seq2seq_beam_batched_equals_one_by_one():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(7, d_model=16, n_layers=1, n_heads=2, max_len=12, dropout=0.0).eval()
    source = torch.tensor([[4, 5, 6, 0], [5, 5, 0, 0], [6, 4, 4, 4]])
    prefix = torch.full((3, 1), 1)
    batched = beam_search(model, prefix, max_new_tokens=6, beam_size=3, eos_id=2, context={"source": source})
    for r in range(3):
        src = source[r:r + 1, : int((source[r] != 0).sum())]
        one = beam_search(model, prefix[:1], max_new_tokens=6, beam_size=3, eos_id=2, context={"source": src})
        assert batched.tokens[r].tolist() == one.tokens[0].tolist()
        assert math.isclose(float(batched.scores[r]), float(one.scores[0]), abs_tol=1e-5)
