"""Acoustic models: shapes, subsampled lengths, batching invariance, losses plug in."""

import pytest
import torch

from seqebm.models.asr import AcousticEncoder, CTCAcousticModel, RNNTAcousticModel, subsampled_lengths
from seqebm.structured.rnnt import rnnt_loss


@pytest.mark.parametrize("arch", ["blstm", "conformer"])
def test_encoder_shapes_lengths_and_padding_invariance(arch):
    """An utterance's encodings do not depend on the padding of the batch it sits in: the convolutions
    have no time padding, the BiLSTM is packed, the Conformer masks attention and its conv input."""
    torch.manual_seed(0)
    enc = AcousticEncoder(20, d_model=16, num_layers=2, arch=arch, n_heads=2, dropout=0.0).eval()
    x = torch.randn(2, 50, 20)
    lengths = torch.tensor([50, 31])
    h, out = enc(x, lengths)
    assert out.tolist() == [11, 7] == subsampled_lengths(lengths).tolist()
    assert h.shape == (2, 11, 16) and h[1, 7:].abs().max() == 0
    alone, _ = enc(x[1:, :31], lengths[1:])
    if arch == "blstm":
        torch.testing.assert_close(h[1, :7], alone[0], rtol=1e-5, atol=1e-6)
    else:  # attention is masked; the depthwise conv sees zeros past the end in both cases
        torch.testing.assert_close(h[1, :7], alone[0], rtol=1e-4, atol=1e-5)


def test_ctc_and_rnnt_models_produce_normalised_scores_and_train():
    torch.manual_seed(0)
    x, lengths = torch.randn(2, 40, 20), torch.tensor([40, 30])
    ctc = CTCAcousticModel(AcousticEncoder(20, d_model=16, num_layers=1, dropout=0.0), 5)
    lp, out = ctc(x, lengths)
    assert lp.shape == (2, 9, 5) and torch.allclose(lp.exp().sum(-1), torch.ones(2, 9))
    rnnt = RNNTAcousticModel(AcousticEncoder(20, d_model=16, num_layers=1, dropout=0.0), 5, pred_dim=8,
                             joint_dim=8, dropout=0.0)
    targets = torch.tensor([[1, 2, 3], [4, 4, 0]])
    jl, out = rnnt(x, lengths, targets)
    assert jl.shape == (2, 9, 4, 5)
    loss = rnnt_loss(jl, targets, out, torch.tensor([3, 2]))
    loss.backward()
    assert rnnt.g_proj.weight.grad.abs().sum() > 0 and torch.isfinite(loss)


def test_too_short_input_is_refused():
    enc = AcousticEncoder(20, d_model=16, num_layers=1)
    with pytest.raises(ValueError, match="6 frames is too short for 4x subsampling"):
        enc(torch.randn(2, 10, 20), torch.tensor([10, 6]))
    with pytest.raises(ValueError, match="encoder arch must be one of"):
        AcousticEncoder(20, arch="rnn")
    with pytest.raises(ValueError, match="num_features=6 is too small"):
        AcousticEncoder(6)


def test_rnnt_decoding_step_batches_the_prediction_network_exactly():
    """The decoder's cached, batched prediction-network steps equal running each prefix from scratch."""
    from seqebm.training.asr import _rnnt_step

    torch.manual_seed(0)
    net = RNNTAcousticModel(AcousticEncoder(20, d_model=16, num_layers=1, dropout=0.0), 5, pred_dim=8,
                            joint_dim=8, dropout=0.0).eval()
    f = torch.randn(4, net.encoder.out_dim)
    step = _rnnt_step(net, f)
    calls = [[()], [(1,), (2,), (3,)], [(1, 4), (2, 2), (3, 1), (1,)], [(2, 2, 4, 1)], [(), (1, 4)]]
    with torch.no_grad():
        for t, prefixes in enumerate(calls):
            got = step(t % 4, prefixes)
            for n, p in enumerate(prefixes):
                g, _ = net.predict(torch.tensor([[0, *p]]), None)
                want = net.joint(f[t % 4].unsqueeze(0), g[:, -1])
                torch.testing.assert_close(got[n], want[0], rtol=1e-5, atol=1e-6)
