"""Tests for the Hugging Face causal-LM adapter (tiny offline configs, no downloads).

Notation: B batch, T length, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqebm.models.base import AutoregressiveModel  # noqa: E402
from seqebm.models.hf import HFCausalLM, HFState  # noqa: E402

V, T = 50, 24


def tiny_gpt2() -> HFCausalLM:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )
    return HFCausalLM.from_config(cfg).eval()


def tiny_llama() -> HFCausalLM:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return HFCausalLM.from_config(cfg, model_type="llama").eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def random_tokens(b: int, t: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


@pytest.fixture(params=sorted(BUILDERS))
def model(request: pytest.FixtureRequest) -> HFCausalLM:
    return BUILDERS[request.param]()


def test_attributes_and_protocol(model: HFCausalLM) -> None:
    assert isinstance(model, AutoregressiveModel)
    assert model.vocab_size == V and model.max_len == 64 and model.bos_id == 1


def test_bos_fallback_when_config_bos_out_of_vocab() -> None:
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4)
    cfg.bos_token_id = 50256  # GPT-2 default, outside a tiny vocabulary
    assert HFCausalLM(transformers.GPT2LMHeadModel(cfg)).bos_id == 0
    with pytest.raises(ValueError, match="bos_id"):
        HFCausalLM(transformers.GPT2LMHeadModel(cfg), bos_id=V)


def test_logits_equal_hf_logits(model: HFCausalLM) -> None:
    tokens = random_tokens(3)
    with torch.no_grad():
        ours = model(tokens)
        theirs = model.model(tokens).logits
    assert ours.shape == (3, T, V) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float())


@pytest.mark.parametrize("chunks", [[1] * T, [5, 1, 10, 8], [T]])
def test_step_matches_forward(model: HFCausalLM, chunks: list[int]) -> None:
    tokens = random_tokens(2, seed=2)
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(2, "cpu")
        outs, start = [], 0
        for size in chunks:
            logits, new_state = model.step(tokens[:, start : start + size], state)
            assert new_state.length == start + size and state.length == start
            outs.append(logits)
            state, start = new_state, start + size
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_step_is_functional(model: HFCausalLM) -> None:
    """Two different continuations of one state: neither corrupts the other."""
    tokens = random_tokens(2, seed=3)
    other = tokens.clone()
    other[:, 10:] = (other[:, 10:] + 7) % V
    with torch.no_grad():
        _, state = model.step(tokens[:, :10], model.init_state(2, "cpu"))
        a, _ = model.step(tokens[:, 10:], state)
        b, _ = model.step(other[:, 10:], state)
        a2, _ = model.step(tokens[:, 10:], state)
        assert state.past.get_seq_length() == 10
        torch.testing.assert_close(a, model(tokens)[:, 10:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, model(other)[:, 10:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a2, a)


def test_select_state_with_repeats(model: HFCausalLM) -> None:
    tokens = random_tokens(3, seed=4)
    index = torch.tensor([2, 0, 2, 2, 1])
    with torch.no_grad():
        _, state = model.step(tokens[:, :9], model.init_state(3, "cpu"))
        sel = model.select_state(state, index)
        assert isinstance(sel, HFState) and sel.batch_size == 5 and sel.length == 9
        # Continue the selected rows one token at a time; compare with rows run separately.
        outs = []
        for t in range(9, T):
            logits, sel = model.step(tokens[index, t : t + 1], sel)
            outs.append(logits)
        ref = torch.cat([model(tokens[i : i + 1]) for i in index.tolist()], 0)[:, 9:]
        torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)
        # The original state is still usable with its own batch.
        logits, _ = model.step(tokens[:, 9:], state)
        torch.testing.assert_close(logits, model(tokens)[:, 9:], atol=1e-5, rtol=1e-5)


def test_select_state_on_empty_state(model: HFCausalLM) -> None:
    tokens = random_tokens(4, seed=5)
    with torch.no_grad():
        sel = model.select_state(model.init_state(2, "cpu"), torch.tensor([0, 1, 1, 0]))
        logits, _ = model.step(tokens, sel)
    torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_save_and_from_pretrained_round_trip(model: HFCausalLM, tmp_path: Path) -> None:
    model.model.save_pretrained(tmp_path / "tiny")
    loaded = HFCausalLM.from_pretrained(tmp_path / "tiny").eval()
    assert type(loaded.model) is type(model.model)
    assert (loaded.vocab_size, loaded.max_len, loaded.bos_id) == (V, 64, 1)
    tokens = random_tokens(2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_from_pretrained_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFCausalLM.from_pretrained(tmp_path / "empty")


def test_bad_input_raises(model: HFCausalLM) -> None:
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="max_len"):
        model(random_tokens(1, t=65))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, dtype=torch.long))
    _, state = model.step(random_tokens(1, t=60), model.init_state(1, "cpu"))
    with pytest.raises(ValueError, match="max_len"):
        model.step(random_tokens(1, t=5), state)
    with pytest.raises(ValueError, match="batch"):
        model.step(random_tokens(2, t=1), state)
    with pytest.raises(ValueError, match="index"):
        model.select_state(state, torch.tensor([1]))
    with pytest.raises(TypeError, match="config"):
        HFCausalLM.from_config("gpt2")
