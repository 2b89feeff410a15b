"""BatchNormLSTM (Cooijmans et al., 2016): per-step statistics in training, running statistics per
step for evaluation, padding out of every statistic, and the three fixes of issue 14: an empty batch
leaves the running statistics alone, lengths whose maximum is below T give finite gradients and
statistics, and a single-tensor hx is a clear TypeError (as for nn.LSTMCell)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from layernorm import BatchNormLSTM

D64 = torch.float64


def test_batchnorm_lstm_train_eval_and_running_stats_per_step():
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, num_layers=2, max_length=5, momentum=0.5, dtype=D64)
    assert torch.all(m.bn_ih_weight_l0 == 0.1) and torch.all(m.bn_cell_bias_l1 == 0)
    x = torch.randn(3, 6, 3, dtype=D64) * 2 + 1
    out, (h, c) = m(x)
    assert out.shape == (3, 6, 4) and h.shape == (2, 6, 4)
    xw = x @ m.weight_ih_l0.T                                  # (T, B, 4H)
    torch.testing.assert_close(m.running_mean_ih_l0[:3], 0.5 * xw.mean(1))
    torch.testing.assert_close(m.running_var_ih_l0[:3], 0.5 + 0.5 * xw.var(1, unbiased=True))
    assert torch.all(m.running_mean_ih_l0[3:] == 0) and torch.all(m.running_var_cell_l1[3:] == 1)
    # per-step statistics: normalizing step 0 must use step 0's batch statistics, not a global one
    ref0 = (xw[0] - xw[0].mean(0)) / torch.sqrt(xw[0].var(0, unbiased=False) + m.eps) * 0.1
    assert not torch.allclose(ref0, (xw[0] - xw.mean((0, 1))) / torch.sqrt(xw.var((0, 1), unbiased=False) + m.eps) * 0.1)
    # train output does not depend on running stats; eval output does
    m.eval()
    e1 = m(x)[0]
    with torch.no_grad():
        m.running_mean_hh_l0.add_(1.0)
    e2 = m(x)[0]
    assert not torch.allclose(e1, e2)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running")}
    m(x)
    for k, v in before.items():  # eval does not update
        assert torch.equal(m.state_dict()[k], v)
    assert {f"running_{s}_{p}_l{k}" for s in ("mean", "var") for p in ("ih", "hh", "cell") for k in (0, 1)} <= set(m.state_dict())


def test_batchnorm_lstm_steps_beyond_max_length_reuse_last():
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, max_length=2, dtype=D64)
    with torch.no_grad():
        for name, buf in m.named_buffers():
            buf.copy_(torch.rand_like(buf) + 0.5)
    m.eval()
    x = torch.randn(5, 2, 3, dtype=D64)
    out = m(x)[0]
    # rewrite slot 1 (the last) -> steps 1..4 change, step 0 does not
    with torch.no_grad():
        m.running_mean_ih_l0[1].add_(0.7)
    out2 = m(x)[0]
    torch.testing.assert_close(out2[0], out[0])
    assert all(not torch.allclose(out2[t], out[t]) for t in range(1, 5))


def test_batchnorm_lstm_packed_statistics_ignore_padding():
    torch.manual_seed(0)
    lengths = torch.tensor([4, 2, 3])
    x = torch.randn(4, 3, 3, dtype=D64)
    x_garbage = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x_garbage[n:, b] = 1e3 * torch.randn(4 - n, 3, dtype=D64)
    outs = []
    for inp, kw in ((pack_padded_sequence(x, lengths, enforce_sorted=False), {}),
                    (x_garbage, {"lengths": lengths})):
        torch.manual_seed(1)
        m = BatchNormLSTM(3, 4, max_length=4, dtype=D64)
        out, (h, c) = m(inp, **kw)
        out = pad_packed_sequence(out)[0] if not torch.is_tensor(out) else out
        outs.append((out, h, c, m.state_dict()))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(a, b)
    for k in outs[0][3]:
        torch.testing.assert_close(outs[0][3][k], outs[1][3][k])
    # step 2's statistics come from the 2 sequences still running (b = 0, 2)
    m = BatchNormLSTM(3, 4, max_length=4, momentum=1.0, dtype=D64)
    m(x_garbage, lengths=lengths)
    xw = x[2, [0, 2]] @ m.weight_ih_l0.T
    torch.testing.assert_close(m.running_mean_ih_l0[2], xw.mean(0))
    torch.testing.assert_close(m.running_var_ih_l0[2], xw.var(0, unbiased=True))
    # padded outputs are zero and h_n is each sequence's last state
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(outs[1][0][n:, b] == 0)
        torch.testing.assert_close(outs[1][1][0, b], outs[1][0][n - 1, b])


def test_batchnorm_lstm_batch_first_and_grad():
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, batch_first=True)
    x = torch.randn(5, 7, 3, requires_grad=True)
    out, (h, c) = m(x)
    assert out.shape == (5, 7, 4)
    out.sum().backward()
    assert x.grad is not None and m.bn_hh_weight_l0.grad is not None


def test_empty_batch_leaves_running_statistics_alone():
    """nn.BatchNorm1d leaves its running statistics alone for a batch of 0; so does every step here."""
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, num_layers=2, max_length=5)
    m(torch.randn(5, 6, 3))  # some real statistics first
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running")}
    out, (h, c) = m(torch.randn(5, 0, 3))
    assert out.shape == (5, 0, 4) and h.shape == (2, 0, 4)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    m.eval()
    assert torch.isfinite(m(torch.randn(5, 2, 3))[0]).all()


@pytest.mark.parametrize("packed_like", [False, True])
def test_lengths_shorter_than_the_input_give_finite_gradients_and_statistics(packed_like):
    """max(lengths) < T: steps past every sequence's end have no running row; they must not divide 0 by 0."""
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, num_layers=2, max_length=8, dtype=D64)
    x = torch.randn(8, 3, 3, dtype=D64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4]) if not packed_like else torch.tensor([5, 0, 4])
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running")}
    out, (h, c) = m(x, lengths=lengths)
    (out.square().sum() + h.sum() + c.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for k, v in m.state_dict().items():
        assert torch.isfinite(v).all(), k
        if k.startswith("running"):
            assert torch.equal(v[5:], before[k][5:]), k  # no sequence ran at steps 5..7
            assert not torch.equal(v[:5], before[k][:5]), k
    assert torch.all(out[5:] == 0)
    # the padded call equals the same sequences cut to their longest length
    m2 = BatchNormLSTM(3, 4, num_layers=2, max_length=8, dtype=D64)
    m2.load_state_dict({k: v for k, v in before.items()}, strict=False)
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("running")}, strict=False)
    out2, (h2, c2) = m2(x.detach()[:5], lengths=lengths)
    torch.testing.assert_close(out2, out.detach()[:5])
    torch.testing.assert_close(h2, h.detach())


def test_single_tensor_hx_is_a_clear_error():
    m = BatchNormLSTM(3, 4)
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors.*single 3-D Tensor"):
        m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))
    out, (h, c) = m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))  # the pair works
    assert h.shape == (1, 2, 4)


def test_lengths_rules():
    m = BatchNormLSTM(3, 4)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 5\]"):
        m(torch.randn(5, 2, 3), lengths=torch.tensor([6, 1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        m(torch.randn(5, 2, 3), lengths=torch.tensor([5, 1, 1]))
    with pytest.raises(ValueError, match="pass lengths only with a padded tensor"):
        m(pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 2])), lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        BatchNormLSTM(10, 20, max_length=0)
    out, (h, c) = m(torch.randn(5, 2, 3), lengths=torch.tensor([5, 0]))  # a length of 0 keeps h0, c0
    assert torch.all(out[:, 1] == 0) and torch.all(h[0, 1] == 0) and torch.all(c[0, 1] == 0)
