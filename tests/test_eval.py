"""Exact evaluation: packed perplexity equals the per-document chain rule; bits/dim; plots."""

import math

import pytest
import torch

from seqebm.data.batching import lm_batch, pack_lm
from seqebm.eval.perplexity import bits_per_dim, corpus_nll, perplexity_metrics
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.basic import filter_logits


def test_packed_nll_equals_chain_rule_over_rows():
    """Each row is scored from BOS; summing over rows covers every stream token exactly once."""
    torch.manual_seed(0)
    model = TransformerLM(9, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0).eval()
    docs = [[4, 5, 6], [7, 8], [4, 4, 4, 4, 5]]
    rows, lengths = pack_lm(docs, 4, bos_id=1, eos_id=2)
    stream = [4, 5, 6, 2, 7, 8, 2, 4, 4, 4, 4, 5, 2]
    assert int(lengths.sum()) == len(stream)
    nll, tokens = corpus_nll(model, [lm_batch(rows[:2], lengths[:2]), lm_batch(rows[2:], lengths[2:])])
    expected = 0.0
    for start in range(0, len(stream), 4):
        chunk = stream[start:start + 4]
        logp = model(torch.tensor([[1] + chunk[:-1]])).log_softmax(-1)[0].double()
        expected -= sum(float(logp[t, c].detach()) for t, c in enumerate(chunk))
    assert tokens == len(stream)
    assert nll == pytest.approx(expected, rel=1e-6)


def test_perplexity_metrics():
    m = perplexity_metrics(20.0, 10, words=5)
    assert m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["word_ppl"] == pytest.approx(math.exp(4.0))
    assert m["tokens_per_word"] == 2.0
    assert m["bits_per_token"] == pytest.approx(2 / math.log(2))
    assert bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero tokens"):
        perplexity_metrics(1.0, 0)


def test_uniform_model_has_perplexity_v():
    """All-zero logits: ppl = V exactly (closed form)."""
    model = TransformerLM(11, d_model=8, n_layers=1, n_heads=2, max_len=8, dropout=0.0).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    rows, lengths = pack_lm([[4, 5, 6, 7]] * 3, 5, bos_id=1, eos_id=2)
    nll, n = corpus_nll(model, [lm_batch(rows, lengths)])
    assert perplexity_metrics(nll, n)["ppl"] == pytest.approx(11.0, rel=1e-6)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, top_k=2).softmax(-1)
    torch.testing.assert_close(k2, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = filter_logits(logits, top_p=0.8).softmax(-1)  # 0.5 + 0.2 < 0.8 -> keep third
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    t = filter_logits(logits, temperature=0.5).softmax(-1)
    torch.testing.assert_close(t, (torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]) ** 2).div(0.325))
    with pytest.raises(ValueError, match="temperature must be positive"):
        filter_logits(logits, temperature=0)


def test_plot_curves(tmp_path):
    from seqebm.eval.plots import plot_curves

    p = tmp_path / "m.jsonl"
    p.write_text('{"split": "train", "step": 1, "loss": 3.0}\n{"split": "valid", "step": 1, "loss": 3.5}\n')
    out = plot_curves(p, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
