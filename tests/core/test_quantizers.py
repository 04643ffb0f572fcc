"""DAQ quantizer functions (Eqs. 1-3): grids, gradients, per-channel, dtypes, errors, cost."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import daq_core as dc

bits_st = st.integers(min_value=1, max_value=8)


def _reference(x, lower, upper, bits, out_offset, out_step, gamma=2.0, sigma=1.0, ch_axis=None):
    """Autograd composition of the separate pieces: Eq. 1 → DASR → affine output map."""
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    rs = (lambda p: p.reshape(shape)) if ch_axis is not None else (lambda p: p)
    t = dc.normalize(x, lower, upper, bits, ch_axis=ch_axis)
    return rs(out_offset) + rs(out_step) * dc.dasr(t, gamma, sigma)


@settings(max_examples=60, deadline=None)
@given(bits_st, st.floats(-3, 0.5), st.floats(0.1, 4.0), st.floats(0.5, 3.0), st.integers(0, 2**31 - 1))
def test_fused_gradients_match_autograd_of_the_pieces(bits, lower, width, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(257, generator=g, dtype=torch.float64) * 2).requires_grad_()
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for v in (lower, lower + width, 0.3, 0.7)]
    grad_y = torch.randn(257, generator=g, dtype=torch.float64)
    y = dc.daq_fake_quantize(x, *params[:2], bits, *params[2:], sigma=sigma)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    xr = x.detach().clone().requires_grad_()
    pr = [p.detach().clone().requires_grad_() for p in params]
    yr = _reference(xr, *pr[:2], bits, *pr[2:], sigma=sigma)
    grads_r = torch.autograd.grad(yr, [xr, *pr], grad_y)
    assert torch.equal(y, yr)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_per_channel_gradients_match_reference():
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    lo = torch.linspace(-2, -0.5, 6, dtype=torch.float64, requires_grad=True)
    hi = torch.linspace(0.5, 2, 6, dtype=torch.float64, requires_grad=True)
    off = torch.full((6,), -0.2, dtype=torch.float64, requires_grad=True)
    step = torch.linspace(0.1, 0.3, 6, dtype=torch.float64, requires_grad=True)
    y = dc.daq_fake_quantize(x, lo, hi, 3, off, step, ch_axis=0)
    yr = _reference(x, lo, hi, 3, off, step, ch_axis=0)
    assert torch.equal(y, yr)
    gy = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(y, [x, lo, hi, off, step], gy),
                    torch.autograd.grad(yr, [x, lo, hi, off, step], gy)):
        assert torch.allclose(a, b)


def test_normalisation_has_zero_gradient_outside_bounds():
    x = torch.tensor([-5.0, -1.0, 0.3, 1.0, 7.0], requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(1.0, requires_grad=True)
    t = dc.normalize(x, lo, hi, bits=3)
    t.backward(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))   # only clipped elements carry gradient
    assert x.grad[[0, 4]].abs().sum() == 0 and lo.grad == 0 and hi.grad == 0


def test_clipped_elements_do_not_move_bounds_through_dasr():
    """Through t (Eq. 1) clipped inputs give no gradient; weights only see the output map."""
    w = torch.tensor([-50.0, 50.0])  # standardised: ±1, outside [-0.5, 0.5]
    lo = torch.tensor(-0.5, requires_grad=True)
    hi = torch.tensor(0.5, requires_grad=True)
    y = dc.fake_quantize_weight(w, lo, hi, 1.0, bits=2)
    y.sum().backward()
    assert lo.grad == 0 and hi.grad == 0


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_weight_grid_is_symmetric_without_zero(bits, ch_axis):
    n = 2**bits - 1
    w = torch.randn(8, 16, 3, 3) * torch.linspace(0.1, 3, 8).view(-1, 1, 1, 1)
    shape = (8,) if ch_axis == 0 else ()
    lo, hi = torch.full(shape, -2.5), torch.full(shape, 2.5)
    scale = torch.full(shape, 0.7)
    y = dc.fake_quantize_weight(w, lo, hi, scale, bits, ch_axis=ch_axis)
    codes = y / (0.7 / n)
    ints = codes.round()
    assert torch.allclose(codes, ints, atol=1e-4)
    assert (ints.remainder(2) == 1).all(), "DAQ weight codes are odd integers (no zero level)"
    assert ints.abs().max() <= n
    assert torch.equal(ints.int(), dc.weight_integers(w, lo, hi, bits, ch_axis=ch_axis))
    assert len(ints.unique()) <= 2**bits
    if bits == 1:
        assert set(ints.unique().tolist()) == {-1.0, 1.0}


@settings(max_examples=50, deadline=None)
@given(bits_st, st.floats(-4, 1), st.floats(0.05, 6), st.integers(0, 2**31 - 1))
def test_activation_grid_levels_in_bounds(bits, lower, width, seed):
    n = 2**bits - 1
    upper = lower + width
    x = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    y = dc.fake_quantize_activation(x, lower, upper, bits)
    step = width / n
    codes = (y - lower) / step
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    assert codes.round().min() >= 0 and codes.round().max() <= n
    assert torch.equal(codes.round().int(), dc.activation_integers(x, lower, upper, bits))


@settings(max_examples=50, deadline=None)
@given(bits_st, st.integers(0, 2**31 - 1))
def test_forward_is_rounding_of_normalised_input(bits, seed):
    x = torch.randn(300, generator=torch.Generator().manual_seed(seed))
    n = 2**bits - 1
    y = dc.daq_fake_quantize(x, -1.0, 1.5, bits, 0.0, 1.0)
    t = ((x - (-1.0)) / (2.5 / n)).clamp(0, n)
    assert torch.equal(y, torch.round(t))


def test_constant_weight_has_no_nan():
    w = torch.full((4, 3, 3, 3), 0.25, requires_grad=True)
    for ch_axis in (None, 0):
        shape = (4,) if ch_axis == 0 else ()
        lo = torch.full(shape, -3.0, requires_grad=True)
        hi = torch.full(shape, 3.0, requires_grad=True)
        s = dc.init_weight_scale(w, lo, hi, 4, ch_axis=ch_axis).requires_grad_()
        y = dc.fake_quantize_weight(w, lo, hi, s, 4, ch_axis=ch_axis)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        assert all(torch.isfinite(p.grad).all() for p in (w, lo, hi, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = (torch.randn(64, 8) * 2).to(dtype).requires_grad_()
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    y = dc.fake_quantize_activation(x, lo, hi, 4)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(lo.grad) and torch.isfinite(hi.grad)
    ref = dc.fake_quantize_activation(x.detach().float(), -1.0, 2.0, 4)
    assert torch.allclose(y.float(), ref, atol=1e-2 if dtype != torch.float32 else 0)
    w = torch.randn(4, 4, 3, 3).to(dtype).requires_grad_()
    wq = dc.fake_quantize_weight(w, -3.0, 3.0, 0.5, 3)
    wq.float().sum().backward()
    assert wq.dtype == dtype and torch.isfinite(w.grad.float()).all()


def test_integer_aligned_lower_bound_gives_integer_zero_point():
    lo = torch.tensor(-0.37, requires_grad=True)
    hi = torch.tensor(1.2)
    aligned = dc.integer_aligned_lower_bound(lo, hi, 4)
    step = (hi - lo.detach()) / 15
    zp = -aligned.detach() / step
    assert torch.allclose(zp, zp.round(), atol=1e-5)
    aligned.backward()
    assert lo.grad == 1.0  # straight-through


def test_least_squares_scale_beats_unit_scale():
    w = torch.randn(16, 8, 3, 3) * 0.05
    s = dc.init_weight_scale(w, -3.0, 3.0, 4, ch_axis=None)
    err_ls = (dc.fake_quantize_weight(w, -3.0, 3.0, s, 4) - w).pow(2).mean()
    err_1 = (dc.fake_quantize_weight(w, -3.0, 3.0, 1.0, 4) - w).pow(2).mean()
    assert err_ls < 0.05 * err_1
    assert err_ls < 0.05 * w.pow(2).mean()   # 4-bit: within a few percent of the weight energy


def test_activation_bound_initialisation():
    relu_out = torch.relu(torch.randn(1000))
    lo, hi = dc.init_activation_bounds(relu_out, signed=False)
    assert lo.item() == 0 and hi.item() == pytest.approx(3 * relu_out.std(unbiased=False).item(), rel=1e-5)
    lo, hi = dc.init_activation_bounds(torch.randn(1000), signed=True)
    assert lo.item() == pytest.approx(-hi.item()) and hi.item() > 2
    lo, hi = dc.init_activation_bounds(torch.zeros(10), signed=False)
    assert lo < hi


@pytest.mark.parametrize("call, exc, word", [
    (lambda: dc.fake_quantize_activation(torch.randn(3), 0.0, 1.0, 0), ValueError, "bits=0"),
    (lambda: dc.fake_quantize_activation(torch.randn(3), 0.0, 1.0, 9), ValueError, "bits=9"),
    (lambda: dc.fake_quantize_activation(torch.randn(3), 0.0, 1.0, 2.5), TypeError, "bits"),
    (lambda: dc.fake_quantize_activation(torch.randn(3), 1.0, 1.0, 4), ValueError, "lower must be < upper"),
    (lambda: dc.fake_quantize_activation(torch.randn(3), 0.0, 1.0, 4, gamma=0), ValueError, "gamma"),
    (lambda: dc.fake_quantize_activation(torch.randn(3), 0.0, 1.0, 4, sigma=-1), ValueError, "sigma"),
    (lambda: dc.fake_quantize_activation(torch.arange(3), 0.0, 1.0, 4), TypeError, "x must be a floating"),
    (lambda: dc.fake_quantize_weight(torch.randn(4, 2), torch.zeros(3), torch.ones(3), 1.0, 2, ch_axis=0),
     ValueError, "channels"),
    (lambda: dc.fake_quantize_weight(torch.randn(4, 2), torch.zeros(4) - 1, torch.ones(4), 1.0, 2),
     ValueError, "ch_axis"),
    (lambda: dc.check_bits(8, "weight_bits", dc.MAX_INT8_WEIGHT_BITS), ValueError, "int8"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_memory_saved_for_backward_is_at_most_one_input():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(8, 32, 28, 28, requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    h = x * 1.0   # a non-leaf input, as in a network
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dc.fake_quantize_activation(h, lo, hi, 4)
    big = [t for t in saved if t.numel() > 1]
    assert sum(t.numel() for t in big) <= x.numel()
    assert all(t.data_ptr() == h.data_ptr() for t in big), "the only big saved tensor is the input itself"


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    x = (torch.randn(4, 16, 32, 32) * 2).requires_grad_()
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    gy = torch.randn_like(x)
    dc.use_compiled_kernels(False)
    y_e = dc.fake_quantize_activation(x, lo, hi, 3)
    g_e = torch.autograd.grad(y_e, [x, lo, hi], gy)
    assert dc.use_compiled_kernels(True) and dc.compiled_kernels_enabled()
    from torch._dynamo.utils import counters
    try:
        y_c = dc.fake_quantize_activation(x, lo, hi, 3)
        g_c = torch.autograd.grad(y_c, [x, lo, hi], gy)
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():   # first batch / eval: same kernels, no new compilation
            y_n = dc.fake_quantize_activation(x.detach(), lo.detach(), hi.detach(), 3)
        recompiled = counters["stats"]["unique_graphs"] - graphs
    finally:
        dc.use_compiled_kernels(False)
    assert recompiled == 0, "requires_grad of the inputs must not trigger a recompilation"
    assert torch.equal(y_e, y_c) and torch.equal(y_e, y_n)
    for a, b in zip(g_e, g_c):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
