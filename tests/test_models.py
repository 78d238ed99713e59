"""Incremental decoding equals the full forward pass, for every seqebm model."""

import pytest
import torch

from seqebm.models.rnn import RNNLM
from seqebm.models.seq2seq import EncoderDecoderTransformer
from seqebm.models.transformer import TransformerLM

V = 23


def _lm(kind: str):
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerLM(V, d_model=32, n_layers=2, n_heads=4, max_len=40, dropout=0.1).eval()
    return RNNLM(V, cell=kind, d_model=16, hidden=24, n_layers=2, dropout=0.1).eval()


def _incremental(model, tokens, chunks, **ctx):
    state = model.init_state(tokens.shape[0], tokens.device, **ctx)
    out, pos = [], 0
    for c in chunks:
        logits, state = model.step(tokens[:, pos:pos + c], state)
        out.append(logits)
        pos += c
    return torch.cat(out, 1), state


@pytest.mark.parametrize("kind", ["transformer", "lstm", "gru"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5], [12]])
def test_step_equals_forward(kind, chunks):
    model = _lm(kind)
    tokens = torch.randint(0, V, (3, 12))
    full = model(tokens)
    inc, _ = _incremental(model, tokens, chunks)
    assert full.shape == (3, 12, V)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "lstm", "gru"])
def test_select_state_shares_prefix(kind):
    """A prefix encoded once and expanded to K rows continues exactly like K separate runs."""
    model = _lm(kind)
    prefix = torch.randint(0, V, (1, 6))
    conts = torch.randint(0, V, (4, 3))
    _, state = model.step(prefix, model.init_state(1, "cpu"))
    state = model.select_state(state, torch.zeros(4, dtype=torch.long))
    shared, _ = model.step(conts, state)
    full = model(torch.cat([prefix.expand(4, -1), conts], 1))[:, 6:]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_select_state_reorders_rows():
    model = _lm("transformer")
    tokens = torch.randint(0, V, (3, 5))
    _, state = model.step(tokens, model.init_state(3, "cpu"))
    perm = torch.tensor([2, 0, 0])
    nxt = torch.randint(0, V, (3, 1))
    a, _ = model.step(nxt, model.select_state(state, perm))
    b = model(torch.cat([tokens[perm], nxt], 1))[:, -1:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seq2seq_step_equals_forward_with_padding():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(V, d_model=32, n_layers=2, n_heads=4, max_len=30).eval()
    source = torch.randint(4, V, (3, 7))
    source[0, 5:] = 0  # padded source row
    tokens = torch.randint(0, V, (3, 9))
    full = model(tokens, source=source)
    inc, _ = _incremental(model, tokens, [1, 3, 1, 4], source=source)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    # padding is ignored: the padded row equals the unpadded run
    alone = model(tokens[:1], source=source[:1, :5])
    torch.testing.assert_close(full[:1], alone, atol=1e-5, rtol=1e-5)


def test_transformer_is_causal():
    model = _lm("transformer")
    tokens = torch.randint(0, V, (1, 10))
    base = model(tokens)
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % V
    out = model(changed)
    torch.testing.assert_close(out[:, :6], base[:, :6])
    assert not torch.allclose(out[:, 6:], base[:, 6:])


def test_too_long_and_bad_ids_raise():
    model = _lm("transformer")
    with pytest.raises(ValueError, match="longer than the model's context max_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="outside \\[0, 23\\)"):
        model(torch.full((1, 3), 23))
    state = model.init_state(1, "cpu")
    model.step(torch.zeros(1, 39, dtype=torch.long), state)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model.step(torch.zeros(1, 2, dtype=torch.long), state)


def test_training_through_step_gives_forward_gradients():
    """The KV cache grows out of place under autograd: step-wise loss has forward's gradient."""
    torch.manual_seed(0)
    model = TransformerLM(V, d_model=32, n_layers=2, n_heads=4, max_len=40, dropout=0.0)
    tokens = torch.randint(0, V, (2, 7))
    inc, _ = _incremental(model, tokens, [1, 2, 1, 3])
    g_inc = torch.autograd.grad(inc.logsumexp(-1).sum(), list(model.parameters()))
    g_full = torch.autograd.grad(model(tokens).logsumexp(-1).sum(), list(model.parameters()))
    for a, b in zip(g_inc, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunks", [[1, 1, 1], [2, 1], [3]])
def test_shared_prefix_cache_equals_copied_cache(chunks):
    """K samples per prefix over one stored prefix == the prefix copied into every row."""
    model = _lm("transformer")
    prefixes = torch.randint(0, V, (2, 6))
    k = 3
    _, state = model.step(prefixes, model.init_state(2, "cpu", capacity=12))
    shared = model.share_state(state, k)
    copied = model.select_state(state, torch.arange(2).repeat_interleave(k))
    conts = torch.randint(0, V, (2 * k, sum(chunks)))
    pos = 0
    for c in chunks:
        a, shared = model.step(conts[:, pos:pos + c], shared)
        b, copied = model.step(conts[:, pos:pos + c], copied)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        pos += c
    full = model(torch.cat([prefixes.repeat_interleave(k, 0), conts], 1))[:, -1]
    torch.testing.assert_close(a[:, -1], full, atol=1e-5, rtol=1e-5)
    # reordering rows (beam search) falls back to a plain cache and stays exact
    perm = torch.tensor([5, 0, 0, 2, 4, 1])
    nxt = torch.randint(0, V, (6, 1))
    x, _ = model.step(nxt, model.select_state(shared, perm))
    y = model(torch.cat([prefixes.repeat_interleave(k, 0)[perm], conts[perm], nxt], 1))[:, -1:]
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
