"""Electric, its two-tower noise, the masked-LM baseline and Electric's NCE (monograph §3.4).

Notation: B batch, T padded length, V vocabulary, l real length, R noise positions (k of them).

Fast path == slow path: the batched NCE losses (Eq. 3.17 / 3.18) and their gradients equal a
per-sentence, per-position loop in float64; the closed-form NCE logit log(n_pos / k) when
Electric equals the noise; the two-tower noise's conditioning (x_t never read, x_{t±1} read,
padding never read), normalisation and sampling frequencies; the MLM's batched PLL equals a
per-position loop; Electric's one-pass score; a joint training smoke run; input validation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from seqebm.data.tagged import WordVocabulary
from seqebm.models.electric import Electric, TwoTowerCloze, causal_attention_mask
from seqebm.models.masked_lm import MaskedLM
from seqebm.objectives.electric import ElectricNCELoss, draw_noise_positions, num_noise_positions

V = 7  # <pad> <s> </s> <unk> + 3 words
SIZE = dict(d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.0)


def _rows(rows: list[list[int]], width: int | None = None, fill: int = 0) -> tuple[Tensor, Tensor]:
    width = width or max(map(len, rows))
    tokens = torch.tensor([r + [fill] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return tokens, mask


# rows of lengths 9, 4, 7, 2, 12: k = 2, 1, 2, 1, 2
ROWS = [[1, 4, 5, 6, 4, 5, 6, 4, 2], [1, 6, 5, 2], [1, 5, 5, 4, 6, 4, 2], [1, 2], [1, 4, 6, 5, 4, 6, 5, 4, 6, 5, 4, 2]]


def _models(seed: int = 0, vocab: int = V) -> tuple[Electric, TwoTowerCloze]:
    torch.manual_seed(seed)
    electric = Electric(vocab, **SIZE).double()
    noise = TwoTowerCloze(vocab, **SIZE).double()
    with torch.no_grad():  # a head large enough that p̂ varies visibly across positions/tokens
        electric.w.weight.normal_(0.0, 0.5)
        noise.out.weight.normal_(0.0, 0.5)
    return electric, noise


# ------------------------------------------------------------------------ reference NCE loop
def _reference_nce(electric: nn.Module, noise: TwoTowerCloze, tokens: Tensor, mask: Tensor, positions: Tensor,
                   noised: Tensor, variant: str) -> tuple[list[Tensor], list[int]]:
    """Eq. 3.17 / 3.18 written out per sentence and per position on unpadded rows.

    Returns the per-sentence sums L_b and the number of classified tokens per sentence.
    """
    per_row, counts = [], []
    for b in range(tokens.shape[0]):
        l = int(mask[b].sum())
        x, ones = tokens[b, :l], torch.ones(1, l, dtype=torch.bool)
        R = [int(t) for t in positions[b, :l].nonzero().flatten()]
        k = len(R)
        with torch.no_grad():
            q = noise.log_probs(x[None], ones)[0].exp()  # (l, V): q(·|x_\t), clean context
        total = torch.zeros((), dtype=torch.float64)
        if variant == "exact":
            n = l
            log_p = electric(x[None], ones)[0]
            for t in range(l):  # l · E_{t~Uni(1,l)}: every position is a positive
                p_hat = log_p[t].exp()
                total = total - torch.log(n * p_hat / (n * p_hat + k * q[t, x[t]]))
            for t in R:  # k · E_{t∈R}: its own pass with only x_t replaced
                y = x.clone()
                y[t] = noised[b, t]
                p_hat = electric(y[None], ones)[0, t].exp()
                total = total - torch.log(k * q[t, y[t]] / (n * p_hat + k * q[t, y[t]]))
            counts.append(l + k)
        else:
            n = l - k
            xn = noised[b, :l]
            log_p = electric(xn[None], ones)[0]  # one pass over x^noised
            for t in range(l):
                p_hat = log_p[t].exp()
                if t in R:
                    total = total - torch.log(k * q[t, xn[t]] / (n * p_hat + k * q[t, xn[t]]))
                else:
                    total = total - torch.log(n * p_hat / (n * p_hat + k * q[t, x[t]]))
            counts.append(l)
        per_row.append(total)
    return per_row, counts


@pytest.mark.parametrize("variant", ["efficient", "exact"])
def test_nce_loss_and_gradient_equal_per_position_loop(variant: str) -> None:
    electric, noise = _models()
    rows = ROWS if variant == "exact" else ROWS[:3] + ROWS[4:]  # a length-2 row has k = 1 < l
    rows = rows + [[1]] if variant == "exact" else rows  # l = 1: 1 positive, 1 negative in Eq. 3.17
    tokens, mask = _rows(rows)
    fn = ElectricNCELoss(variant=variant)
    out = fn(electric, noise, tokens, mask, generator=torch.Generator().manual_seed(3))
    positions, noised = out["positions"], out["noise_tokens"]
    assert bool((noised != tokens)[~positions].logical_not().all())  # replaced only at R
    ref_rows, counts = _reference_nce(electric, noise, tokens, mask, positions, noised, variant)
    ref = torch.stack(ref_rows).sum() / sum(counts)
    assert torch.allclose(out["nce"], ref, rtol=1e-10, atol=0)
    params = [p for p in electric.parameters()]
    got = torch.autograd.grad(out["nce"], params, retain_graph=True)
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)
    assert max(float(g.abs().max()) for g in got) > 1e-4
    # replaying R and x̂ gives the same value; other reductions are the same per-row sums
    for reduction, expect in [("sum", torch.stack(ref_rows).sum()), ("none", torch.stack(ref_rows))]:
        again = ElectricNCELoss(variant=variant, reduction=reduction)(
            electric, noise, tokens, mask, positions=positions, noise_tokens=noised)
        assert torch.allclose(again["nce"], expect.detach(), rtol=1e-10, atol=0)


def test_efficient_and_exact_differ_and_positives_counts() -> None:
    """Eq. 3.18 is not Eq. 3.17 (different counts and contexts); positives are t ∉ R for 3.18 only."""
    electric, noise = _models()
    tokens, mask = _rows(ROWS[:3])
    g = torch.Generator().manual_seed(0)
    r = ElectricNCELoss()(electric, noise, tokens, mask, generator=g)
    fns = {v: ElectricNCELoss(variant=v) for v in ElectricNCELoss.VARIANTS}
    log_q = noise.log_probs(tokens, mask).detach()
    logits = {v: f.classifier_logits(electric, log_q, tokens, mask, r["positions"], r["noise_tokens"])
              for v, f in fns.items()}
    assert torch.equal(logits["exact"].is_positive, mask)
    assert torch.equal(logits["efficient"].is_positive, mask & ~r["positions"])
    outs = {v: f(electric, noise, tokens, mask, positions=r["positions"], noise_tokens=r["noise_tokens"])
            for v, f in fns.items()}
    assert abs(float(outs["exact"]["nce"].detach() - outs["efficient"]["nce"].detach())) > 1e-6


def test_nce_sends_no_gradient_to_noise_and_mle_trains_only_noise() -> None:
    electric, noise = _models()
    tokens, mask = _rows(ROWS[:3])
    out = ElectricNCELoss()(electric, noise, tokens, mask, generator=torch.Generator().manual_seed(1))
    noise_params = list(noise.parameters())
    assert all(g is None for g in torch.autograd.grad(out["nce"], noise_params, retain_graph=True,
                                                      allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(out["noise_mle"], list(electric.parameters()),
                                                      retain_graph=True, allow_unused=True))
    got = torch.autograd.grad(out["loss"], noise_params)
    want = torch.autograd.grad(noise.mle_loss(tokens, mask), noise_params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert torch.allclose(out["noise_mle"], noise.mle_loss(tokens, mask))
    fixed = ElectricNCELoss(noise_weight=0.0)(electric, noise, tokens, mask,
                                              positions=out["positions"], noise_tokens=out["noise_tokens"])
    assert not fixed["noise_mle"].requires_grad and torch.allclose(fixed["loss"], fixed["nce"])


class _CleanContextElectric(nn.Module):
    """p̂(y_t | ·) := q(y_t | x_\\t) of fixed clean tokens: Electric equal to the noise."""

    def __init__(self, noise: TwoTowerCloze, tokens: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.log_q = noise.log_probs(tokens, mask).detach()

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, self.log_q.gather(-1, tokens[..., None]).squeeze(-1), 0.0)


class _NoiseAsElectric(nn.Module):
    """p̂(x_t | x_\\t) := q(x_t | x_\\t) evaluated on its own input (q ignores x_t)."""

    def __init__(self, noise: TwoTowerCloze) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.noise.token_log_probs(tokens, mask).detach()


@pytest.mark.parametrize("variant", ["exact", "efficient"])
def test_logit_is_log_prior_ratio_when_electric_equals_the_noise(variant: str) -> None:
    """p̂ = q = the true conditional: G = log(n_pos · q) − log(k · q) = log(n_pos / k) everywhere."""
    _, noise = _models(1)
    tokens, mask = _rows(ROWS)
    fn = ElectricNCELoss(variant=variant)
    model = _NoiseAsElectric(noise) if variant == "exact" else _CleanContextElectric(noise, tokens, mask)
    out = fn(model, noise, tokens, mask, generator=torch.Generator().manual_seed(2))
    logits = fn.classifier_logits(model, noise.log_probs(tokens, mask).detach(), tokens, mask,
                                  out["positions"], out["noise_tokens"])
    lengths, k = mask.sum(1).double(), out["positions"].sum(1).double()
    n_pos = lengths if variant == "exact" else lengths - k
    c = (n_pos / k).log()[:, None].expand_as(logits.positive)
    assert torch.allclose(logits.positive[logits.is_positive], c[logits.is_positive], atol=1e-10)
    assert torch.allclose(logits.negative[logits.is_negative], c[logits.is_negative], atol=1e-10)
    # the loss is then the Bayes rate of the prior n_pos : k
    c = c[:, 0]
    per_row = n_pos * nn.functional.softplus(-c) + k * nn.functional.softplus(c)
    assert torch.allclose(out["nce"], per_row.sum() / (n_pos + k).sum(), rtol=1e-10)


def test_noise_positions_counts_and_draws() -> None:
    assert [num_noise_positions(n) for n in (1, 6, 7, 20, 40)] == [1, 1, 2, 3, 6]
    assert num_noise_positions(10, 0.5) == 5
    tokens, mask = _rows(ROWS)
    fn = ElectricNCELoss()
    counts = fn.noise_counts(mask)
    assert counts.tolist() == [2, 1, 2, 1, 2]
    seen = torch.zeros(mask.shape)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        r = draw_noise_positions(mask, counts, generator=g)
        assert torch.equal(r.sum(1), counts) and not bool((r & ~mask).any())
        seen += r
    freq = seen[0, :9] / 300  # row 0: k / l = 2/9 at every real position
    assert float((freq - 2 / 9).abs().max()) < 4 * math.sqrt(2 / 9 * 7 / 9 / 300)


# ------------------------------------------------------------------------ two-tower noise
def test_two_tower_padding_invariance_and_normalisation() -> None:
    _, noise = _models()
    tokens, mask = _rows(ROWS, width=14, fill=0)
    lp = noise.log_probs(tokens, mask)
    garbage = torch.where(mask, tokens, torch.randint(1, V, tokens.shape))  # ids in padding are never read
    assert torch.allclose(noise.log_probs(garbage, mask)[mask], lp[mask], atol=1e-12)
    for b, row in enumerate(ROWS):
        alone = noise.log_probs(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.bool))[0]
        assert torch.allclose(lp[b, : len(row)], alone, atol=1e-12)
    probs = lp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-12)
    assert bool((probs[..., 0] == 0).all())  # pad is outside the support


def test_two_tower_reads_neighbours_but_never_x_t() -> None:
    _, noise = _models()
    row = [1, 4, 5, 6, 4, 2]
    tokens, mask = _rows([row])
    base = noise.log_probs(tokens, mask)[0].detach()
    for t in range(len(row)):
        changed = tokens.clone()
        changed[0, t] = 3 if row[t] != 3 else 4
        after = noise.log_probs(changed, mask)[0].detach()
        assert torch.allclose(after[t], base[t], atol=1e-12), t  # q(·|x_\t) ignores x_t
        for s in (t - 1, t + 1):  # ... but reads both neighbours (the start/end states at the ends)
            if 0 <= s < len(row):
                assert float((after[s, 1:] - base[s, 1:]).abs().max()) > 1e-6, (t, s)


def test_causal_masks() -> None:
    mask = torch.tensor([[True, True, True, False]])
    ltr, rtl = causal_attention_mask(mask)[0, 0], causal_attention_mask(mask, reverse=True)[0, 0]
    assert ltr.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert rtl.tolist() == [[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_two_tower_sampling_matches_q() -> None:
    """Frequencies of x̂_t over n draws: Pearson χ² (3 degrees of freedom) below its 0.999 quantile."""
    torch.manual_seed(0)
    noise = TwoTowerCloze(5, **SIZE).double()
    with torch.no_grad():
        noise.out.bias.copy_(torch.tensor([0.0, 1.5, -1.0, 0.3, 0.8]))
    n = 4000
    tokens, mask = _rows([[1, 4, 3, 2]] * n)
    positions = torch.zeros_like(mask)
    positions[:, 2] = True
    draws = noise.sample(tokens, mask, positions, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws[:, [0, 1, 3]], tokens[:, [0, 1, 3]])
    with torch.no_grad():
        q = noise.log_probs(tokens[:1], mask[:1])[0, 2].exp()[1:]  # support: ids 1..4
    counts = torch.bincount(draws[:, 2], minlength=5)[1:].double()
    assert int(torch.bincount(draws[:, 2], minlength=5)[0]) == 0
    chi2 = float(((counts - n * q) ** 2 / (n * q)).sum())
    assert chi2 < 16.27, (counts / n, q)
    uniform = float(((counts - n / 4) ** 2 / (n / 4)).sum())
    assert uniform > 100  # the test would notice samples that ignore q


# ------------------------------------------------------------------------ MLM and Electric scoring
def test_masked_lm_pll_batched_equals_loop() -> None:
    torch.manual_seed(0)
    mlm = MaskedLM(V, **SIZE).double()
    tokens, mask = _rows(ROWS, width=13)
    pll = mlm.pseudo_log_likelihood(tokens, mask, max_batch=5).detach()
    for b, row in enumerate(ROWS):
        total = 0.0
        for t in range(len(row)):
            x = torch.tensor([row])
            x[0, t] = mlm.mask_id
            logits = mlm(x, torch.ones(1, len(row), dtype=torch.bool)).detach()
            total += float(logits[0, t].log_softmax(-1)[row[t]])
        assert float(pll[b]) == pytest.approx(total, abs=1e-10)
    assert torch.allclose(mlm.pseudo_log_likelihood(tokens, mask, max_batch=1000), pll, atol=1e-12)


def test_mlm_loss_never_masks_padding() -> None:
    torch.manual_seed(0)
    mlm = MaskedLM(V, **SIZE).double()
    tokens, mask = _rows(ROWS)
    seen: list[Tensor] = []
    hook = mlm.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    loss = mlm.mlm_loss(tokens, mask, mask_prob=1.0, generator=torch.Generator().manual_seed(0))
    hook.remove()
    inputs = seen[0]
    assert torch.equal(inputs[~mask], tokens[~mask])  # padding is never corrupted
    assert bool((inputs[mask] == mlm.mask_id).any())
    with torch.no_grad():  # mask_prob = 1: R = every real position, and nothing else
        want = nn.functional.cross_entropy(mlm._logits(inputs, mask)[mask], tokens[mask])
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-10)
    loss.backward()


def test_electric_score_is_one_pass_sum_and_padding_invariant() -> None:
    electric, _ = _models()
    tokens, mask = _rows(ROWS, width=14)
    per_pos = electric(tokens, mask)
    assert bool((per_pos[~mask] == 0).all())
    assert torch.allclose(electric.score(tokens, mask), per_pos.sum(1), atol=1e-12)
    assert torch.allclose(electric.energy(tokens, mask), -per_pos)
    garbage = torch.where(mask, tokens, torch.randint(1, V, tokens.shape))
    assert torch.allclose(electric.score(garbage, mask), electric.score(tokens, mask), atol=1e-12)
    scores = electric.score(tokens, mask).detach()
    for b, row in enumerate(ROWS):
        alone = electric.score(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.bool)).detach()
        assert float(alone) == pytest.approx(float(scores[b]), abs=1e-10)
    assert float(per_pos[mask].detach().std()) > 1e-3  # not a constant


# ------------------------------------------------------------------------ training smoke
def test_joint_training_lowers_both_losses() -> None:
    vocab = WordVocabulary(["a", "b"])
    a, b = vocab.encode(["a", "b"])
    n_vocab = len(vocab)  # 6
    rows = [[1] + [(a, b)[(i + s) % 2] for i in range(n)] + [2] for n in range(2, 9) for s in (0, 1)]
    tokens, mask = _rows(rows)
    torch.manual_seed(0)
    electric = Electric(n_vocab, **SIZE)
    noise = TwoTowerCloze(n_vocab, **SIZE)
    electric0, noise0 = copy.deepcopy(electric), copy.deepcopy(noise)
    fn = ElectricNCELoss()
    # a fixed evaluation: 4 draws of (R, x̂) from the initial noise, scored by an Electric
    ev_tokens, ev_mask = tokens.repeat(4, 1), mask.repeat(4, 1)
    with torch.no_grad():
        ref = fn(electric0, noise0, ev_tokens, ev_mask, generator=torch.Generator().manual_seed(1))
    replay = dict(positions=ref["positions"], noise_tokens=ref["noise_tokens"])
    opt = torch.optim.Adam([{"params": electric.parameters(), "lr": 1e-2},
                            {"params": noise.parameters(), "lr": 2e-3}])
    g = torch.Generator().manual_seed(0)
    nce, mle = [], []
    for _ in range(60):
        out = fn(electric, noise, tokens, mask, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        nce.append(float(out["nce"].detach()))
        mle.append(float(out["noise_mle"].detach()))
    assert sum(mle[-5:]) < 0.5 * sum(mle[:5])
    # the training NCE is a moving target (dynamic NCE: the noise gets harder to tell from data) ...
    assert sum(nce[-10:]) / 10 < sum(nce[:5]) / 5 - 0.01
    # ... so also score Electric against the fixed initial noise on fixed draws (R, x̂)
    with torch.no_grad():
        after = fn(electric, noise0, ev_tokens, ev_mask, **replay)["nce"]
    assert float(after) < float(ref["nce"]) - 0.02


# ------------------------------------------------------------------------ validation
def test_validation_errors() -> None:
    electric, noise = _models()
    tokens, mask = _rows(ROWS[:2])
    fn = ElectricNCELoss()
    with pytest.raises(ValueError, match="shape"):
        electric(tokens[0], mask[0])
    with pytest.raises(ValueError, match="shape of tokens"):
        electric(tokens, mask[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        electric(tokens, mask.long())
    with pytest.raises(ValueError, match="outside"):
        electric(torch.where(mask, tokens, V), torch.ones_like(mask))
    with pytest.raises(ValueError, match="outside"):
        noise.log_probs(tokens - 1, mask)
    with pytest.raises(ValueError, match="right padding"):
        electric(tokens, torch.cat([mask[:, :1], ~mask[:, 1:]], 1))
    with pytest.raises(ValueError, match="no real token"):
        electric(tokens, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="pad_id"):
        noise.log_probs(tokens, torch.ones_like(mask))  # pad ids at "real" positions
    with pytest.raises(ValueError, match="l=1"):  # Eq. 3.18 with l = 1: k = 1, no positive
        fn(electric, noise, *_rows([[1, 4, 2], [4]]))
    with pytest.raises(ValueError, match="l=2"):  # k = ceil(0.6 · 2) = l
        ElectricNCELoss(noise_fraction=0.6)(electric, noise, *_rows([[1, 4, 2], [4, 5]]))
    out = ElectricNCELoss(variant="exact")(electric, noise, *_rows([[4]]))  # Eq. 3.17 handles l = 1
    assert torch.isfinite(out["loss"])
    for kwargs in [dict(variant="fast"), dict(noise_fraction=0.0), dict(noise_fraction=1.5),
                   dict(reduction="avg"), dict(noise_weight=-1.0)]:
        with pytest.raises(ValueError):
            ElectricNCELoss(**kwargs)
    with pytest.raises(ValueError, match="needs explicit positions"):
        fn(electric, noise, tokens, mask, noise_tokens=tokens)
    with pytest.raises(ValueError, match="real positions"):
        fn(electric, noise, tokens, mask, positions=~mask)
    with pytest.raises(ValueError, match="at least one noise position"):
        fn(electric, noise, tokens, mask, positions=torch.zeros_like(mask))
    positions = torch.zeros_like(mask)
    positions[:, 1] = True
    with pytest.raises(ValueError, match="outside"):
        fn(electric, noise, tokens, mask, positions=positions, noise_tokens=torch.full_like(tokens, V))
    with pytest.raises(ValueError, match="zero noise probability"):
        fn(electric, noise, tokens, mask, positions=positions, noise_tokens=torch.zeros_like(tokens))
    with pytest.raises(ValueError, match="vocab_size"):
        fn(Electric(V + 1, **SIZE), noise, tokens, mask)
    with pytest.raises(ValueError, match="real positions"):
        noise.sample(tokens, mask, ~mask)
    mlm = MaskedLM(V, **SIZE)
    with pytest.raises(ValueError, match="outside"):  # [MASK] is not a token to score
        mlm.pseudo_log_likelihood(torch.full_like(tokens, mlm.mask_id), mask)
    with pytest.raises(ValueError, match="max_batch"):
        mlm.pseudo_log_likelihood(tokens, mask, max_batch=0)
    with pytest.raises(ValueError, match="mask_prob"):
        mlm.mlm_loss(tokens, mask, mask_prob=0.0)
    with pytest.raises(ValueError, match="divisible"):
        Electric(V, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="pad_id"):
        TwoTowerCloze(V, pad_id=V)
