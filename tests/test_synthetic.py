"""Synthetic oracles (exact likelihood) and the rule-based synthetic translation task."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from seqebm.data.synthetic import EOS_ID, UNK_ID, OracleLM, SyntheticTranslation
from seqebm.models.base import AutoregressiveModel

ARCHS = ["lstm", "transformer"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threading only adds barrier waits, which get very slow (5x
    measured) when another process shares the cores. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str, variable: bool, **kw) -> OracleLM:
    """n_words=3, length=3: small enough to enumerate the whole support."""
    cfg = dict(n_words=3, length=3, variable_length=variable, min_length=1, arch=arch,
               d_model=16, n_layers=2, n_heads=2, seed=3)
    cfg.update(kw)
    return OracleLM(**cfg)


def support(oracle: OracleLM) -> list[tuple[int, ...]]:
    words = range(4, oracle.vocab_size)
    cfg = oracle.config
    lengths = range(cfg.min_length, cfg.length + 1) if cfg.variable_length else [cfg.length]
    return [s for n in lengths for s in itertools.product(words, repeat=n)]


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("extra", [{}, {"temperature": 0.6, "eos_bias": 1.5, "min_length": 2}])
def test_probabilities_sum_to_one(arch, variable, extra):
    oracle = tiny(arch, variable, **extra)
    seqs = support(oracle)
    lp = oracle.log_prob([list(s) for s in seqs])
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-9
    # not uniform and not degenerate
    p = lp.exp()
    assert float(p.max()) < 0.9 and float(p.max() / p.min()) > 1.5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variable", [False, True])
def test_sample_frequencies_match_log_prob(arch, variable):
    oracle = tiny(arch, variable, temperature=0.5, eos_bias=1.0)
    n = 20_000
    samples = oracle.sample(n, generator=torch.Generator().manual_seed(0), batch_size=4096)
    counts = Counter(tuple(s) for s in samples)
    seqs = support(oracle)
    assert set(counts) <= set(seqs)  # only sequences in the support are ever drawn
    p = oracle.log_prob([list(s) for s in seqs]).exp()
    emp = torch.tensor([counts[s] / n for s in seqs], dtype=torch.float64)
    # E[TV] <= 0.5 * sqrt(2K / (pi n)) ~ 0.018 for K=39 outcomes, n=20k
    assert 0.5 * float((emp - p).abs().sum()) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_log_prob_equals_loop(arch):
    oracle = OracleLM(n_words=20, length=12, variable_length=True, min_length=2, arch=arch,
                      d_model=16, n_layers=2, n_heads=2, eos_bias=2.0, seed=1)
    words, lengths = oracle.sample_padded(40, generator=torch.Generator().manual_seed(1))
    seqs = [w[:n].tolist() for w, n in zip(words, lengths.tolist())]
    assert len(set(lengths.tolist())) > 3  # padding is really exercised
    batched = oracle.log_prob(seqs, batch_size=7)
    loop = torch.cat([oracle.log_prob([s]) for s in seqs])
    torch.testing.assert_close(batched, loop, atol=1e-10, rtol=0)
    # padded tensor with explicit lengths, and PAD-terminated rows, give the same numbers
    torch.testing.assert_close(oracle.log_prob(words, lengths), loop, atol=1e-10, rtol=0)
    torch.testing.assert_close(oracle.log_prob(words), loop, atol=1e-10, rtol=0)
    # log q(x) is the sum of the protocol's per-step log-probs (forward / step agree)
    s = seqs[0]
    tokens = torch.tensor([[1] + s])
    full = oracle(tokens)[0]
    manual = sum(float(full[t, w]) for t, w in enumerate(s)) + float(full[len(s), EOS_ID])
    assert math.isclose(manual, float(loop[0]), abs_tol=1e-10)
    inc, _ = oracle.step(tokens, oracle.init_state(1, "cpu"))
    torch.testing.assert_close(inc[0], full, atol=1e-10, rtol=0)
    assert isinstance(oracle, AutoregressiveModel)


def test_out_of_support_and_bad_ids():
    fixed = tiny("lstm", False)
    var = tiny("lstm", True, min_length=2)
    assert fixed.log_prob([[4, 5]]).item() == -math.inf  # wrong length
    assert var.log_prob([[4]]).item() == -math.inf  # shorter than min_length
    assert var.log_prob([[4, 5, 6, 4]]).item() == -math.inf  # longer than length
    assert fixed.log_prob([[4, UNK_ID, 5]]).item() == -math.inf  # special id inside
    assert math.isfinite(fixed.log_prob([[4, 5, 6]]).item())
    with pytest.raises(ValueError, match="outside"):
        fixed.log_prob([[4, 5, 99]])


# ---------------------------------------------------------------------------- api
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(tmp_path, arch):
    oracle = tiny(arch, True, temperature=0.9, eos_bias=0.3)
    with torch.no_grad():  # weights that differ from the seed's, so load must restore them
        for p in oracle.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9),
                                     dtype=p.dtype))
    seqs = [list(s) for s in support(oracle)]
    before = oracle.log_prob(seqs)
    oracle.save(tmp_path / "oracle")
    meta = json.loads((tmp_path / "oracle" / "oracle_config.json").read_text())
    assert meta["config"]["arch"] == arch and meta["kind"] == "oracle_lm"
    assert all(v.dtype == torch.float64 for v in load_file(tmp_path / "oracle" / "oracle.safetensors").values())
    loaded = OracleLM.load(tmp_path / "oracle")
    assert loaded.config == oracle.config
    assert torch.equal(loaded.log_prob(seqs), before)
    assert not torch.equal(tiny(arch, True, temperature=0.9, eos_bias=0.3).log_prob(seqs), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_reproducible(arch):
    oracle = OracleLM(n_words=50, length=10, variable_length=True, min_length=1, eos_bias=2.0,
                      arch=arch, d_model=16, n_heads=2)
    a = oracle.sample(64, generator=torch.Generator().manual_seed(5), batch_size=16)
    b = oracle.sample(64, generator=torch.Generator().manual_seed(5), batch_size=16)
    c = oracle.sample(64, generator=torch.Generator().manual_seed(6), batch_size=16)
    assert a == b and a != c
    assert all(1 <= len(s) <= 10 and all(4 <= w < oracle.vocab_size for w in s) for s in a)
    # same seed for the weights -> same oracle; different seed -> different oracle
    same = OracleLM(n_words=50, length=10, variable_length=True, eos_bias=2.0, arch=arch,
                    d_model=16, n_heads=2)
    other = OracleLM(n_words=50, length=10, variable_length=True, eos_bias=2.0, arch=arch,
                     d_model=16, n_heads=2, seed=1)
    assert torch.equal(same.log_prob(a), oracle.log_prob(a))
    assert not torch.equal(other.log_prob(a), oracle.log_prob(a))


def test_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    OracleLM(n_words=10, length=4)
    assert torch.equal(torch.rand(3), expected)


def test_splits_text_and_nll():
    oracle = OracleLM(n_words=30, length=8, variable_length=True, min_length=3, eos_bias=1.0,
                      d_model=16)
    splits = oracle.make_splits(20, 5, 7, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "valid": 5, "test": 7}
    assert splits == oracle.make_splits(20, 5, 7, seed=0)
    assert splits != oracle.make_splits(20, 5, 7, seed=1)
    text = oracle.as_text(splits["train"])
    assert all(t.split()[0].startswith("w") for t in text)
    assert oracle.from_text(text) == splits["train"]
    assert oracle.as_text([[4, 33]]) == ["w0 w29"]
    with pytest.raises(ValueError, match="not an oracle word"):
        oracle.from_text(["w0 w30"])
    assert oracle.from_text(["w0 foo"], strict=False) == [[4, UNK_ID]]
    lp = oracle.log_prob(splits["test"])
    assert math.isclose(oracle.nll(splits["test"]), float(-lp.mean()))
    n_tok = sum(len(s) + 1 for s in splits["test"])  # words + EOS
    assert math.isclose(oracle.nll_per_token(splits["test"]), float(-lp.sum()) / n_tok)
    fixed = OracleLM(n_words=30, length=8, d_model=16)
    s = fixed.sample(5, generator=torch.Generator().manual_seed(0))
    assert math.isclose(fixed.nll_per_token(s), float(-fixed.log_prob(s).sum()) / 40)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_scale_entropy_between_uniform_and_degenerate(arch):
    oracle = OracleLM(n_words=1000, length=10, arch=arch)  # default d_model and init_std
    h = oracle.entropy_per_token(200)
    log_v = math.log(oracle.vocab_size)
    assert 0.3 * log_v < h < 0.9 * log_v


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_words": 0}, "n_words"),
        ({"n_words": -3}, "n_words"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"length": 5, "min_length": 6}, "min_length"),
        ({"length": 0}, "length"),
        ({"arch": "gru"}, "arch"),
        ({"arch": "transformer", "d_model": 30, "n_heads": 4}, "n_heads"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_oracle_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OracleLM(**kwargs)


# ---------------------------------------------------------------------------- translation
@pytest.fixture(scope="module")
def task() -> SyntheticTranslation:
    return SyntheticTranslation(n_words=300, seed=0)


def _pick(task: SyntheticTranslation, cls: str, n_targets: int = 1, number: str | None = None):
    for w in task.words_of_class(cls):
        if len(task.lexicon[w]) == n_targets and (number is None or task.noun_number[w] == number):
            return w
    raise AssertionError(f"no {cls} word with {n_targets} targets")


def test_translation_rules_fire(task):
    lex = lambda w: list(task.lexicon[w])  # noqa: E731
    n1 = _pick(task, "NOUN", number="pl")
    n2 = _pick(task, "NOUN", number="sg")
    adj, adj2 = task.words_of_class("ADJ")[:2]
    v1, v2 = task.words_of_class("VERB")[:2]
    oth, dbl, dele = _pick(task, "OTHER"), _pick(task, "OTHER", 2), _pick(task, "OTHER", 0)
    src = [n1, oth, adj, n2, v1, dbl, dele, v2]
    out = task.translate(src)
    expected = lex(n1) + lex(oth) + lex(n2) + lex(adj) + lex(v1) + lex(dbl) + [lex(v2)[0] + "_pl"]
    assert out == expected
    # each rule separately: substitution, ADJ NOUN swap, double / deleted words, agreement
    assert lex(n1)[0].startswith("t") and lex(n1)[0] != n1
    assert out.index(lex(n2)[0]) < out.index(lex(adj)[0])
    assert len(lex(dbl)) == 2 and lex(dele) == []
    assert out[-1] == lex(v2)[0] + "_pl"  # first noun (plural) decides, not the later singular
    assert lex(v1)[0] in out  # earlier verbs stay unmarked
    # ADJ ADJ NOUN -> ADJ NOUN ADJ; no verb -> sentence-final agreement token; no noun -> none
    assert task.translate([adj2, adj, n2]) == lex(adj2) + lex(n2) + lex(adj) + ["agr_sg"]
    assert task.translate([v1, oth]) == [lex(v1)[0], lex(oth)[0]]
    assert task.translate_text(f"{n2} {v1}") == f"{lex(n2)[0]} {lex(v1)[0]}_sg"
    with pytest.raises(ValueError, match="not a source word"):
        task.translate(["x1"])


def test_lexicon_shape(task):
    primary = [t[0] for t in task.lexicon.values() if t]
    assert len(primary) == len(set(primary))  # substitution is injective
    n_double = sum(len(t) == 2 for t in task.lexicon.values())
    n_delete = sum(len(t) == 0 for t in task.lexicon.values())
    assert n_double == round(0.05 * 300) and n_delete == round(0.03 * 300)
    assert set(task.noun_number.values()) == {"sg", "pl"}


def test_generate_deterministic_and_lengths(task):
    data = task.generate(500, 20, 20)
    assert {k: len(v) for k, v in data.items()} == {"train": 500, "valid": 20, "test": 20}
    again = SyntheticTranslation(n_words=300, seed=0).generate(500, 20, 20)
    assert data == again
    assert SyntheticTranslation(n_words=300, seed=1).generate(20, 0, 0)["train"] != data["train"][:20]
    lengths = [len(s.split()) for s, _ in data["train"]]
    assert min(lengths) >= 5 and max(lengths) <= 60
    assert min(lengths) <= 8 and max(lengths) >= 40
    assert 8 <= sorted(lengths)[len(lengths) // 2] <= 35  # median: spread, not piled at an end
    vocab = set(task.target_vocab())
    markers = 0
    for src, tgt in data["train"]:
        assert tgt == task.translate_text(src)
        assert set(tgt.split()) <= vocab
        markers += any(t.endswith(("_sg", "_pl")) for t in tgt.split())
    assert markers > 0.5 * len(data["train"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_words": 0}, "n_words"),
        ({"temperature": 0.0}, "temperature"),
        ({"min_length": 70}, "min_length"),
        ({"class_probs": (0.5, 0.5, 0.5, 0.5)}, "class_probs"),
        ({"p_double": 0.5}, "p_double"),
        ({"markers": ("sg", "sg")}, "markers"),
    ],
)
def test_bad_translation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticTranslation(**kwargs)
