"""DAQFakeQuantize: the grid it fake-quantizes to, its qparams, init, switches and state."""

import pytest
import torch

from daq_fx import DAQFakeQuantize


def _per_channel(t, ch_axis, dim):
    shape = [1] * dim
    shape[ch_axis] = -1
    return t.reshape(shape)


@pytest.mark.parametrize("bits", [1, 2, 4, 7])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_weight_grid_is_odd_integers_times_qparams_scale(bits, ch_axis):
    fq = DAQFakeQuantize(role="weight", bits=bits, ch_axis=ch_axis)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3.0, 6).reshape(6, 1, 1, 1)
    wq = fq(w)
    scale, zero_point = fq.calculate_qparams()
    n = 2**bits - 1
    assert fq.quant_min == -n and fq.quant_max == n and fq.dtype == torch.qint8
    assert torch.all(zero_point == 0)
    assert scale.shape == ((6,) if ch_axis == 0 else (1,))
    s = _per_channel(scale, 0, 4) if ch_axis == 0 else scale
    k = wq / s
    assert torch.allclose(k, k.round(), atol=1e-4)
    k = k.round()
    assert bool((k.abs() <= n).all()) and bool((k.remainder(2) == 1).all())
    assert torch.equal(fq.integers(w), k.to(torch.int32))
    if bits == 1:
        assert set(k.unique().tolist()) <= {-1.0, 1.0}


def test_per_channel_weight_standardises_each_channel():
    """A channel scaled by 1000 gets the same integers as at scale 1 (per-channel ŵ and s)."""
    w = torch.randn(4, 8)
    big = w.clone()
    big[1] *= 1000.0
    fq_a = DAQFakeQuantize(role="weight", bits=3, ch_axis=0)
    fq_b = DAQFakeQuantize(role="weight", bits=3, ch_axis=0)
    assert torch.equal(fq_a.integers(w), fq_b.integers(big))
    assert fq_b.calculate_qparams()[0][1] > 100 * fq_a.calculate_qparams()[0][1]


def test_weight_output_scale_initialised_by_least_squares():
    w = torch.randn(16, 32)
    fq = DAQFakeQuantize(role="weight", bits=4, ch_axis=0)
    wq = fq(w)
    # least squares: the residual is orthogonal to the grid direction in every channel
    assert torch.allclose(((w - wq) * wq).sum(1), torch.zeros(16), atol=1e-4)
    assert (wq - w).norm() < 0.3 * w.norm()   # 4-bit grid: about 0.1-0.2 relative error


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_unsigned_decided_on_first_batch(bits):
    fq = DAQFakeQuantize(role="activation", bits=bits, init="std")
    x = torch.relu(torch.randn(64, 16))
    y = fq(x)
    assert fq.is_unsigned
    scale, zero_point = fq.calculate_qparams()
    assert zero_point.item() == 0
    assert torch.allclose(fq.upper_bound, 3 * x.std(unbiased=False).reshape(1))
    codes = y / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_mse_init_is_never_worse_than_the_paper_init(role):
    x = torch.randn(16, 64) ** 3 if role == "weight" else torch.relu(torch.randn(4096)) ** 2   # heavy tails
    kwargs = dict(ch_axis=0) if role == "weight" else {}
    errors = {}
    for init in ("std", "mse"):
        fq = DAQFakeQuantize(role=role, bits=4, init=init, **kwargs)
        errors[init] = (fq(x) - x).pow(2).mean().item()
    assert errors["mse"] <= errors["std"] + 1e-9


def test_activation_signed_has_integer_zero_point_and_exact_grid():
    fq = DAQFakeQuantize(role="activation", bits=4)
    x = torch.randn(256) * 2 + 0.3
    y = fq(x)
    assert not fq.is_unsigned
    scale, zero_point = fq.calculate_qparams()
    assert 0 <= zero_point.item() <= 15
    codes = y / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= 15
    # same values as torch's affine fake-quant with these qparams, up to float ties
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point.item()), 0, 15)
    assert (y - ref).abs().max() < 1e-5


def test_signed_false_fixes_lower_bound_at_zero():
    fq = DAQFakeQuantize(role="activation", bits=4, signed=False)
    y = fq(torch.randn(100))
    assert fq.is_unsigned and y.min() == 0
    y.sum().backward()
    assert fq.lower_bound.grad is None and fq.upper_bound.grad is not None


