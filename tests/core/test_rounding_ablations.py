"""The paper's ablations of DASR (Tables 6-7): DAQ with an STE gradient, fixed-temperature soft argmax."""

import math

import pytest
import torch

import daq_core
from daq_core import daq_fake_quantize, dasr_gradient, soft_assignment


def _grads(rounding, beta=None, bits=3):
    torch.manual_seed(0)
    x = (torch.rand(2000, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    lower = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    upper = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    n = 2 ** bits - 1
    y = daq_fake_quantize(x, lower, upper, bits, lower, (upper - lower) / n, rounding=rounding, beta=beta)
    y.backward(torch.ones_like(y))
    return x, y, lower, upper, n


def test_ste_forward_rounds_and_gradient_is_one_inside():
    x, y, lower, upper, n = _grads("ste")
    _, y_dasr, *_ = _grads("dasr")
    assert torch.equal(y, y_dasr)                              # same forward as DAQ: rounding
    inside = (x.detach() >= 0) & (x.detach() <= 1)
    # dy/dx = Δ · dQ/dt · dt/dx = Δ · 1 · 1/Δ = 1 inside [l, u], 0 outside
    assert torch.allclose(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert torch.all(x.grad[~inside] == 0)
    # and differs from DASR's gradient, which is not constant
    xd = x.detach()
    t = (xd.clamp(0, 1) * n)
    assert not torch.allclose(dasr_gradient(t[inside]), torch.ones_like(t[inside]))


def test_soft_forward_is_the_fixed_temperature_soft_argmax_and_not_rounding():
    x, y, lower, upper, n = _grads("soft", beta=4.0)
    t = (x.detach().clamp(0, 1) * n)
    expected = soft_assignment(t, beta=4.0) / n
    assert torch.allclose(y.detach(), expected, atol=1e-12)
    gap = n * (y.detach() - torch.round(t) / n).abs().max().item()
    assert gap > 0.1                                            # the quantizer gap of a fixed β (in steps)
    # larger β: smaller gap (closer to rounding)
    _, y24, *_ = _grads("soft", beta=24.0)
    assert (y24.detach() - torch.round(t) / n).abs().mean() < (y.detach() - torch.round(t) / n).abs().mean()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rounding,beta,match", [("round", None, "rounding must be one of"),
                                                 ("soft", None, "needs a fixed temperature"),
                                                 ("dasr", 4.0, "beta applies to rounding='soft' only"),
                                                 ("soft", -1.0, "beta")])
def test_bad_rounding_arguments(rounding, beta, match):
    with pytest.raises(ValueError, match=match):
        daq_fake_quantize(torch.randn(4), 0.0, 1.0, 2, 0.0, 1.0, rounding=rounding, beta=beta)


def test_weight_soft_per_channel_uses_channel_bounds():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    lower, upper, scale = -torch.rand(4) - 1, torch.rand(4) + 1, torch.rand(4) + 0.5
    y = daq_core.fake_quantize_weight(w, lower, upper, scale, 2, ch_axis=0, rounding="soft", beta=24.0,
                                      standardize_input=False)
    t = ((w - lower[:, None]) / ((upper - lower)[:, None] / 3)).clamp(0, 3)
    expected = scale[:, None] * (2 * soft_assignment(t, beta=24.0) - 3) / 3
    assert torch.allclose(y, expected, atol=1e-6)
