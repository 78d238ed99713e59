"""Teacher forcing, label smoothing and scheduled sampling against hand computations."""

import math

import pytest
import torch

from seqebm.data.batching import sequence_batch
from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM
from seqebm.objectives import ScheduledSamplingLoss, TeacherForcingLoss, teacher_forcing_ratio

V = 7


def _batch():
    return sequence_batch([[4, 5, 6], [5, 4], [6, 6, 6, 4]], bos_id=1, eos_id=2)


def _model(kind="transformer"):
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerLM(V, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.0)
    return RNNLM(V, cell="gru", d_model=16, n_layers=1, dropout=0.0)


def _manual_nll(model, batch):
    """Per-sequence loop: -Σ log softmax(logits)[target] over real positions."""
    total, count = 0.0, 0
    for i in range(len(batch)):
        n = int(batch.mask[i].sum())
        logp = model(batch.inputs[i:i + 1, :n]).log_softmax(-1)[0]
        total -= sum(float(logp[t, batch.targets[i, t]].detach()) for t in range(n))
        count += n
    return total, count


def test_teacher_forcing_equals_per_sequence_loop():
    model, batch = _model(), _batch()
    out = TeacherForcingLoss()(model, batch)
    total, count = _manual_nll(model, batch)
    assert float(out.loss.detach()) == pytest.approx(total / count, rel=1e-5)
    assert float(out.metrics["nll_sum"]) == pytest.approx(total, rel=1e-5)
    assert float(TeacherForcingLoss(reduction="sum")(model, batch).loss.detach()) == pytest.approx(total, rel=1e-5)
    assert TeacherForcingLoss(reduction="none")(model, batch).loss.shape == (3,)


def test_label_smoothing_formula():
    """loss = (1-ε)·NLL + ε·mean_v(-log p_v), averaged over tokens; nll metric unsmoothed."""
    model, batch, eps = _model(), _batch(), 0.2
    out = TeacherForcingLoss(label_smoothing=eps)(model, batch)
    logp = model(batch.inputs).log_softmax(-1).detach()
    m = batch.mask
    nll = -logp.gather(-1, batch.targets[..., None])[..., 0][m]
    uniform = -logp.mean(-1)[m]
    assert float(out.loss.detach()) == pytest.approx(float(((1 - eps) * nll + eps * uniform).mean()), rel=1e-5)
    assert float(out.metrics["nll_sum"]) == pytest.approx(float(nll.sum()), rel=1e-5)


@pytest.mark.parametrize("mode,kind", [("two_pass", "transformer"), ("sequential", "gru"), ("sequential", "transformer")])
def test_scheduled_sampling_with_all_gold_inputs_is_teacher_forcing(mode, kind):
    model, batch = _model(kind), _batch()
    ss = ScheduledSamplingLoss(mode=mode, schedule="constant", k=1.0)
    tf = TeacherForcingLoss()
    a, b = ss(model, batch), tf(model, batch)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-5)
    ga = torch.autograd.grad(a.loss, list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.loss, list(model.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_two_pass_with_no_gold_feeds_argmax_predictions():
    """ε = 0, argmax: inputs 1.. are the first pass's argmax predictions."""
    model, batch = _model(), _batch()
    seen = []
    original = model.forward

    def spy(tokens, **kw):
        seen.append(tokens.clone())
        return original(tokens, **kw)

    model.forward = spy
    ScheduledSamplingLoss(mode="two_pass", schedule="constant", k=0.0, predict="argmax")(model, batch)
    first = original(batch.inputs)
    assert torch.equal(seen[1][:, 0], batch.inputs[:, 0])
    assert torch.equal(seen[1][:, 1:], first[:, :-1].argmax(-1))


def test_sequential_with_no_gold_feeds_model_predictions():
    """ε = 0, argmax, sequential: equals greedy decoding's inputs."""
    model, batch = _model("gru"), _batch()
    out = ScheduledSamplingLoss(mode="sequential", schedule="constant", k=0.0, predict="argmax")(model, batch)
    from seqebm.sampling.basic import generate

    greedy = generate(model, batch.inputs[:, :1], batch.inputs.shape[1] - 1, greedy=True)
    logits = model(torch.cat([batch.inputs[:, :1], greedy], 1))
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
    assert float(out.loss.detach()) == pytest.approx(float(nll[batch.mask].mean()), rel=1e-5)


def test_schedules():
    assert teacher_forcing_ratio(0, "linear", 100) == 1.0
    assert teacher_forcing_ratio(50, "linear", 100) == pytest.approx(0.5)
    assert teacher_forcing_ratio(200, "linear", 100, 0.1) == pytest.approx(0.1)
    assert teacher_forcing_ratio(3, "exponential", 0.5) == pytest.approx(0.125)
    k = 10.0
    assert teacher_forcing_ratio(20, "inverse_sigmoid", k) == pytest.approx(k / (k + math.exp(2)))
    with pytest.raises(ValueError, match="schedule must be one of"):
        teacher_forcing_ratio(0, "cubic", 1.0)
    with pytest.raises(ValueError, match="exponential schedule needs 0 < k < 1"):
        ScheduledSamplingLoss(schedule="exponential", k=2.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        TeacherForcingLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        TeacherForcingLoss(reduction="avg")
    with pytest.raises(ValueError, match="mode must be"):
        ScheduledSamplingLoss(mode="parallel")
