"""Exact linear-chain CRF: log partition, likelihood, marginals, Viterbi, k-best, sampling.

Monograph §4.1.1 (linear-chain CRFs, Eq. 4.3) and §4.1.3 (conditional maximum likelihood,
Eqs. 4.10-4.11). The model scores a tag sequence y_1..y_L of a row with real length L as

    U(x, y) = start[y_1] + sum_t emissions[t, y_t] + sum_{t>1} transitions[y_{t-1}, y_t] + end[y_L]

and p(y|x) = exp U(x, y) / Z(x). Disallowed transitions/starts/ends are masked to a large
negative finite score (``NEG``) for the partition function, so gradients stay finite, and to
-inf for decoding.

Notation: B batch, T (padded) length, K tags, S samples, k paths. Emissions are batch-first
(B, T, K); ``mask`` (B, T) is bool and left-aligned (first column all True, no holes).

Speed: ``log Z`` is a custom ``torch.autograd.Function``; the backward pass runs the beta
recursion and returns node marginals (grad w.r.t. emissions/start/end) and summed edge
marginals (grad w.r.t. transitions): no autograd graph through the time loop. The forward and
backward recursions run in scaled probability space (a (B, K) @ (K, K) matmul per step, the
HMM scaling of Rabiner 1989) with a *certificate*: every value that must be positive (for
states reachable under the constraints) is checked to be far above the float underflow
threshold, which bounds the relative error by the float rounding error. When the certificate
fails (huge score ranges, e.g. 1e4), the call is redone with the log-space recursion
(max-subtracted ``logsumexp`` on (B, K, K)), which is always safe.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LinearChainCRF", "bio_constraints", "NEG"]

NEG = -1e30  # score of a disallowed transition/start/end in log Z: -inf-equivalent, finite gradients
_REDUCTIONS = ("none", "sum", "mean", "token_mean")


# ----------------------------------------------------------------------------- constraints


def bio_constraints(tags: list[str]) -> dict[str, Tensor]:
    """Allowed transitions for BIO tag names (``"O"``, ``"B-X"``, ``"I-X"``).

    ``I-X`` may only follow ``B-X`` or ``I-X`` and may not start a sequence; everything else is
    allowed. Returns ``{"constraints": (K, K), "start_allowed": (K,), "end_allowed": (K,)}``
    bool tensors, so ``LinearChainCRF(len(tags), **bio_constraints(tags))`` works.
    """
    for name in tags:
        if name != "O" and not (len(name) > 2 and name[:2] in ("B-", "I-")):
            raise ValueError(f"BIO tag names are 'O', 'B-<type>' or 'I-<type>', got {name!r}")
    k = len(tags)
    allowed = torch.ones(k, k, dtype=torch.bool)
    start = torch.ones(k, dtype=torch.bool)
    for j, name in enumerate(tags):
        if name.startswith("I-"):
            start[j] = False
            for i, prev in enumerate(tags):
                allowed[i, j] = prev in ("B-" + name[2:], name)
    return {"constraints": allowed, "start_allowed": start, "end_allowed": torch.ones(k, dtype=torch.bool)}


def _reach_tables(allowed: Tensor, start_ok: Tensor, end_ok: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Structural support: ``reach[t]`` (T, K) tags with a feasible prefix of length t+1;
    ``coreach[s]`` (T, K) tags with a feasible suffix ending s steps later."""
    a = allowed.to(torch.float32)
    reach, coreach = [start_ok], [end_ok]
    for _ in range(T - 1):
        reach.append((reach[-1].to(torch.float32) @ a) > 0)
        coreach.append((a @ coreach[-1].to(torch.float32)) > 0)
    return torch.stack(reach), torch.stack(coreach)


# ----------------------------------------------------------------------------- recursions


def _thresholds(dtype: torch.dtype, K: int) -> float:
    """Smallest certified value: underflowed terms (< tiny each, at most K+1 of them) stay below
    the rounding error, and 1/thr^2 fits in float64 (used for edge marginals)."""
    fi = torch.finfo(dtype)
    return max(fi.tiny * 4 * (K + 1) / fi.eps, 1e-100)


