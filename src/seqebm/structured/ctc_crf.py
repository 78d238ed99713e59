"""CTC-CRF (monograph §4.2.2, Eqs. 4.21-4.24): a CRF over CTC paths with a label n-gram edge potential.

For frames x_1..x_T and a CTC path pi (symbols: blank 0, labels 1..V) the potential is

    phi(pi, x) = log p_LM(B(pi)) + sum_t log p(pi_t | x)                      (Eq. 4.22)

with B the CTC collapse (merge repeats, drop blanks) and p_LM a label n-gram
(:class:`seqebm.structured.label_ngram.LabelNGram`, fixed during training). The model is
p(pi | x) = exp phi / Z(x) (Eq. 4.21), and the loss of a transcript y is (Eq. 4.24)

    -log p(y | x) = -(log sum_{pi: B(pi) = y} exp phi(pi, x)) + log Z(x)
                  = -(log p_LM(y) + log sum_{B(pi) = y} prod_t p(pi_t | x))  +  log Z(x)
                       numerator (CTC forward over the alignments of y)         denominator

The **numerator** is ``log p_LM(y) - F.ctc_loss(...)``. The **denominator** runs the forward
algorithm over the *denominator graph*, the CTC topology composed with the n-gram: one state per
(history h of the last c labels, blank-or-label), c = max(n-1, 1):

* (h, blank) --blank--> (h, blank), (h, label) --blank--> (h, blank)              weight 1
* (h, label) --last(h)--> (h, label)  (a repeated frame of the same label)        weight 1
* (h, blank) --k--> (h+k, label), (h, label) --k != last(h)--> (h+k, label)         weight p(k | h)
* start: like (<s>..<s>, blank); end: weight p(</s> | h).

The recursion runs in scaled probability space (each frame's vector divided by its sum, the
log scales accumulated; frame scores shifted by their per-frame max), a (B, S) x (S, S) product
per frame, sparse when S is large. Its backward pass is written by hand (:class:`_Denominator`):
the gradient of log Z w.r.t. log p(pi_t = c | x) is the posterior occupancy of symbol c at frame t
(Eq. 4.23, second term), from one beta recursion.

Notation: B utterances, T frames, C = V + 1 symbols (blank first), S graph states, H histories.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.structured.label_ngram import LabelNGram

__all__ = ["DenominatorGraph", "ctc_crf_denominator", "ctc_crf_denominator_autograd", "ctc_crf_numerator", "CTCCRFLoss", "check_log_probs"]

_SPARSE_STATES = 256  # graphs with more states use a sparse transition matrix


@dataclass
class DenominatorGraph:
    """The CTC topology composed with a label n-gram.

    Attributes:
        weights: (S, S) transition probabilities, ``weights[s, s']`` for s -> s' (dense or sparse CSR).
        weights_t: its transpose (same layout), for the backward recursion.
        start: (S,) probabilities of the states reachable at frame 1 (before emission scores).
        end: (S,) final weights p(</s> | h).
        symbol: (S,) long, the CTC symbol each state emits (0 = blank).
        histories: the label history (tuple) of each state, for inspection and tests.
    """

    weights: Tensor
    weights_t: Tensor
    start: Tensor
    end: Tensor
    symbol: Tensor
    histories: list[tuple[int, ...]]
    num_symbols: int

    @classmethod
    def build(cls, lm: LabelNGram, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", sparse: bool | None = None) -> DenominatorGraph:
        """Compose the CTC topology over ``lm.num_labels`` labels with ``lm``."""
        V = lm.num_labels
        ctx = max(lm.order - 1, 1)
        table = lm.log_prob_table(ctx).exp()  # (H_all, V + 1): col 0 = </s>
        # valid histories: <s> only as a prefix
        hists = [h for h in itertools.product(range(V + 1), repeat=ctx)
                 if all(a == 0 or b != 0 for a, b in zip(h, h[1:]))]
        row_of = {h: sum(x * (V + 1) ** (ctx - 1 - i) for i, x in enumerate(h)) for h in hists}
        blank_id = {h: i for i, h in enumerate(hists)}
        label_hists = [h for h in hists if h[-1] != 0]
        label_id = {h: len(hists) + i for i, h in enumerate(label_hists)}
        S = len(hists) + len(label_hists)
        rows, cols, vals = [], [], []

        def add(s: int, t: int, w: float) -> None:
            rows.append(s)
            cols.append(t)
            vals.append(w)

        for h in hists:
            p = table[row_of[h]]
            sources = [(blank_id[h], None)] + ([(label_id[h], h[-1])] if h in label_id else [])
            for s, last in sources:
                add(s, blank_id[h], 1.0)
                if last is not None:
                    add(s, label_id[h], 1.0)  # repeat
                for k in range(1, V + 1):
                    if k != last:
                        add(s, label_id[h[1:] + (k,)], float(p[k]))
        start_state = blank_id[(0,) * ctx]
        start = torch.zeros(S, dtype=torch.float64)
        end = torch.zeros(S, dtype=torch.float64)
        symbol = torch.zeros(S, dtype=torch.long)
        for h in hists:
            end[blank_id[h]] = table[row_of[h], 0]
        for h in label_hists:
            end[label_id[h]] = table[row_of[h], 0]
            symbol[label_id[h]] = h[-1]
        dense = torch.zeros(S, S, dtype=torch.float64)
        dense.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals, dtype=torch.float64),
                         accumulate=True)
        start = dense[start_state].clone()
        use_sparse = S > _SPARSE_STATES if sparse is None else sparse
        if use_sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                weights = dense.to(dtype).to_sparse_csr().to(device)
                weights_t = dense.t().contiguous().to(dtype).to_sparse_csr().to(device)
        else:
            weights = dense.to(dtype).to(device)
            weights_t = dense.t().contiguous().to(dtype).to(device)
        return cls(weights, weights_t, start.to(dtype).to(device), end.to(dtype).to(device), symbol.to(device),
                   hists + label_hists, V + 1)

    @property
    def num_states(self) -> int:
        return int(self.symbol.shape[0])


class _Denominator(torch.autograd.Function):
    """log Z(x) of the denominator graph; backward = posterior symbol occupancies (Eq. 4.23)."""

    @staticmethod
    def forward(ctx, log_probs: Tensor, lengths: Tensor, graph: DenominatorGraph) -> Tensor:
        B, T, C = log_probs.shape
        dt = graph.start.dtype
        lp = log_probs.detach().to(dt)
        valid = torch.arange(T, device=lp.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        lp = lp.masked_fill(~valid.unsqueeze(-1), 0.0)
        shift = lp.amax(-1)  # (B, T)
        emis = (lp - shift.unsqueeze(-1)).exp()[..., graph.symbol]  # (B, T, S)
        sparse = graph.weights.layout != torch.strided
        w, wt = graph.weights, graph.weights_t
        step = (lambda a: (wt @ a.t()).t()) if sparse else (lambda a: a @ w)
        alphas = torch.empty(B, T, graph.num_states, dtype=dt, device=lp.device)
        scales = torch.empty(B, T, dtype=dt, device=lp.device)
        a = graph.start.unsqueeze(0) * emis[:, 0]
        for t in range(T):
            if t:
                a = step(a) * emis[:, t]
            z = a.sum(1, keepdim=True)
            a = a / z
            alphas[:, t] = a
            scales[:, t] = z.squeeze(1)
        last = (lengths - 1).clamp_min(0)
        a_last = alphas[torch.arange(B, device=lp.device), last]  # (B, S)
        scale = (scales.log() + shift).masked_fill(~valid, 0.0).sum(1)
        out = scale + (a_last * graph.end).sum(1).log()
        ctx.save_for_backward(alphas, emis, valid, lengths)
        ctx.graph = graph
        ctx.in_dtype = log_probs.dtype
        return out.to(log_probs.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        alphas, emis, valid, lengths = ctx.saved_tensors
        graph: DenominatorGraph = ctx.graph
        B, T, S = alphas.shape
        sparse = graph.weights.layout != torch.strided
        w, wt = graph.weights, graph.weights_t
        back = (lambda b: (w @ b.t()).t()) if sparse else (lambda b: b @ wt)
        end = graph.end.unsqueeze(0).expand(B, S)
        occ = torch.empty_like(alphas)
        b = end
        last = (lengths - 1).unsqueeze(1)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                rec = back(b * emis[:, t + 1])
                b = torch.where(last > t, rec, end)
                b = b / b.sum(1, keepdim=True)
            g = alphas[:, t] * b
            occ[:, t] = g / g.sum(1, keepdim=True)
        occ = occ.masked_fill(~valid.unsqueeze(-1), 0.0)
        sym = torch.zeros(B, T, graph.num_symbols, dtype=occ.dtype, device=occ.device)
        sym.index_add_(2, graph.symbol, occ)
        return (grad.to(occ.dtype).view(B, 1, 1) * sym).to(ctx.in_dtype), None, None


def check_log_probs(log_probs: Tensor, lengths: Tensor, num_symbols: int | None = None) -> None:
    """Validate (B, T, C) frame log-probabilities and (B,) lengths; raise ``ValueError`` otherwise."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T, C), got shape {tuple(log_probs.shape)}")
    if num_symbols is not None and log_probs.shape[-1] != num_symbols:
        raise ValueError(f"log_probs has {log_probs.shape[-1]} symbols but the graph has {num_symbols} "
                         "(blank + labels)")
    if lengths.dim() != 1 or lengths.shape[0] != log_probs.shape[0]:
        raise ValueError(f"lengths must be (B,) = ({log_probs.shape[0]},), got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > log_probs.shape[1]:
        raise ValueError(f"lengths must be in 1..{log_probs.shape[1]}, got {lengths.tolist()}")
    valid = torch.arange(log_probs.shape[1], device=log_probs.device).unsqueeze(0) < lengths.unsqueeze(1)
    norm = torch.logsumexp(log_probs.detach().float(), -1)[valid]
    if not bool(torch.isfinite(norm).all()) or float((norm.abs()).max()) > 1e-3:
        raise ValueError("log_probs must be per-frame log-probabilities (log_softmax over the symbols): "
                         f"logsumexp over symbols deviates from 0 by up to {float(norm.abs().max()):.3g}")


def ctc_crf_denominator(log_probs: Tensor, lengths: Tensor, graph: DenominatorGraph) -> Tensor:
    """log Z(x) (B,) = log sum_pi exp phi(pi, x) over all CTC paths of each utterance's length.

    Args:
        log_probs: (B, T, C) frame scores log p(pi_t | x) (blank = symbol 0).
        lengths: (B,) frames per utterance (1..T).
        graph: :meth:`DenominatorGraph.build` of the label n-gram.
    """
    check_log_probs(log_probs, lengths, graph.num_symbols)
    return _Denominator.apply(log_probs, lengths.to(log_probs.device), graph)


def ctc_crf_denominator_autograd(log_probs: Tensor, lengths: Tensor, graph: DenominatorGraph) -> Tensor:
    """The same log Z(x) as :func:`ctc_crf_denominator`, differentiated by autograd through the
    recursion (the slow path: a reference for tests and the benchmark)."""
    check_log_probs(log_probs, lengths, graph.num_symbols)
    B, T, C = log_probs.shape
    dt = graph.start.dtype
    lengths = lengths.to(log_probs.device)
    valid = torch.arange(T, device=log_probs.device).unsqueeze(0) < lengths.unsqueeze(1)
    lp = log_probs.to(dt).masked_fill(~valid.unsqueeze(-1), 0.0)
    shift = lp.detach().amax(-1)
    emis = (lp - shift.unsqueeze(-1)).exp()[..., graph.symbol]
    sparse = graph.weights.layout != torch.strided
    a = graph.start.unsqueeze(0) * emis[:, 0]
    log_scale = torch.zeros(B, dtype=dt, device=lp.device)
    out = torch.zeros(B, dtype=dt, device=lp.device)
    for t in range(T):
        if t:
            a = ((graph.weights_t @ a.t()).t() if sparse else a @ graph.weights) * emis[:, t]
        z = a.sum(1, keepdim=True)
        a = a / z
        log_scale = log_scale + torch.where(valid[:, t], z.squeeze(1).log() + shift[:, t], 0.0)
        out = torch.where(lengths - 1 == t, log_scale + (a * graph.end).sum(1).log(), out)
    return out.to(log_probs.dtype)


def ctc_crf_numerator(log_probs: Tensor, lengths: Tensor, targets: list[list[int]] | Tensor,
                      target_lengths: Tensor | None, lm: LabelNGram) -> Tensor:
    """log sum_{pi: B(pi) = y} exp phi(pi, x) = log p_LM(y) + CTC log-likelihood of y (B,).

    ``targets`` are label ids 1..V (padded (B, L) with ``target_lengths``, or a list of lists).
    The CTC part is :func:`torch.nn.functional.ctc_loss`, whose gradient is correct for
    ``log_probs`` that come out of a log_softmax (its native backward folds the softmax in).
    """
    if isinstance(targets, Tensor):
        if target_lengths is None:
            raise ValueError("padded targets need target_lengths")
        seqs = [row[:n].tolist() for row, n in zip(targets, target_lengths.tolist())]
    else:
        seqs = [list(map(int, s)) for s in targets]
    if len(seqs) != log_probs.shape[0]:
        raise ValueError(f"{len(seqs)} transcripts for {log_probs.shape[0]} utterances")
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"transcript {i} is empty")
        if min(s) < 1 or max(s) > lm.num_labels:
            raise ValueError(f"transcript {i}: label ids must be in 1..{lm.num_labels}, got {sorted(set(s))[:10]}")
        need = len(s) + sum(a == b for a, b in zip(s, s[1:]))  # a repeat needs a blank between
        if need > int(lengths[i]):
            raise ValueError(f"utterance {i}: {int(lengths[i])} frames cannot carry its {len(s)} labels "
                             f"(a CTC path needs at least {need} frames)")
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.long, device=log_probs.device)
    tl = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=log_probs.device)
    ctc = F.ctc_loss(log_probs.transpose(0, 1), flat, lengths, tl, blank=0, reduction="none", zero_infinity=False)
    lm_lp = torch.tensor([lm.log_prob(s) for s in seqs], dtype=log_probs.dtype, device=log_probs.device)
    return lm_lp - ctc


