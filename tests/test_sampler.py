"""The sampler against brute force: exact proposal log q, sequence frequencies, sharing, chunking."""

import math
from collections import Counter

import pytest
import torch

from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.sampler import enumerate_proposal, sample

V, EOS = 4, 3
SETTINGS = [
    dict(),
    dict(temperature=0.7, top_k=3),
    dict(top_p=0.8, temperature=1.3),
    dict(top_k=2, top_p=0.9, min_new_tokens=2),
]


def _model(kind="transformer", scale=3.0):
    torch.manual_seed(1)
    if kind == "transformer":
        m = TransformerLM(V, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0)
    else:
        m = RNNLM(V, cell="lstm", d_model=8, n_layers=1, dropout=0.0)
    with torch.no_grad():  # peaky enough for truncation to matter
        for p in m.parameters():
            p.mul_(scale)
    return m.eval()


def _key(tokens, length):
    return tuple(tokens[:length])


@pytest.mark.parametrize("kw", SETTINGS, ids=[str(k) for k in SETTINGS])
@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_log_q_equals_enumerated_proposal(kind, kw):
    model = _model(kind)
    prefix = torch.tensor([[0, 1]])
    exact = enumerate_proposal(model, prefix, 3, eos_id=EOS, **kw)
    assert math.isclose(sum(math.exp(v) for v in exact.values()), 1.0, rel_tol=1e-9)
    out = sample(model, prefix, max_new_tokens=3, num_samples=400, eos_id=EOS,
                 generator=torch.Generator().manual_seed(0), **kw)
    for toks, n, lq in zip(out.tokens.tolist(), out.lengths.tolist(), out.log_q.tolist()):
        assert _key(toks, n) in exact, "sampled a sequence outside the proposal's support"
        assert lq == pytest.approx(exact[_key(toks, n)], abs=1e-5)
    if kw.get("min_new_tokens"):
        assert int(out.lengths.min()) >= 2


def _total_variation(out, exact):
    counts = Counter(_key(t, n) for t, n in zip(out.tokens.tolist(), out.lengths.tolist()))
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(k, 0) / total - math.exp(v)) for k, v in exact.items())


@pytest.mark.parametrize("kw", SETTINGS[1:3], ids=[str(k) for k in SETTINGS[1:3]])
def test_sequence_frequencies_match_the_proposal(kw):
    """TV(empirical, exact) over <= 4+16+64 outcomes; E[TV] ≈ sqrt(outcomes / (2π N)) < 0.03 at N = 20k."""
    model = _model()
    prefix = torch.tensor([[0, 1]])
    exact = enumerate_proposal(model, prefix, 3, eos_id=EOS, **kw)
    out = sample(model, prefix, max_new_tokens=3, num_samples=20000, eos_id=EOS,
                 generator=torch.Generator().manual_seed(3), **kw)
    assert _total_variation(out, exact) < 0.04
    # the test can fail: the same draws judged against a different temperature are far off
    wrong = enumerate_proposal(model, prefix, 3, eos_id=EOS, **{**kw, "temperature": 2.5})
    assert _total_variation(out, wrong) > 0.08


def test_raw_log_p_is_untruncated_model_probability():
    """log p is the model's own log-softmax; with top-k at T = 1, log q - log p = -log(kept mass)."""
    model = _model()
    prefix = torch.tensor([[0]])
    out = sample(model, prefix, max_new_tokens=3, num_samples=50, top_k=2,
                 generator=torch.Generator().manual_seed(0))
    full = torch.cat([prefix.expand(50, -1), out.tokens], 1)
    logp_all = model(full).log_softmax(-1)[:, :-1].double()  # (N, L, V)
    logp = logp_all.gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.token_log_p.double(), logp, atol=1e-5, rtol=0)
    kept = logp_all.topk(2, -1).values.logsumexp(-1)  # log of the top-2 mass at each step
    torch.testing.assert_close(out.token_log_q.double() - out.token_log_p.double(), -kept, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_shared_prefix_equals_reencoding_and_chunking_is_invisible(kind):
    model = _model(kind)
    prefixes = torch.tensor([[0, 1, 2], [0, 2, 2]])
    kw = dict(max_new_tokens=4, eos_id=EOS, top_k=3)
    shared = sample(model, prefixes, num_samples=6, generator=torch.Generator().manual_seed(5), **kw)
    reenc = sample(model, prefixes.repeat_interleave(6, 0), num_samples=1,
                   generator=torch.Generator().manual_seed(5), **kw)
    chunked = sample(model, prefixes, num_samples=6, max_batch_tokens=15,
                     generator=torch.Generator().manual_seed(5), **kw)
    grouped = sample(model, prefixes, num_samples=6, max_batch_tokens=50,  # one shared group per chunk
                     generator=torch.Generator().manual_seed(5), **kw)
    assert shared.prefix_index.tolist() == [0] * 6 + [1] * 6
    for other in (reenc, chunked, grouped):
        assert torch.equal(shared.tokens, other.tokens) and torch.equal(shared.lengths, other.lengths)
        torch.testing.assert_close(shared.token_log_q, other.token_log_q, atol=1e-5, rtol=0)
        torch.testing.assert_close(shared.token_log_p, other.token_log_p, atol=1e-5, rtol=0)


def test_eos_and_padding():
    model = _model()
    out = sample(model, torch.tensor([[0]]), max_new_tokens=5, num_samples=200, eos_id=EOS, pad_id=0,
                 generator=torch.Generator().manual_seed(0))
    for toks, n in zip(out.tokens.tolist(), out.lengths.tolist()):
        assert EOS not in toks[: n - 1] and all(t == 0 for t in toks[n:])
        assert n == 5 or toks[n - 1] == EOS
    assert (out.token_log_q[~out.mask] == 0).all()


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="prefix must be a \\(B, P>=1\\)"):
        sample(model, torch.tensor([0, 1]), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's context max_len=8"):
        sample(model, torch.tensor([[0, 1]]), max_new_tokens=8)
    with pytest.raises(ValueError, match="min_new_tokens needs eos_id"):
        sample(model, torch.tensor([[0]]), max_new_tokens=2, min_new_tokens=1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample(model, torch.tensor([[0]]), max_new_tokens=2, num_samples=0)
