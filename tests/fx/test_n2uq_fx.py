"""daq_fx.N2UQFakeQuantize and the N2UQ qconfig mapping (DAQ-SPEC §8)."""

import pytest
import torch
from torch.ao.quantization import QConfig

import daq_fx
from daq_core import n2uq as core
from daq_fx import N2UQConvertError, N2UQFakeQuantize

from ._models import TinyNet


def _segment_gradient(x, start, widths, scale, grad_y):
    """The G-STE: ``|scale| (2/n) / a_i`` inside segment ``i``, 0 outside ``[d_0, d_n]``."""
    n = widths.numel()
    bounds = start + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
    seg = torch.bucketize(x, bounds, right=True)
    inside = (seg >= 1) & (seg <= n)
    return torch.where(inside, grad_y * scale.abs() * (2 / n) / widths[(seg - 1).clamp(0, n - 1)], 0.0)


def _piecewise_reference(x, start, widths, scale, zero_point):
    """Autograd through the piecewise-linear ``g`` with a straight-through round: the G-STE by definition."""
    n = widths.numel()
    b = start.reshape(1) + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
    seg = torch.bucketize(x.detach(), b.detach(), right=True)
    inside = (seg >= 1) & (seg <= n)
    idx = (seg - 1).clamp(0, n - 1)
    g = torch.where(inside, idx + (x - b[idx]) / widths[idx], (seg > n).to(x.dtype) * n)
    step = scale.abs() * (2 / n)
    return step * (g + (torch.round(g) - g).detach() - zero_point)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_activation_levels_and_gste_through_module(bits, signed):
    n = 2**bits - 1
    fq = N2UQFakeQuantize(role="activation", bits=bits, signed=signed)
    x = torch.randn(500) * 2 + (0.0 if signed else 2.0)
    fq(x if signed else x.clamp_min(0))          # first batch: initialise
    with torch.no_grad():                         # non-uniform widths
        fq.widths.copy_(torch.rand(n) * 0.8 + 0.1)
    assert fq.initialized.item() == 1 and (signed or fq.zero_point.item() == 0)
    if signed and bits > 1:
        assert 0 < fq.zero_point.item() < n        # the levels cover both signs
    x = x.clone().requires_grad_()
    y = fq(x)
    scale, zero_point = fq.calculate_qparams()
    codes = y.detach() / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= n
    assert torch.equal(codes.round().long(), core.n2uq_activation_codes(x.detach(), fq.start.reshape(()), fq.widths))
    assert torch.equal(fq.integers(x.detach()).long(), codes.round().long())
    grad_y = torch.randn(500)
    grads = torch.autograd.grad(y, [x, fq.start, fq.widths, fq.output_scale], grad_y)
    expected = _segment_gradient(x.detach(), fq.start.detach(), fq.widths.detach(), fq.output_scale.detach(), grad_y)
    assert torch.allclose(grads[0], expected, atol=1e-6)
    x2 = x.detach().clone().requires_grad_()
    s, a, sc = (p.detach().clone().requires_grad_() for p in (fq.start, fq.widths, fq.output_scale))
    ref = _piecewise_reference(x2, s, a, sc, fq.zero_point.float())
    assert torch.allclose(ref.detach(), y.detach(), atol=1e-5)
    want = torch.autograd.grad(ref, [x2, s, a, sc], grad_y)
    for got, exp in zip(grads, want):
        assert torch.allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_activation_starts_as_uniform_quantizer():
    x = torch.rand(4096) * 3
    fq = N2UQFakeQuantize(role="activation", bits=4)
    y = fq(x)
    thresholds = fq.thresholds()
    steps = thresholds[1:] - thresholds[:-1]
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)
    assert bool(fq.is_unsigned) and fq.zero_point.item() == 0
    assert (y - x).abs().mean() < 0.1


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_grid_qparams_and_ste(bits):
    n = 2**bits - 1
    fq = N2UQFakeQuantize(role="weight", bits=bits, ch_axis=0)
    w = (torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 1, 6).view(-1, 1, 1, 1)).requires_grad_()
    y = fq(w)
    scale, zero_point = fq.calculate_qparams()
    alpha = core.n2uq_weight_alpha(w, bits, 0).reshape(-1)
    assert torch.allclose(scale, alpha / n) and (zero_point == 0).all() and scale.shape == (6,)
    k = fq.integers(w.detach())
    assert (k.remainder(2) == 1).all() and k.abs().max() <= n
    assert fq.quant_min == -n and fq.quant_max == n and fq.dtype == torch.qint8
    y.backward(torch.ones_like(y))
    assert torch.equal(w.grad, (w.detach().abs() <= alpha.view(-1, 1, 1, 1)).float())


def test_bad_arguments():
    with pytest.raises(ValueError, match="ch_axis applies to weights only"):
        N2UQFakeQuantize(role="activation", ch_axis=0)
    with pytest.raises(ValueError, match="signed applies to activations only"):
        N2UQFakeQuantize(role="weight", signed=True)
    with pytest.raises(ValueError, match="role"):
        N2UQFakeQuantize(role="bias")
    with pytest.raises(ValueError):
        N2UQFakeQuantize(role="weight", bits=8)            # ±255 does not fit int8
    with pytest.raises(ValueError):
        daq_fx.get_n2uq_qat_qconfig_mapping("tensorrt")