class CTCCRFLoss(nn.Module):
    """-log p(y | x) of CTC-CRF (Eq. 4.24) = denominator - numerator, summed or averaged.

    Args:
        lm: the label n-gram (estimated on the training transcripts, fixed).
        reduction: ``"none"`` (B,), ``"sum"``, ``"mean"`` (over utterances) or ``"per_label"``
            (sum / number of target labels).
    """

    def __init__(self, lm: LabelNGram, *, reduction: str = "mean", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if reduction not in ("none", "sum", "mean", "per_label"):
            raise ValueError(f"reduction must be none, sum, mean or per_label, got {reduction!r}")
        self.lm, self.reduction, self.dtype = lm, reduction, dtype
        self._graphs: dict[tuple, DenominatorGraph] = {}

    def graph(self, device: torch.device) -> DenominatorGraph:
        key = (str(device), self.dtype)
        if key not in self._graphs:
            self._graphs[key] = DenominatorGraph.build(self.lm, dtype=self.dtype, device=device)
        return self._graphs[key]

    def forward(self, log_probs: Tensor, lengths: Tensor, targets: list[list[int]] | Tensor,
                target_lengths: Tensor | None = None) -> Tensor:
        den = ctc_crf_denominator(log_probs, lengths, self.graph(log_probs.device))
        num = ctc_crf_numerator(log_probs, lengths, targets, target_lengths, self.lm)
        loss = den - num
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            return loss.mean()
        n = target_lengths.sum() if target_lengths is not None else sum(len(s) for s in targets)
        return loss.sum() / n