def _exp_params(trans: Tensor, start: Tensor, end: Tensor, allowed: Tensor, start_ok: Tensor,
                end_ok: Tensor):
    """exp(score - max) of the allowed entries (exact zeros elsewhere) and the maxima."""
    def ex(x: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        mx = x.masked_fill(~ok, NEG).amax()
        return (x - mx).exp().masked_fill(~ok, 0.0), mx
    E, mT = ex(trans, allowed)
    S, mS = ex(start, start_ok)
    Ee, mE = ex(end, end_ok)
    return E, mT, S, mS, Ee, mE


def _exp_forward(emissions: Tensor, mask: Tensor, lengths: Tensor, E: Tensor, mT: Tensor, S: Tensor,
                 mS: Tensor, Ee: Tensor, mE: Tensor, reach: Tensor | None, thr: float):
    """Scaled forward recursion. Returns (certified, logZ (B,), P (B, T, K), offsets (B, T), eh, m).

    P[:, t] is the normalized forward vector alpha_t / sum(alpha_t) (carried past a row's end);
    log alpha_t = log P[:, t] + offsets[:, t].
    """
    B, T, K = emissions.shape
    m = emissions.amax(-1, keepdim=True)                                     # (B, T, 1)
    eh = (emissions - m).exp()                                              # (B, T, K)
    ehs = eh.unbind(1)
    cols, full = _mask_columns(mask)
    f = S * ehs[0]                                                          # (B, K)
    c = f.sum(-1, keepdim=True)
    p = f / c
    ps, cs = [p], [c]
    for t in range(1, T):
        f = (p @ E) * ehs[t]
        c = f.sum(-1, keepdim=True)
        p = f / c if full[t] else torch.where(cols[t], f / c, p)
        ps.append(p)
        cs.append(c)
    P = torch.stack(ps, 1)                                                  # (B, T, K)
    C = torch.cat(cs, 1)                                                    # (B, T)
    final = (p * Ee).sum(-1)                                                # (B,)
    raw = P * C.unsqueeze(-1)                                               # f_t, (B, T, K)
    need = mask.unsqueeze(-1) if reach is None else mask.unsqueeze(-1) & reach.unsqueeze(0)
    certified = bool(((raw >= thr) | ~need).all()) and bool((final >= thr).all())
    if not certified:
        return False, None, None, None, eh, m
    step = (C.log() + m.squeeze(-1)).masked_fill(~mask, 0.0)               # (B, T)
    step[:, 1:] += mT * mask[:, 1:]
    offsets = mS + step.cumsum(1)                                          # (B, T)
    logz = final.log() + mE + offsets[:, -1]
    return True, logz, P, offsets, eh, m


def _exp_backward(mask: Tensor, lengths: Tensor, P: Tensor, eh: Tensor, E: Tensor, Ee: Tensor,
                  coreach: Tensor | None, thr: float):
    """Scaled beta recursion. Returns (certified, BN (B, T, K), d (B, T), D (B, T)).

    BN[:, t] = beta_t / d_t (beta excludes the emission at t); D_t = sum_k P_t(k) BN_t(k).
    """
    B, T, K = P.shape
    Et = E.t()
    eb = Ee.expand(B, K)
    braw = eb
    bs, ds = [], []
    d = braw.sum(-1, keepdim=True)
    bn = braw / d
    bs.append(braw)
    ds.append(d)
    ehs = eh.unbind(1)
    cols, full = _mask_columns(mask)
    for t in range(T - 2, -1, -1):
        braw = (ehs[t + 1] * bn) @ Et
        if not full[t + 1]:
            braw = torch.where(cols[t + 1], braw, eb)
        d = braw.sum(-1, keepdim=True)
        bn = braw / d
        bs.append(braw)
        ds.append(d)
    Braw = torch.stack(bs[::-1], 1)                                         # (B, T, K)
    dd = torch.cat(ds[::-1], 1)                                             # (B, T)
    if coreach is None:
        need = mask.unsqueeze(-1)
    else:
        steps_left = (lengths.unsqueeze(1) - 1 - torch.arange(T, device=mask.device)).clamp(min=0)
        need = mask.unsqueeze(-1) & coreach[steps_left]
    BN = Braw / dd.unsqueeze(-1)
    D = (P * BN).sum(-1)                                                    # (B, T)
    certified = bool(((Braw >= thr) | ~need).all()) and bool(((D >= thr) | ~mask).all())
    return certified, BN, dd, D


def _mask_columns(mask: Tensor) -> tuple[tuple[Tensor, ...], list[bool]]:
    """Mask columns (B, 1) and, per position, whether every row is real there (skips a ``where``)."""
    return mask.unsqueeze(-1).unbind(1), mask.all(0).tolist()


def _log_forward(emissions: Tensor, mask: Tensor, trans: Tensor, start: Tensor, end: Tensor):
    """Log-space alphas (B, T, K), carried past each row's end, and log Z (B,)."""
    B, T, K = emissions.shape
    a = start + emissions[:, 0]
    las = [a]
    for t in range(1, T):
        nxt = torch.logsumexp(a.unsqueeze(2) + trans, 1) + emissions[:, t]  # (B, K)
        a = torch.where(mask[:, t, None], nxt, a)
        las.append(a)
    return torch.stack(las, 1), torch.logsumexp(a + end, -1)


def _log_backward(emissions: Tensor, mask: Tensor, trans: Tensor, end: Tensor) -> Tensor:
    """Log-space betas (B, T, K): beta_t excludes the emission at t; end scores at the last position."""
    B, T, K = emissions.shape
    e = end.expand(B, K)
    b = e
    lbs = [b]
    for t in range(T - 2, -1, -1):
        rec = torch.logsumexp(trans + (emissions[:, t + 1] + b).unsqueeze(1), 2)
        b = torch.where(mask[:, t + 1, None], rec, e)
        lbs.append(b)
    return torch.stack(lbs[::-1], 1)


def _log_marginals(emissions, mask, trans, start, end, edges: bool):
    la, logz = _log_forward(emissions, mask, trans, start, end)
    lb = _log_backward(emissions, mask, trans, end)
    node = (la + lb - logz[:, None, None]).masked_fill(~mask.unsqueeze(-1), -math.inf).exp()
    edge = None
    if edges:
        w = emissions[:, 1:] + lb[:, 1:]                                    # (B, T-1, K)
        edge = la[:, :-1, :, None] + trans + w[:, :, None, :] - logz[:, None, None, None]
        edge = edge.masked_fill(~mask[:, 1:, None, None], -math.inf).exp()  # (B, T-1, K, K)
    return logz, node, edge


class _Cache:
    """Everything one exact forward-backward pass over a batch produces."""

    def __init__(self, emissions, mask, trans, start, end, allowed, start_ok, end_ok):
        emissions = emissions.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding may hold anything
        self.emissions, self.mask = emissions, mask
        self.trans, self.start, self.end = trans, start, end
        self.allowed, self.start_ok, self.end_ok = allowed, start_ok, end_ok
        self.lengths = mask.sum(1)
        B, T, K = emissions.shape
        self.thr = _thresholds(emissions.dtype, K)
        unconstrained = bool(allowed.all()) and bool(start_ok.all()) and bool(end_ok.all())
        if unconstrained:
            self.reach = self.coreach = None
        else:
            self.reach, self.coreach = _reach_tables(allowed, start_ok, end_ok, T)
        self.E, self.mT, self.S, self.mS, self.Ee, self.mE = _exp_params(trans, start, end, allowed,
                                                                         start_ok, end_ok)
        self.fast, self.logz, self.P, self.offsets, self.eh, _ = _exp_forward(
            emissions, mask, self.lengths, self.E, self.mT, self.S, self.mS, self.Ee, self.mE,
            self.reach, self.thr)
        if not self.fast:
            self.logz = _log_forward(emissions, mask, trans, start, end)[1]

    def marginals(self, edges: bool) -> tuple[Tensor, Tensor | None]:
        """Node marginals (B, T, K) and, if asked, edge marginals (B, T-1, K, K), exact zeros at padding."""
        if self.fast:
            ok, BN, d, D = _exp_backward(self.mask, self.lengths, self.P, self.eh, self.E, self.Ee,
                                         self.coreach, self.thr)
            if ok:
                m = self.mask.unsqueeze(-1)
                node = (self.P * BN / D.unsqueeze(-1)).masked_fill(~m, 0.0)
                edge = None
                if edges:
                    r, w = self._edge_factors(BN, d, D, None)
                    edge = (r[..., :, None] * w[..., None, :] * self.E.double()).to(self.P.dtype)
                return node, edge
        _, node, edge = _log_marginals(self.emissions, self.mask, self.trans, self.start, self.end, edges)
        return node, edge

    def _edge_factors(self, BN, d, D, weight):
        """xi_t(i, j) = r_t(i) * w_{t+1}(j) * E_ij, in float64 (r can exceed the float32 range)."""
        denom = D[:, :-1].double() * d[:, :-1].double()                                  # (B, T-1)
        scale = torch.where(self.mask[:, 1:], 1.0 / denom, torch.zeros_like(denom))
        if weight is not None:
            scale = scale * weight.double().unsqueeze(1)
        r = self.P[:, :-1].double() * scale.unsqueeze(-1)                                # (B, T-1, K)
        w = (self.eh[:, 1:] * BN[:, 1:]).double()                                       # (B, T-1, K)
        return r, w

    def gradients(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients of sum_b g_b log Z_b w.r.t. emissions, transitions, start, end."""
        B, T, K = self.emissions.shape
        last = (self.lengths - 1).view(B, 1, 1).expand(B, 1, K)
        if self.fast:
            ok, BN, d, D = _exp_backward(self.mask, self.lengths, self.P, self.eh, self.E, self.Ee,
                                         self.coreach, self.thr)
            if ok:
                node = (self.P * BN / D.unsqueeze(-1)).masked_fill(~self.mask.unsqueeze(-1), 0.0)
                r, w = self._edge_factors(BN, d, D, g)
                g_trans = ((r.reshape(-1, K).t() @ w.reshape(-1, K)) * self.E.double()).to(node.dtype)
                gn = node * g.view(B, 1, 1)
                return gn, g_trans, gn[:, 0].sum(0), gn.gather(1, last).squeeze(1).sum(0)
        _, node, edge = _log_marginals(self.emissions, self.mask, self.trans, self.start, self.end, True)
        gn = node * g.view(B, 1, 1)
        g_trans = (edge * g.view(B, 1, 1, 1)).sum((0, 1))
        return gn, g_trans, gn[:, 0].sum(0), gn.gather(1, last).squeeze(1).sum(0)


class _LogPartition(torch.autograd.Function):
    """log Z (B,) with a forward-backward gradient: d log Z / d emissions = node marginals,
    d log Z / d transitions = summed edge marginals (monograph §4.1.3, Eq. 4.11)."""

    @staticmethod
    def forward(ctx, emissions, trans, start, end, mask, allowed, start_ok, end_ok):
        cache = _Cache(emissions.detach(), mask, trans.detach(), start.detach(), end.detach(),
                       allowed, start_ok, end_ok)
        ctx.cache = cache
        return cache.logz

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logz):
        g_em, g_tr, g_st, g_en = ctx.cache.gradients(grad_logz)
        need = ctx.needs_input_grad
        return (g_em if need[0] else None, g_tr if need[1] else None, g_st if need[2] else None,
                g_en if need[3] else None, None, None, None, None)


# ----------------------------------------------------------------------------- module


class LinearChainCRF(nn.Module):
    """Linear-chain CRF over K tags (monograph §4.1.1, Eq. 4.3; training §4.1.3, Eq. 4.10).

    Args:
        num_tags: K.
        constraints: (K, K) bool, ``constraints[i, j]`` = tag j may follow tag i (None: all).
        start_allowed / end_allowed: (K,) bool, tags that may begin / end a sequence (None: all).

    Parameters ``transitions`` (K, K), ``start`` (K,), ``end`` (K,); disallowed entries are
    fixed at ``NEG`` (their gradient is zero). All methods take batch-first ``emissions``
    (B, T, K) and an optional left-aligned bool ``mask`` (B, T) (None: all True).
    """

    def __init__(self, num_tags: int, *, constraints: Tensor | None = None,
                 start_allowed: Tensor | None = None, end_allowed: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(num_tags, int) or num_tags < 1:
            raise ValueError(f"num_tags must be a positive int, got {num_tags!r}")
        K = num_tags
        self.num_tags = K

        def as_mask(x, shape, name):
            if x is None:
                return torch.ones(shape, dtype=torch.bool)
            x = torch.as_tensor(x)
            if tuple(x.shape) != shape or x.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool tensor of shape {shape}, got "
                                 f"{x.dtype} {tuple(x.shape)}")
            return x.clone()

        self.register_buffer("allowed", as_mask(constraints, (K, K), "constraints"))
        self.register_buffer("start_allowed", as_mask(start_allowed, (K,), "start_allowed"))
        self.register_buffer("end_allowed", as_mask(end_allowed, (K,), "end_allowed"))
        if not self.start_allowed.any() or not self.end_allowed.any():
            raise ValueError("start_allowed and end_allowed must each allow at least one tag")
        self.transitions = nn.Parameter(torch.empty(K, K))
        self.start = nn.Parameter(torch.empty(K))
        self.end = nn.Parameter(torch.empty(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-0.1, 0.1), as pytorch-crf."""
        for p in (self.transitions, self.start, self.end):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}, constrained={not bool(self.allowed.all())}"

    # -- helpers ---------------------------------------------------------------------------------

    def _scores(self, dtype: torch.dtype, fill: float) -> tuple[Tensor, Tensor, Tensor]:
        """Effective (transitions, start, end) in ``dtype`` with disallowed entries set to ``fill``."""
        return (self.transitions.to(dtype).masked_fill(~self.allowed, fill),
                self.start.to(dtype).masked_fill(~self.start_allowed, fill),
                self.end.to(dtype).masked_fill(~self.end_allowed, fill))

    def _validate(self, emissions: Tensor, mask: Tensor | None) -> Tensor:
        if not isinstance(emissions, Tensor) or emissions.dim() != 3:
            raise ValueError(f"emissions must be (B, T, K), got shape "
                             f"{tuple(getattr(emissions, 'shape', ()))}")
        B, T, K = emissions.shape
        if K != self.num_tags:
            raise ValueError(f"emissions have {K} tags in the last dim, the CRF has {self.num_tags}")
        if not emissions.is_floating_point():
            raise TypeError(f"emissions must be floating point, got {emissions.dtype}")
        if T == 0 or B == 0:
            raise ValueError(f"emissions must have B, T >= 1, got shape {tuple(emissions.shape)}")
        if mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=emissions.device)
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape {(B, T)} matching emissions, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        mask = mask.to(emissions.device)
        if not mask[:, 0].all():
            row = int((~mask[:, 0]).nonzero()[0, 0])
            raise ValueError(f"mask row {row} is empty (length 0); the first column must be all True")
        holes = mask[:, 1:] & ~mask[:, :-1]
        if holes.any():
            row, pos = (int(v) for v in holes.nonzero()[0])
            raise ValueError(f"mask row {row} has a hole: position {pos + 1} is True after a False; "
                             "masks must be left-aligned")
        return mask

    def _validate_tags(self, tags: Tensor, mask: Tensor) -> Tensor:
        if tuple(tags.shape) != tuple(mask.shape):
            raise ValueError(f"tags must have shape {tuple(mask.shape)} matching emissions, got {tuple(tags.shape)}")
        if tags.dtype.is_floating_point or tags.dtype == torch.bool:
            raise TypeError(f"tags must be an integer tensor, got {tags.dtype}")
        tags = tags.to(mask.device).long()
        bad = mask & ((tags < 0) | (tags >= self.num_tags))
        if bad.any():
            row, pos = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"tag {int(tags[row, pos])} at row {row}, position {pos} is out of range "
                             f"[0, {self.num_tags})")
        tags = tags.masked_fill(~mask, 0)
        lengths = mask.sum(1)
        rows = torch.arange(tags.shape[0], device=tags.device)
        last = tags[rows, lengths - 1]
        checks = [
            ("start", ~self.start_allowed[tags[:, 0]], torch.zeros_like(lengths)),
            ("end", ~self.end_allowed[last], lengths - 1),
        ]
        for what, bad_rows, positions in checks:
            if bad_rows.any():
                row = int(bad_rows.nonzero()[0, 0])
                pos = int(positions[row])
                raise ValueError(f"gold tags violate the constraints: tag {int(tags[row, pos])} may not "
                                 f"{what} a sequence (row {row}, position {pos})")
        if tags.shape[1] > 1:
            bad = mask[:, 1:] & ~self.allowed[tags[:, :-1], tags[:, 1:]]
            if bad.any():
                row, pos = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"gold tags violate the constraints: transition {int(tags[row, pos])} -> "
                                 f"{int(tags[row, pos + 1])} is not allowed (row {row}, position {pos + 1})")
        return tags

    def _cache(self, emissions: Tensor, mask: Tensor) -> _Cache:
        trans, start, end = self._scores(emissions.dtype, NEG)
        return _Cache(emissions.detach(), mask, trans.detach(), start.detach(), end.detach(),
                      self.allowed, self.start_allowed, self.end_allowed)

    # -- likelihood ------------------------------------------------------------------------------

    def log_partition(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """log Z(x) (B,) (monograph Eq. 4.11), differentiable w.r.t. emissions and parameters."""
        mask = self._validate(emissions, mask)
        trans, start, end = self._scores(emissions.dtype, NEG)
        return _LogPartition.apply(emissions, trans, start, end, mask, self.allowed,
                                   self.start_allowed, self.end_allowed)

    def score(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> Tensor:
        """U(x, y) (B,) of the given tag sequences (B, T); padded positions of ``tags`` are ignored."""
        mask = self._validate(emissions, mask)
        tags = self._validate_tags(tags, mask)
        return self._score(emissions, tags, mask)

    def _score(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        trans, start, end = self._scores(emissions.dtype, NEG)
        B, T, K = emissions.shape
        lengths = mask.sum(1)
        em = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)           # (B, T)
        s = start[tags[:, 0]] + em.masked_fill(~mask, 0.0).sum(1)
        if T > 1:
            s = s + (trans[tags[:, :-1], tags[:, 1:]] * mask[:, 1:]).sum(1)
        return s + end[tags.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)]

    def log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None, *,
                       reduction: str = "mean") -> Tensor:
        """log p(y|x) = U(x, y) - log Z(x) (monograph Eq. 4.10); higher is better.

        reduction: ``"none"`` (B,), ``"sum"``, ``"mean"`` (over the batch) or ``"token_mean"``
        (sum over the batch / number of real tokens), as pytorch-crf.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        mask = self._validate(emissions, mask)
        tags = self._validate_tags(tags, mask)
        trans, start, end = self._scores(emissions.dtype, NEG)
        logz = _LogPartition.apply(emissions, trans, start, end, mask, self.allowed,
                                   self.start_allowed, self.end_allowed)
        llh = self._score(emissions, tags, mask) - logz
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        return llh.sum() / mask.sum()

    def nll(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None, *,
            reduction: str = "mean") -> Tensor:
        """Negative log-likelihood, ``-log_likelihood(...)``: a loss to minimise."""
        return -self.log_likelihood(emissions, tags, mask, reduction=reduction)

    # -- marginals -------------------------------------------------------------------------------

    @torch.no_grad()
    def marginals(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """Node marginals p(y_t = j | x) (B, T, K); zeros at padded positions."""
        mask = self._validate(emissions, mask)
        return self._cache(emissions, mask).marginals(edges=False)[0]

    @torch.no_grad()
    def edge_marginals(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """Edge marginals p(y_t = i, y_{t+1} = j | x) (B, T-1, K, K); zeros where t+1 is padding."""
        mask = self._validate(emissions, mask)
        return self._cache(emissions, mask).marginals(edges=True)[1]

    # -- decoding --------------------------------------------------------------------------------

    @torch.no_grad()
    def viterbi(self, emissions: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Best tag sequences (B, T) (padded with -1) and their scores U(x, y*) (B,).

        A row with no feasible sequence under the constraints gets score -inf.
        """
        mask = self._validate(emissions, mask)
        trans, start, end = self._scores(emissions.dtype, -math.inf)
        B, T, K = emissions.shape
        trans_t = trans.t().contiguous()                                    # [j, i]
        ems = emissions.unbind(1)
        a = start + ems[0]                                                  # (B, K)
        hist = []
        lengths = mask.sum(1)
        first_end = int(lengths.min())
        for t in range(1, T):  # runs past a row's end (garbage history there, skipped when backtracking)
            best, idx = (a.unsqueeze(1) + trans_t).max(2)                    # (B, K): best previous tag
            if t < first_end:
                a = best + ems[t]
            else:  # rows that have ended keep their last real alpha
                a = torch.where(mask[:, t:t + 1], best + ems[t], a)
            hist.append(idx)
        scores, best_last = (a + end).max(-1)                                # (B,)
        best_last = best_last.unsqueeze(1)
        starts = (lengths - 1).unsqueeze(1)                                  # (B, 1): backtracking starts here
        first_start = first_end - 1
        cur = best_last
        out = [cur]
        for t in range(T - 1, 0, -1):
            cur = hist[t - 1].gather(1, cur)                                 # tag at t-1
            if t - 1 >= first_start:
                cur = torch.where(starts == t - 1, best_last, cur)
            out.append(cur)
        tags = torch.cat(out[::-1], 1).masked_fill(~mask, -1)
        return tags, scores

    @torch.no_grad()
    def kbest(self, emissions: Tensor, mask: Tensor | None = None, k: int = 1) -> tuple[Tensor, Tensor]:
        """Exact k best tag sequences (B, k, T) (padded with -1) and scores (B, k), best first.

        Rows with fewer than k feasible sequences get tags -1 and score -inf in the extra slots.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        mask = self._validate(emissions, mask)
        trans, start, end = self._scores(emissions.dtype, -math.inf)
        B, T, K = emissions.shape
        dev = emissions.device
        a = emissions.new_full((B, K, k), -math.inf)                       # (B, K tag, k rank)
        a[:, :, 0] = start + emissions[:, 0]
        ident = (torch.arange(K, device=dev)[:, None] * k + torch.arange(k, device=dev)).expand(B, K, k)
        hist = []
        for t in range(1, T):
            cand = (a.unsqueeze(3) + trans[:, None, :]).reshape(B, K * k, K)   # (B, K*k, K)
            val, idx = cand.topk(k, dim=1)                                       # (B, k, K)
            m = mask[:, t, None, None]
            a = torch.where(m, val.transpose(1, 2) + emissions[:, t, :, None], a)
            hist.append(torch.where(m, idx.transpose(1, 2), ident))              # (B, K, k): flat i*k+r
        scores, sel = (a + end[:, None]).reshape(B, K * k).topk(k, dim=1)       # (B, k)
        tag, rank = sel // k, sel % k
        out = [tag]
        for h in reversed(hist):
            flat = h.reshape(B, K * k).gather(1, tag * k + rank)
            tag, rank = flat // k, flat % k
            out.append(tag)
        tags = torch.stack(out[::-1], 2)                                           # (B, k, T)
        tags = tags.masked_fill(~mask[:, None, :] | (scores == -math.inf)[:, :, None], -1)
        return tags, scores

    @torch.no_grad()
    def sample(self, emissions: Tensor, mask: Tensor | None = None, num_samples: int = 1, *,
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples y ~ p(y|x) (B, S, T) (padded with -1) by forward filtering-backward sampling."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        mask = self._validate(emissions, mask)
        cache = self._cache(emissions, mask)
        B, T, K = emissions.shape
        S = num_samples
        if cache.fast:
            la = cache.P.log() + cache.offsets.unsqueeze(-1)                  # (B, T, K), -inf off support
        else:
            la = _log_forward(emissions, mask, cache.trans, cache.start, cache.end)[0]

        def gumbel_argmax(logits: Tensor) -> Tensor:
            u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
            return (logits - (-u.clamp_min(torch.finfo(u.dtype).tiny).log()).log()).argmax(-1)

        cur = gumbel_argmax((la[:, -1] + cache.end).unsqueeze(1).expand(B, S, K))   # (B, S)
        out = [cur]
        trans_t = cache.trans.t()                                                   # [j, i]
        for t in range(T - 2, -1, -1):
            logits = la[:, t, None, :] + trans_t[cur]                                # (B, S, K)
            cur = torch.where(mask[:, t + 1, None], gumbel_argmax(logits), cur)
            out.append(cur)
        return torch.stack(out[::-1], 2).masked_fill(~mask[:, None, :], -1)
