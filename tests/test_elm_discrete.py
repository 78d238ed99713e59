"""Discrete ELM features (monograph §3.3.1, Eq. 3.9, Tab. 3.2) and exchange word clustering."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from seqebm.data.word_classes import (
    WordClasses, _bigram_counts, _Exchange, _log_likelihood, class_bigram_log_likelihood, exchange_clustering,
    flatten_sentences,
)
from seqebm.models.elm_discrete import DiscreteFeatures, DiscretePotential, feature_patterns

ALL = ("w", "c", "ws", "cs", "wsh", "csh", "cpw", "tied")

# Hand example: words a=4, b=5, c=6 in a vocabulary of V=7; classes a, b -> X=3, c -> Y=4.
# <s> is word id 1 with fixed class S=1.
A, B, C, V = 4, 5, 6, 7
S, X, Y = 1, 3, 4
CLASSES = WordClasses(torch.tensor([0, 1, 2, 3, X, X, Y]), 2)
SENT = [A, B, C, A]  # positions -1:<s> 0:a 1:b 2:c 3:a; class stream S X X Y X

# Expected counts per type, derived by hand position by position (k = current position).
EXPECTED = {
    # w0 at k=0..3: a b c a; (w-1 w0): k=0 (<s>,a), k=1 (a,b), k=2 (b,c), k=3 (c,a);
    # (w-2 w-1 w0) first fires at k=1 with <s>; (w-3..w0) at k=2, 3.
    "w": {("w0", (A,)): 2, ("w0", (B,)): 1, ("w0", (C,)): 1,
          ("w-1w0", (S, A)): 1, ("w-1w0", (A, B)): 1, ("w-1w0", (B, C)): 1, ("w-1w0", (C, A)): 1,
          ("w-2w-1w0", (S, A, B)): 1, ("w-2w-1w0", (A, B, C)): 1, ("w-2w-1w0", (B, C, A)): 1,
          ("w-3w-2w-1w0", (S, A, B, C)): 1, ("w-3w-2w-1w0", (A, B, C, A)): 1},
    # the same on the class stream S X X Y X
    "c": {("c0", (X,)): 3, ("c0", (Y,)): 1,
          ("c-1c0", (S, X)): 1, ("c-1c0", (X, X)): 1, ("c-1c0", (X, Y)): 1, ("c-1c0", (Y, X)): 1,
          ("c-2c-1c0", (S, X, X)): 1, ("c-2c-1c0", (X, X, Y)): 1, ("c-2c-1c0", (X, Y, X)): 1,
          ("c-3c-2c-1c0", (S, X, X, Y)): 1, ("c-3c-2c-1c0", (X, X, Y, X)): 1},
    # w-3 exists from k=2 (<s>); w-2 from k=1.
    # (w-3 w0): k=2 (<s>,c), k=3 (a,a); (w-3 w-2 w0): (<s>,a,c), (a,b,a);
    # (w-3 w-1 w0): (<s>,b,c), (a,c,a); (w-2 w0): k=1 (<s>,b), k=2 (a,c), k=3 (b,a).
    "ws": {("w-3w0", (S, C)): 1, ("w-3w0", (A, A)): 1,
           ("w-3w-2w0", (S, A, C)): 1, ("w-3w-2w0", (A, B, A)): 1,
           ("w-3w-1w0", (S, B, C)): 1, ("w-3w-1w0", (A, C, A)): 1,
           ("w-2w0", (S, B)): 1, ("w-2w0", (A, C)): 1, ("w-2w0", (B, A)): 1},
    "cs": {("c-3c0", (S, Y)): 1, ("c-3c0", (X, X)): 1,
           ("c-3c-2c0", (S, X, Y)): 1, ("c-3c-2c0", (X, X, X)): 1,
           ("c-3c-1c0", (S, X, Y)): 1, ("c-3c-1c0", (X, Y, X)): 1,
           ("c-2c0", (S, X)): 1, ("c-2c0", (X, Y)): 1, ("c-2c0", (X, X)): 1},
    # (w-4 w0) only at k=3 with w-4 = <s>; (w-5 w0) needs k >= 4: never.
    "wsh": {("w-4w0", (S, A)): 1},
    "csh": {("c-4c0", (S, X)): 1},
    # (c-1 w0): (S,a) (X,b) (X,c) (Y,a); (c-2 c-1 w0) from k=1; (c-3 c-2 c-1 w0) from k=2.
    "cpw": {("c-1w0", (S, A)): 1, ("c-1w0", (X, B)): 1, ("c-1w0", (X, C)): 1, ("c-1w0", (Y, A)): 1,
            ("c-2c-1w0", (S, X, B)): 1, ("c-2c-1w0", (X, X, C)): 1, ("c-2c-1w0", (X, Y, A)): 1,
            ("c-3c-2c-1w0", (S, X, X, C)): 1, ("c-3c-2c-1w0", (X, X, Y, A)): 1},
}
# Tied: sentence a b a b a b a b (p0..p7). Distance δ fires at k >= δ-1 (x_{k-δ} = <s> at k = δ-1):
# δ=6: k=5 (<s>,b), k=6 (p0=a,a), k=7 (p1=b,b); δ=7: k=6 (<s>,a), k=7 (a,b); δ=8: k=7 (<s>,b);
# δ=9: never. Shared parameters sum over δ: (<s>,b) fires twice (δ=6 and δ=8).
TIED_SENT = [A, B] * 4
EXPECTED_TIED = {("w-9:-6w0", (S, B)): 2, ("w-9:-6w0", (A, A)): 1, ("w-9:-6w0", (B, B)): 1,
                 ("w-9:-6w0", (S, A)): 1, ("w-9:-6w0", (A, B)): 1,
                 # classes: every word is X: (S,X) at δ=6,7,8; (X,X) at δ=6 twice and δ=7 once
                 ("c-9:-6c0", (S, X)): 3, ("c-9:-6c0", (X, X)): 3}


def _feats(sents, types=ALL, **kw) -> DiscreteFeatures:
    return DiscreteFeatures.build(sents, V, feature_types=types, classes=CLASSES, **kw)


def _batch(sents: list[list[int]], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in sents) + extra
    tok = torch.zeros(len(sents), T, dtype=torch.long)
    for i, s in enumerate(sents):
        tok[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sents])
    return tok, torch.arange(T)[None] < lengths[:, None]


# ------------------------------------------------------------------------------ hand counts
def test_patterns_follow_table_3_2():
    names = [p.name for p in feature_patterns(ALL, 4)]
    assert names == ["w0", "w-1w0", "w-2w-1w0", "w-3w-2w-1w0", "c0", "c-1c0", "c-2c-1c0", "c-3c-2c-1c0",
                     "w-3w0", "w-3w-2w0", "w-3w-1w0", "w-2w0", "c-3c0", "c-3c-2c0", "c-3c-1c0", "c-2c0",
                     "w-4w0", "w-5w0", "c-4c0", "c-5c0", "c-1w0", "c-2c-1w0", "c-3c-2c-1w0", "w-9:-6w0", "c-9:-6c0"]
    # order 3: trigram n-grams, the one skip of span 3, cpw up to (c-2 c-1 w0); long types unaffected
    names3 = [p.name for p in feature_patterns(("w", "ws", "wsh", "cpw", "tied_w"), 3)]
    assert names3 == ["w0", "w-1w0", "w-2w-1w0", "w-2w0", "w-4w0", "w-5w0", "c-1w0", "c-2c-1w0", "w-9:-6w0"]


@pytest.mark.parametrize("ftype", sorted(EXPECTED))
def test_hand_counted_features(ftype):
    f = _feats([SENT], (ftype,))
    got = f.counts_by_key(torch.tensor([SENT]))[0]
    assert got == EXPECTED[ftype]
    assert f.num_features == len(EXPECTED[ftype])


def test_hand_counted_tied():
    f = _feats([TIED_SENT], ("tied",))
    assert f.counts_by_key(torch.tensor([TIED_SENT]))[0] == EXPECTED_TIED
    assert f.num_features == len(EXPECTED_TIED)  # one parameter per pair, not per distance


def test_all_types_together_and_bos_off():
    f = _feats([SENT])
    want = {k: v for d in EXPECTED.values() for k, v in d.items()}
    assert f.counts_by_key(torch.tensor([SENT]))[0] == want
    # without <s> context, patterns fire only inside the sentence: (w-1 w0) at k >= 1 only
    g = _feats([SENT], ("w",), order=2, bos=False)
    assert g.counts_by_key(torch.tensor([SENT]))[0] == {
        ("w0", (A,)): 2, ("w0", (B,)): 1, ("w0", (C,)): 1,
        ("w-1w0", (A, B)): 1, ("w-1w0", (B, C)): 1, ("w-1w0", (C, A)): 1}


def test_eos_is_an_ordinary_token_with_fixed_class():
    f = _feats([SENT + [2]], ("w", "c"), order=2)
    got = f.counts_by_key(torch.tensor([SENT + [2]]))[0]
    assert got[("w-1w0", (A, 2))] == 1 and got[("c-1c0", (X, 2))] == 1 and got[("c0", (2,))] == 1


# ------------------------------------------------------------------------- sparse / dense
def _random_corpus(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 14) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _random_classes(vocab: int, k: int, seed: int) -> WordClasses:
    g = torch.Generator().manual_seed(seed)
    return WordClasses(torch.cat([torch.arange(3), 3 + torch.randint(k, (vocab - 3,), generator=g)]), k)


@pytest.fixture(scope="module")
def trained():
    vocab = 12
    classes = _random_classes(vocab, 3, 0)
    train = _random_corpus(300, vocab, 1)
    pot = DiscretePotential(DiscreteFeatures.build(train, vocab, feature_types=ALL, classes=classes))
    with torch.no_grad():
        pot.weight.normal_(generator=torch.Generator().manual_seed(0))
    return pot, train


def test_sparse_and_dense_paths_agree(trained):
    pot, _ = trained
    tok, mask = _batch(_random_corpus(20, 12, 2), extra=2)
    tok[~mask] = torch.randint(0, 12, (int((~mask).sum()),))  # garbage under the mask is ignored
    u = pot(tok, mask)
    ud = pot.dense_forward(tok, mask)
    torch.testing.assert_close(u, ud)
    coef = torch.randn(u.shape[0])
    (gs,) = torch.autograd.grad((u * coef).sum(), pot.weight)
    (gd,) = torch.autograd.grad((ud * coef).sum(), pot.weight)
    torch.testing.assert_close(gs, gd)
    torch.testing.assert_close(pot.counts(tok, mask).to_dense(), pot.features.dense(tok, mask))
    torch.testing.assert_close(pot.expected_counts(tok, mask), pot.features.dense(tok, mask).mean(0))
    w = torch.rand(u.shape[0])
    torch.testing.assert_close(pot.expected_counts(tok, mask, w), w @ pot.features.dense(tok, mask))
    assert u.shape == (20,) and u.dtype == torch.float32


def test_padded_with_mask_equals_unpadded_rows(trained):
    pot, _ = trained
    sents = _random_corpus(8, 12, 3)
    tok, mask = _batch(sents, extra=5)
    u = pot(tok, mask)
    for i, s in enumerate(sents):
        torch.testing.assert_close(u[i], pot(torch.tensor([s]))[0])
    empty = torch.zeros(2, 3, dtype=torch.long)
    assert pot(empty, torch.zeros(2, 3, dtype=torch.bool)).tolist() == [0.0, 0.0]
    assert pot(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)


def test_only_training_features_exist():
    f = _feats([SENT], ("w",), order=2)
    assert f.feature_index("w-1w0", (A, B)) is not None
    assert f.feature_index("w-1w0", (B, A)) is None  # never seen in training
    pot = DiscretePotential(f)
    with torch.no_grad():
        pot.weight.fill_(1.0)
    # b a: w0 b (seen), w0 a (seen), (<s>, b) unseen, (b, a) unseen -> U = 2
    assert pot(torch.tensor([[B, A]])).item() == 2.0
    assert f.counts_by_key(torch.tensor([[B, A]]))[0] == {("w0", (A,)): 1, ("w0", (B,)): 1}
    # min_count prunes: only features firing >= 2 times in [a b c a], [a b]
    g = _feats([SENT, [A, B]], ("w",), order=2, min_count=2)
    keys = {g.feature_key(i) for i in range(g.num_features)}
    assert keys == {("w0", (A,)), ("w0", (B,)), ("w-1w0", (S, A)), ("w-1w0", (A, B))}


def test_tied_features_share_one_parameter():
    filler = 3  # <unk>: an ordinary id
    train = [[A] + [filler] * 5 + [B]]  # (a, b) at distance 6 only
    f = _feats(train, ("tied_w",))
    i = f.feature_index("w-9:-6w0", (A, B))
    assert i is not None
    pot = DiscretePotential(f)
    with torch.no_grad():
        pot.weight[i] = 1.0
    for d in range(6, 10):
        assert pot(torch.tensor([[A] + [filler] * (d - 1) + [B]])).item() == 1.0, d
    assert pot(torch.tensor([[A] + [filler] * 9 + [B]])).item() == 0.0  # distance 10
    assert pot(torch.tensor([[A] + [filler] * 4 + [B]])).item() == 0.0  # distance 5
    both = [A, A, A] + [filler] * 5 + [B]  # b at position 8: a at distances 8, 7, 6
    assert pot(torch.tensor([both])).item() == 3.0


def test_save_load_roundtrip(trained, tmp_path):
    pot, _ = trained
    pot.save(tmp_path / "elm.safetensors")
    again = DiscretePotential.load(tmp_path / "elm.safetensors")
    tok, mask = _batch(_random_corpus(10, 12, 4))
    assert torch.equal(pot(tok, mask), again(tok, mask))
    assert again.num_features == pot.num_features
    assert torch.equal(again.features.classes.word_to_class, pot.features.classes.word_to_class)
    pot.features.save(tmp_path / "f.safetensors")
    feats = DiscreteFeatures.load(tmp_path / "f.safetensors")
    assert torch.equal(feats.dense(tok, mask), pot.features.dense(tok, mask))
    with pytest.raises(ValueError, match="no weight"):
        DiscretePotential.load(tmp_path / "f.safetensors")


def test_validation_errors(trained):
    pot, train = trained
    f = pot.features
    with pytest.raises(ValueError, match="unknown feature types"):
        DiscreteFeatures.build(train, 12, feature_types=("w", "bogus"))
    with pytest.raises(ValueError, match="need word classes"):
        DiscreteFeatures.build(train, 12, feature_types=("w", "c"))
    with pytest.raises(ValueError, match="order"):
        DiscreteFeatures.build(train, 12, feature_types=("w",), order=0)
    with pytest.raises(ValueError, match="classes cover"):
        DiscreteFeatures.build(train, 13, feature_types=("c",), classes=f.classes)
    with pytest.raises(ValueError, match=r"sentences\[1\] holds word id 12"):
        DiscreteFeatures.build([[4], [5, 12]], 12, feature_types=("w",))
    with pytest.raises(ValueError, match="min_count"):
        DiscreteFeatures.build(train, 12, feature_types=("w",), min_count=0)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        pot(torch.tensor([4, 5]))
    with pytest.raises(TypeError, match="integer"):
        pot(torch.tensor([[4.0, 5.0]]))
    with pytest.raises(ValueError, match=r"outside \[0, 12\).*max=12"):
        pot(torch.tensor([[4, 12]]))
    with pytest.raises(ValueError, match="right padding"):
        pot(torch.tensor([[4, 5]]), torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="shape of tokens"):
        pot(torch.tensor([[4, 5]]), torch.tensor([[True]]))
    with pytest.raises(TypeError, match="bool"):
        pot(torch.tensor([[4, 5]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"pad id 0 at the real position \(0, 1\)"):
        pot(torch.tensor([[4, 0]]))
    with pytest.raises(ValueError, match="no pattern"):
        f.feature_index("w-7w0", (4, 5))


# ----------------------------------------------------------------------- exchange clustering
def test_word_classes_validation_and_json(tmp_path):
    wc = WordClasses(torch.tensor([0, 1, 2, 3, 4, 3]), 2, [1.0, 2.0])
    wc.save(tmp_path / "c.json")
    back = WordClasses.load(tmp_path / "c.json")
    assert torch.equal(back.word_to_class, wc.word_to_class) and back.log_likelihood == [1.0, 2.0]
    assert wc.members(3) == [3, 5] and wc.class_vocab_size == 5
    with pytest.raises(ValueError, match="fixed classes"):
        WordClasses(torch.tensor([0, 2, 1, 3]), 1)
    with pytest.raises(ValueError, match=r"word classes must lie in \[3, 4\)"):
        WordClasses(torch.tensor([0, 1, 2, 4]), 1)
    with pytest.raises(ValueError, match="reserved"):
        exchange_clustering([[4, 2]], 6, 2)
    with pytest.raises(ValueError, match="num_classes"):
        exchange_clustering([[4]], 6, 0)


def _two_group_corpus(seed: int = 0) -> list[list[int]]:
    """Group A = ids 4..8 always followed by group B = ids 9..13 and vice versa."""
    rng = random.Random(seed)
    return [[rng.randrange(4, 9) if t % 2 == 0 else rng.randrange(9, 14) for t in range(rng.randint(2, 10))]
            for _ in range(400)]


def test_exchange_finds_two_obvious_groups():
    sents = _two_group_corpus()
    wc = exchange_clustering(sents, 14, 2)
    a = set(wc.word_to_class[4:9].tolist())
    b = set(wc.word_to_class[9:14].tolist())
    assert len(a) == 1 and len(b) == 1 and a != b
    # the initial round-robin assignment mixes the groups, so the clustering had to move words
    assert wc.log_likelihood[-1] > wc.log_likelihood[0] + 1.0
    assert wc.word_to_class[:3].tolist() == [0, 1, 2] and 3 <= int(wc.word_to_class[3]) < 5


def test_exchange_objective_monotone_and_matches_recomputation():
    sents = _random_corpus(300, 40, 5) + _two_group_corpus(1)
    for seed in (None, 3):
        wc = exchange_clustering(sents, 40, 6, max_iterations=6, seed=seed)
        ll = wc.log_likelihood
        assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:])) and ll[-1] > ll[0]
        for k in range(len(ll)):  # incremental objective after k iterations == recomputed
            wk = exchange_clustering(sents, 40, 6, max_iterations=k, seed=seed)
            assert class_bigram_log_likelihood(sents, wk) == pytest.approx(ll[k], rel=1e-12, abs=1e-8)
    again = exchange_clustering(sents, 40, 6, max_iterations=6, seed=3)
    assert torch.equal(again.word_to_class, wc.word_to_class)  # deterministic


def test_exchange_single_move_delta_equals_recomputed():
    sents = _random_corpus(200, 15, 6) + [[7, 7, 7, 8]]  # self-loops included
    flat, lengths = flatten_sentences(sents, 15, min_id=3)
    prev, nxt, cnt = _bigram_counts(flat, lengths, 15)
    rng = np.random.default_rng(0)
    w2c = np.concatenate([[0, 1, 2], 3 + rng.integers(0, 4, 12)])
    ex = _Exchange(prev, nxt, cnt, w2c, 7)
    assert ex.objective() == pytest.approx(_log_likelihood(prev, nxt, cnt, w2c, 7), rel=1e-12)
    for _ in range(40):
        w, k = int(rng.integers(3, 15)), int(rng.integers(3, 7))
        ex.move(w, k)
        assert ex.w2c[w] == k
        assert ex.objective() == pytest.approx(_log_likelihood(prev, nxt, cnt, ex.w2c, 7), rel=1e-12)
        before = ex.objective()
        ex.move(w)  # best move never lowers the objective
        assert ex.objective() >= before - 1e-9
        assert ex.objective() == pytest.approx(_log_likelihood(prev, nxt, cnt, ex.w2c, 7), rel=1e-12)


# ------------------------------------------------------------------------------ scale smoke
_REF = {  # Tab. 3.2 templates, written out independently of the library: name -> offset variants
    **{n: [o] for n, o in [("w0", (0,)), ("w-1w0", (-1, 0)), ("w-2w-1w0", (-2, -1, 0)),
                           ("w-3w-2w-1w0", (-3, -2, -1, 0)), ("w-3w0", (-3, 0)), ("w-3w-2w0", (-3, -2, 0)),
                           ("w-3w-1w0", (-3, -1, 0)), ("w-2w0", (-2, 0)), ("w-4w0", (-4, 0)), ("w-5w0", (-5, 0)),
                           ("c-1w0", (-1, 0)), ("c-2c-1w0", (-2, -1, 0)), ("c-3c-2c-1w0", (-3, -2, -1, 0))]},
    "w-9:-6w0": [(-d, 0) for d in range(6, 10)],
}


def _reference_counts(sent: list[int], w2c: list[int]) -> Counter:
    """Slow per-position reference with one <s> at position -1."""
    words = [1] + sent  # index i+1 = position i
    out: Counter = Counter()
    for name, variants in _REF.items():
        for k in range(len(sent)):
            for offs in variants:
                if k + min(offs) < -1:
                    continue
                ids = tuple(words[k + o + 1] for o in offs)
                if name.startswith("c"):
                    ids = tuple(w2c[i] for i in ids[:-1]) + ids[-1:]
                out[(name, ids)] += 1
    return out


def test_scale_smoke_matches_python_reference():
    vocab = 2000
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, vocab - 2) ** 1.1
    lengths = rng.integers(3, 30, 5000)
    flat = rng.choice(np.arange(3, vocab), size=int(lengths.sum()), p=zipf / zipf.sum())
    sents = [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])]
    classes = _random_classes(vocab, 50, 1)
    types = ("w", "ws", "wsh", "cpw", "tied_w")
    big = DiscreteFeatures.build(sents, vocab, feature_types=types, classes=classes)
    assert big.num_features >= 100_000
    rows, feats = big.extract_pairs(*_batch(sents))  # one batch of 5000 rows, vectorised
    assert feats.numel() and int(feats.max()) < big.num_features
    # exact comparison with the slow reference on a 600-sentence training subset
    sub = sents[:600]
    f = DiscreteFeatures.build(sub, vocab, feature_types=types, classes=classes)
    w2c = classes.word_to_class.tolist()
    refs = [_reference_counts(s, w2c) for s in sub]
    ref_train: Counter = Counter()
    for r in refs:
        ref_train.update(r)
    assert len(ref_train) == f.num_features  # every firing in training is a feature
    rows, feats = f.extract_pairs(*_batch(sub))
    assert torch.equal(torch.bincount(rows, minlength=len(sub)), torch.tensor([sum(r.values()) for r in refs]))
    for s, g in zip(sub[:25], f.counts_by_key(*_batch(sub[:25]))):
        assert g == dict(_reference_counts(s, w2c))
    held_out = [rng.integers(3, 40, 20).tolist() for _ in range(5)]  # frequent words: many hits
    for s, g in zip(held_out, f.counts_by_key(*_batch(held_out))):
        want = {k: v for k, v in _reference_counts(s, w2c).items() if k in ref_train}
        assert g == want and len(want) > 20
