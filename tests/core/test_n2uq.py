"""N2UQ comparison quantizer (DAQ-SPEC §8): uniform output levels, learned thresholds, G-STE."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import daq_core as dc


def _piecewise_reference(x, start, widths, scale):
    """Autograd over the piecewise-linear g(x), rounded straight-through: the G-STE by definition."""
    n = widths.numel()
    b = start.reshape(1) + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
    seg = torch.bucketize(x.detach(), b.detach(), right=True)
    inside = (seg >= 1) & (seg <= n)
    idx = (seg - 1).clamp(0, n - 1)
    g = torch.where(inside, idx + (x - b[idx]) / widths[idx], (seg > n).to(x.dtype) * n)
    return scale * (2 / n) * (g + (torch.round(g) - g).detach())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.floats(-1, 1), st.integers(0, 2**31 - 1))
def test_forward_uniform_levels_and_gste_matches_formula(bits, start, seed):
    n = 2**bits - 1
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(400, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    s = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y = dc.n2uq_activation(x, s, a, scale, bits=bits)
    levels = y.detach() / (0.8 * 2 / n)
    assert torch.allclose(levels, levels.round()) and levels.min() >= 0 and levels.max() <= n
    gy = torch.randn(400, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, [x, s, a, scale], gy)
    # x: (2/n)/a_i * scale inside segment i, 0 outside [d_0, d_n]
    bounds = start + torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(a.detach(), 0)])
    seg = torch.bucketize(x.detach(), bounds, right=True)
    inside = (seg >= 1) & (seg <= n)
    expected_x = torch.where(inside, gy * 0.8 * (2 / n) / a.detach()[(seg - 1).clamp(0, n - 1)], 0.0)
    assert torch.allclose(grads[0], expected_x)
    ref = torch.autograd.grad(_piecewise_reference(x, s, a, scale), [x, s, a, scale], gy)
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want)


def test_forward_counts_midpoints_exceeded():
    s = torch.tensor(0.0)
    a = torch.tensor([0.2, 0.4, 1.0])
    mids = dc.n2uq_thresholds(s, a)
    assert torch.allclose(mids, torch.tensor([0.1, 0.4, 1.1]))
    x = torch.tensor([0.05, 0.15, 0.39, 0.41, 1.0, 1.2, 9.0])
    y = dc.n2uq_activation(x, s, a, 1.5)
    assert torch.allclose(y / (1.5 * 2 / 3), torch.tensor([0.0, 1, 1, 2, 2, 3, 3]))


def test_thresholds_stay_monotone_and_levels_uniform_after_training():
    torch.manual_seed(0)
    x = torch.randn(2048).abs() * 1.5
    target = torch.sqrt(x)                   # a non-uniform mapping N2UQ can fit with its thresholds
    s = torch.tensor(0.0, requires_grad=True)
    a = dc.n2uq_init_widths(2).requires_grad_()
    scale = torch.tensor(1.0, requires_grad=True)
    opt = torch.optim.Adam([s, a, scale], lr=0.05)
    first = None
    for _ in range(60):
        loss = (dc.n2uq_activation(x, s, a, scale) - target).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    thresholds = dc.n2uq_thresholds(s, a).detach()
    assert (thresholds[1:] > thresholds[:-1]).all()
    assert loss.item() < 0.5 * first
    y = dc.n2uq_activation(x, s, a, scale).detach() / (scale.detach() * 2 / 3)
    assert torch.allclose(y, y.round(), atol=1e-5)
    assert not torch.allclose(a.detach(), dc.n2uq_init_widths(2)), "widths were learned"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_quantizer_grid_alpha_and_ste(bits):
    n = 2**bits - 1
    w = (torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 1, 8).view(-1, 1, 1, 1)).requires_grad_()
    y = dc.n2uq_weight(w, bits, ch_axis=0)
    alpha = (n / 2 ** (bits - 1)) * w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(dc.n2uq_weight_alpha(w, bits), alpha)
    codes = y.detach() / alpha * n
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert (codes.round().remainder(2) == 1).all() and codes.abs().max() <= n + 1e-4
    y.backward(torch.ones_like(y))
    assert torch.equal(w.grad, (w.detach().abs() <= alpha).float())


def test_n2uq_bad_input():
    with pytest.raises(ValueError, match="2\\^b - 1"):
        dc.n2uq_activation(torch.randn(3), 0.0, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="bits=3"):
        dc.n2uq_activation(torch.randn(3), 0.0, torch.ones(3), 1.0, bits=3)
    with pytest.raises(TypeError, match="x must be a floating"):
        dc.n2uq_activation(torch.arange(3), 0.0, torch.ones(3), 1.0)
