"""The training loop: exact resumption, accumulation == big batch, schedules, early stopping."""

import json

import pytest
import torch

from seqebm.data.batching import PackedLMSource, pack_lm
from seqebm.models.transformer import TransformerLM
from seqebm.objectives import ScheduledSamplingLoss, TeacherForcingLoss
from seqebm.training.config import OptimConfig, TrainerConfig, lr_at
from seqebm.training.trainer import CHECKPOINT, Trainer

V = 17


def _source(seed=0, batch_size=8):
    g = torch.Generator().manual_seed(123)
    docs = []  # counting sequences mod 13 (learnable: the next token is nearly deterministic)
    for _ in range(60):
        start, n = int(torch.randint(0, 13, (1,), generator=g)), int(torch.randint(3, 30, (1,), generator=g))
        docs.append([4 + (start + i) % 13 for i in range(n)])
    rows, lengths = pack_lm(docs, 16, bos_id=1, eos_id=2)
    return PackedLMSource(rows, lengths, batch_size, seed=seed)


def _model():
    torch.manual_seed(0)
    return TransformerLM(V, d_model=32, n_layers=2, n_heads=2, max_len=32, dropout=0.1)


def _trainer(tmp_path, name, objective=None, callbacks=None, **train_kw):
    kw = dict(max_steps=12, eval_every=4, log_every=2, checkpoint_every=5, seed=3, progress=False)
    kw.update(train_kw)
    return Trainer(_model(), objective or TeacherForcingLoss(), _source(), optim=OptimConfig(lr=3e-3, warmup_steps=3),
                   train=TrainerConfig(**kw), run_dir=tmp_path / name,
                   evaluate=lambda m: {"loss": 1.0}, callbacks=callbacks)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", [TeacherForcingLoss, lambda: ScheduledSamplingLoss(k=5.0)])
def test_kill_and_resume_is_bit_exact(tmp_path, objective):
    """Dropout, sampling and data order all depend on saved state; resuming must replay them."""
    full = _trainer(tmp_path, "full", objective())
    full.fit()

    def kill(tr):
        if tr.state["step"] == 7:  # after the checkpoint at step 5 and the log at step 6
            raise KeyboardInterrupt

    killed = _trainer(tmp_path, "run", objective(), callbacks=[kill])
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert (tmp_path / "run" / CHECKPOINT).exists()
    resumed = _trainer(tmp_path, "run", objective())
    torch.manual_seed(999)  # the resumed run must not depend on the ambient RNG
    resumed.fit(resume=True)
    assert resumed.state["step"] == 12
    a, b = _params(full.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what the killed run logged after its last checkpoint (step 5) is dropped and redone: one curve

    def curve(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert curve("run") == curve("full")


def test_resume_detects_divergence(tmp_path):
    """Sanity check of the test above: a different seed gives different weights."""
    a = _trainer(tmp_path, "a")
    a.fit()
    b = _trainer(tmp_path, "b", seed=4)
    b.fit()
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def _captured_grads(tmp_path, name, accum, world=None):
    torch.manual_seed(0)
    model = TransformerLM(V, d_model=32, n_layers=2, n_heads=2, max_len=32, dropout=0.0)
    src = _source()
    g = torch.Generator().manual_seed(5)
    src.lengths[:] = torch.randint(5, 17, src.lengths.shape, generator=g)  # uneven token counts per row
    tr = Trainer(model, TeacherForcingLoss(), src, optim=OptimConfig(lr=1e-2, warmup_steps=0, clip_norm=None),
                 train=TrainerConfig(max_steps=1, grad_accum=accum, progress=False), run_dir=tmp_path / name)
    grads = []
    tr.optimizer.step = lambda: grads.append([p.grad.clone() for p in model.parameters()])
    tr.fit()
    return grads[0]


def test_grad_accumulation_equals_big_batch(tmp_path):
    """k micro-batches weighted by their token share give the one-big-batch gradient."""
    one = _captured_grads(tmp_path, "a1", 1)
    four = _captured_grads(tmp_path, "a4", 4)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_training_reduces_loss_and_logs(tmp_path):
    tr = _trainer(tmp_path, "log", max_steps=30)
    tr.fit()
    lines = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert {"loss", "nll", "ppl", "lr", "tokens_per_s"} <= set(train[0])
    assert any(r["split"] == "valid" for r in lines)
    assert (tmp_path / "log" / "model.safetensors").exists()


def test_early_stopping(tmp_path):
    tr = _trainer(tmp_path, "es", max_steps=100, eval_every=2, patience=2)
    tr.fit()  # the constant validation loss never improves after the first evaluation
    assert tr.state["step"] == 6 and tr.state.get("stopped_early")


def test_lr_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    inv = OptimConfig(lr=1.0, warmup_steps=4, schedule="inverse_sqrt")
    assert lr_at(15, inv, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        OptimConfig(schedule="step")
