"""HFSumTargetLogit (Eq. 3.12 over a pretrained causal LM): a tiny random GPT-2 and an in-memory
word-level tokenizer stand in for a real checkpoint (no hub access)."""

import pytest
import torch

from seqebm.models.elm_pretrained import HFSumTargetLogit

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat"]


def tiny_lm_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS[4:])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    return model.eval(), hf_tok


def test_sum_of_target_logits_equals_a_loop_and_ignores_padding():
    model, tok = tiny_lm_and_tokenizer()
    pot = HFSumTargetLogit(WORDS, model, tok)
    tokens = torch.tensor([[4, 5, 6, 0], [4, 3, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    assert pot.texts(tokens, mask) == ["the cat sat", "the [UNK] on mat"]
    u = pot(tokens, mask)
    for b, text in enumerate(pot.texts(tokens, mask)):
        ids = [1] + tok(text, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0]
        ref = sum(logits[j - 1, ids[j]].item() for j in range(1, len(ids)))
        assert u[b].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    alone = pot(tokens[:1, :3], mask[:1, :3])
    assert alone.item() == pytest.approx(u[0].item(), rel=1e-5, abs=1e-5)
    # specials are dropped: an appended </s> does not change U
    assert pot(torch.tensor([[4, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(
        u[0].item(), rel=1e-5, abs=1e-5)


def test_normalized_is_the_log_probability_and_errors():
    model, tok = tiny_lm_and_tokenizer()
    pot = HFSumTargetLogit(WORDS, model, tok, normalize=True)
    tokens, mask = torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.bool)
    lp = torch.log_softmax(model(torch.tensor([[1, 2, 3]])).logits[0], -1)
    assert pot(tokens, mask).item() == pytest.approx((lp[0, 2] + lp[1, 3]).item(), rel=1e-5)
    with pytest.raises(FileNotFoundError):
        HFSumTargetLogit(WORDS, "/nonexistent/model")
    with pytest.raises(ValueError, match="tokenizer"):
        HFSumTargetLogit(WORDS, model, None)
    assert all(not p.requires_grad for p in pot.parameters())