def test_gradients_reach_all_quantizer_parameters():
    fq_w = DAQFakeQuantize(role="weight", bits=4, ch_axis=0)
    w = torch.randn(4, 8, requires_grad=True)
    fq_w(w).pow(2).sum().backward()
    for p in (fq_w.lower_bound, fq_w.upper_bound, fq_w.output_scale, w):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    fq_a = DAQFakeQuantize(role="activation", bits=4, signed=True)
    x = torch.randn(64, requires_grad=True)
    fq_a(x).pow(2).sum().backward()
    assert fq_a.lower_bound.grad is not None and fq_a.upper_bound.grad.abs().sum() > 0


def test_switches():
    fq = DAQFakeQuantize(role="activation", bits=2)
    fq.disable_observer()
    x = torch.randn(32) * 10
    fq(x)
    assert fq.initialized.item() == 0            # no first-batch init while the observer is off
    fq.enable_observer()
    fq.disable_fake_quant()
    assert torch.equal(fq(x), x)                 # identity, but initialised
    assert fq.initialized.item() == 1
    fq.enable_fake_quant()
    assert fq(x).unique().numel() <= 4


def test_state_dict_round_trip_resizes_per_channel_parameters():
    src = DAQFakeQuantize(role="weight", bits=3, ch_axis=0)
    w = torch.randn(5, 7)
    src(w)
    with torch.no_grad():
        src.upper_bound.add_(torch.linspace(0, 0.5, 5))
    dst = DAQFakeQuantize(role="weight", bits=3, ch_axis=0)
    dst.load_state_dict(src.state_dict())
    assert isinstance(dst.upper_bound, torch.nn.Parameter) and dst.upper_bound.shape == (5,)
    assert dst.initialized.item() == 1
    assert torch.equal(dst(w), src(w))
    act = DAQFakeQuantize(role="activation", bits=4)
    act(torch.relu(torch.randn(50)))
    act2 = DAQFakeQuantize(role="activation", bits=4)
    act2.load_state_dict(act.state_dict())
    x = torch.randn(50)
    assert act2.is_unsigned and torch.equal(act2(x), act(x))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="int8"):
        DAQFakeQuantize(role="weight", bits=8)
    with pytest.raises(ValueError, match="activation bits"):
        DAQFakeQuantize(role="activation", bits=9)
    with pytest.raises(ValueError, match="role"):
        DAQFakeQuantize(role="bias")
    with pytest.raises(ValueError, match="ch_axis"):
        DAQFakeQuantize(role="activation", ch_axis=1)
    with pytest.raises(TypeError, match="signed"):
        DAQFakeQuantize(role="activation", signed="yes")
    with pytest.raises(ValueError, match="init"):
        DAQFakeQuantize(init="minmax")
    with pytest.raises(ValueError, match="gamma"):
        DAQFakeQuantize(gamma=-1.0)


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_a_float64_copy_computes_the_same_codes_away_from_ties(role):
    """``copy.deepcopy(qat).double()`` (benchmarks.efficientnet_lite0 --noise-floor) keeps the quantizer's
    grid: in float64 the codes equal the float32 ones except where x/scale sits within float32 error of
    a rounding boundary."""
    import copy

    torch.manual_seed(0)
    if role == "weight":
        fq = DAQFakeQuantize(role="weight", bits=4, ch_axis=0)
        x = torch.randn(16, 8, 3, 3)
    else:
        fq = DAQFakeQuantize(role="activation", bits=4)
        x = torch.randn(4, 8, 16, 16).relu()
    y32 = fq(x).detach()
    fq64 = copy.deepcopy(fq).double()
    y64 = fq64(x.double()).detach()
    assert y64.dtype == torch.float64
    scale = float(fq.calculate_qparams()[0].min())
    differ = ((y64 - y32.double()).abs() > 1e-3 * scale).double().mean().item()
    assert differ < 1e-3, differ                     # only rare near-ties may flip
    same = (y64 - y32.double()).abs() <= 1e-3 * scale
    assert torch.allclose(y64[same].float(), y32[same], rtol=1e-5, atol=1e-6)