def _prepared(bits=2, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    example = (torch.randn(8, 3, 8, 8),)
    return daq_fx.prepare_qat_fx(model, daq_fx.get_n2uq_qat_qconfig_mapping("x86", bits, bits), example), example


def _act_quantizers(model):
    return [m for m in model.modules() if isinstance(m, N2UQFakeQuantize) and not m.is_weight]


def test_prepare_uses_n2uq_everywhere_and_quantizer_parameters():
    qat, example = _prepared()
    fqs = [m for m in qat.modules() if isinstance(m, N2UQFakeQuantize)]
    assert sum(m.is_weight for m in fqs) == 3 and len(_act_quantizers(qat)) >= 4
    assert all(m.initialized.item() == 1 for m in fqs if m.is_weight)   # per-channel α recorded at prepare
    quant, rest = daq_fx.quantizer_parameters(qat)
    expected = {id(p) for m in _act_quantizers(qat) for p in (m.start, m.widths, m.output_scale)}
    assert {id(p) for p in quant} == expected
    assert len(quant) + len(rest) == len(list(qat.parameters()))


def test_training_keeps_thresholds_monotone_and_levels_uniform():
    qat, example = _prepared(bits=2)
    quant, rest = daq_fx.quantizer_parameters(qat)
    initial = [m.widths.detach().clone() for m in _act_quantizers(qat)]
    opt = torch.optim.Adam([{"params": quant, "lr": 0.02}, {"params": rest, "lr": 0.01}])
    torch.manual_seed(1)
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(qat(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.__setitem__(mod, out.detach()))
             for m in _act_quantizers(qat)]
    qat.eval()(x)
    for h in hooks:
        h.remove()
    changed = False
    for fq, before in zip(_act_quantizers(qat), initial):
        t = fq.thresholds()
        assert (t[1:] > t[:-1]).all(), "thresholds stay monotone"
        changed |= not torch.allclose(fq.widths.detach(), before)
        scale, zero_point = fq.calculate_qparams()
        codes = outputs[fq] / scale + zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3), "outputs on the uniform grid"
        assert codes.round().min() >= 0 and codes.round().max() <= fq.quant_max
    assert changed, "widths were learned"


def test_convert_refuses_n2uq_activations_naming_them():
    qat, example = _prepared()
    qat(example[0])
    with pytest.raises(N2UQConvertError, match=r"'activation_post_process_0' \(on the output of 'x'\).*What to do"):
        daq_fx.convert_fx(qat.eval())
    assert isinstance(N2UQConvertError("x"), ValueError)
    for fq in _act_quantizers(qat):       # switched-off N2UQ activations are not in the way (nothing non-uniform)
        fq.disable_fake_quant()
    assert daq_fx.n2uq_activation_quantizers(qat) == []


def test_n2uq_weights_with_daq_activations_convert_exactly():
    """N2UQ weights lie on DAQ's odd-integer grid: baked like DAQ's, the int8 model reproduces the QAT model."""
    torch.manual_seed(0)
    model = TinyNet()
    example = (torch.randn(8, 3, 8, 8),)
    daq = daq_fx.get_daq_qconfig(4, 4)
    n2uq = daq_fx.get_n2uq_qconfig(4, 4)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4).set_global(QConfig(activation=daq.activation,
                                                                                  weight=n2uq.weight))
    qat = daq_fx.prepare_qat_fx(model, mapping, example)
    qat(torch.randn(8, 3, 8, 8))
    qat.eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = qat(x)
        weight_fq = qat.conv1.weight_fake_quant
        folded = qat.conv1.weight * daq_fx.weight_fold_factor(qat.conv1).reshape(-1, 1, 1, 1)
        codes = weight_fq.integers(folded)
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        got = int8(x)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())
    int_weight = int8.conv1.weight().int_repr()
    assert torch.equal(int_weight.int(), codes)
    assert (int_weight.remainder(2) == 1).all() and int_weight.abs().max() <= 15


def test_state_dict_round_trip():
    qat, example = _prepared(bits=3)
    quant, rest = daq_fx.quantizer_parameters(qat)
    opt = torch.optim.Adam(quant + rest, lr=0.01)
    for _ in range(3):
        loss = qat(example[0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = qat.state_dict()
    assert any(k.endswith("widths") for k in state) and any(k.endswith("alpha") for k in state)
    fresh, _ = _prepared(bits=3, seed=5)
    fresh.load_state_dict(state)
    assert all(fq.initialized.item() == 1 for fq in _act_quantizers(fresh))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), fresh.eval()(x))
    other, _ = _prepared(bits=2)
    with pytest.raises(ValueError, match="bits=2"):
        other.load_state_dict(state)


def test_relu6_cap_clips_like_relu6():
    fq = N2UQFakeQuantize(role="activation", bits=4, signed=False)
    fq.set_upper_limit(6.0)
    x = torch.rand(1000) * 10
    y = fq(x)
    assert torch.equal(y, fq(x.clamp(max=6.0)))
    with pytest.raises(ValueError, match="activation quantizers only"):
        N2UQFakeQuantize(role="weight").set_upper_limit(6.0)
