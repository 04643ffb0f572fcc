"""daq_brevitas N2UQ quantizers (DAQ-SPEC §8), the quantize_model switch, and agreement with daq_fx."""

import pytest
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.quant import Int32Bias

import daq_brevitas as db
import daq_fx
from daq_core import n2uq as core


class TinyN2UQNet(nn.Module):
    """Signed input quantizer → conv (per-channel) → ReLU → conv (per-tensor) → ReLU → pool → linear."""

    def __init__(self, bits=3):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=db.N2UQSignedActPerTensor, bit_width=bits, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=db.N2UQWeightPerChannel,
                                     weight_bit_width=bits, bias_quant=Int32Bias, return_quant_tensor=False)
        self.relu1 = qnn.QuantReLU(act_quant=db.N2UQActPerTensor, bit_width=bits, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=db.N2UQWeightPerTensor,
                                     weight_bit_width=bits, bias_quant=Int32Bias, return_quant_tensor=False)
        self.relu2 = qnn.QuantReLU(act_quant=db.N2UQActPerTensor, bit_width=bits, return_quant_tensor=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(self.inp(x)))))
        return self.fc(x.mean((2, 3)))


class FloatNet(nn.Module):
    """Conv-BN-ReLU, depthwise Conv-BN, residual add, pool, linear (float, for quantize_model)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def _tensor_quant(layer):
    return layer.act_quant.fused_activation_quant_proxy.tensor_quant


def _scalings(model):
    return [m for m in model.modules() if isinstance(m, db.N2UQActScaling)]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activation_levels_and_gste_through_quant_relu(bits):
    n = 2**bits - 1
    relu = qnn.QuantReLU(act_quant=db.N2UQActPerTensor, bit_width=bits, return_quant_tensor=True)
    relu(torch.randn(256) * 2)                            # first batch initialises
    scaling = _tensor_quant(relu).scaling_impl
    with torch.no_grad():
        scaling.widths.copy_(torch.rand(n) * 0.8 + 0.1)
    x = (torch.randn(400) * 2).requires_grad_()
    out = relu(x)
    codes = out.value.detach() / out.scale + out.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= 0 and codes.round().max() <= n
    assert float(out.zero_point) == 0.0 and int(out.bit_width) == bits
    grad_y = torch.randn(400)
    (gx,) = torch.autograd.grad(out.value, [x], grad_y)
    relu_x = x.detach().clamp_min(0)
    bounds = scaling.start.detach() + torch.cat([torch.zeros(1), torch.cumsum(scaling.widths.detach(), 0)])
    seg = torch.bucketize(relu_x, bounds, right=True)
    inside = (seg >= 1) & (seg <= n) & (x.detach() > 0)
    expected = torch.where(inside, grad_y * scaling.output_scale.detach().abs() * (2 / n)
                           / scaling.widths.detach()[(seg - 1).clamp(0, n - 1)], 0.0)
    assert torch.allclose(gx, expected, atol=1e-6)


def test_signed_activation_zero_point_convention():
    ident = qnn.QuantIdentity(act_quant=db.N2UQSignedActPerTensor, bit_width=4, return_quant_tensor=True)
    out = ident(torch.randn(2000))
    scaling = _tensor_quant(ident).scaling_impl
    assert 0 < int(scaling.zero_point) < 15
    assert float(out.zero_point) == int(scaling.zero_point) - 8        # Brevitas signed view
    ints = out.value / out.scale + out.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.round().min() >= -8 and ints.round().max() <= 7
    assert out.value.min() < 0 < out.value.max()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_activation_matches_daq_fx(signed, bits):
    """The same s, a, scale, zero point give the same outputs and gradients in both plugins."""
    torch.manual_seed(3)
    fx_fq = daq_fx.N2UQFakeQuantize(role="activation", bits=bits, signed=signed)
    fx_fq(torch.randn(512) * 1.5 + (0 if signed else 1.5))
    with torch.no_grad():
        fx_fq.widths.copy_(torch.rand(2**bits - 1) * 0.5 + 0.05)
        fx_fq.start.add_(-0.1)
    quant = db.N2UQSignedActPerTensor if signed else db.N2UQActPerTensor
    ident = qnn.QuantIdentity(act_quant=quant, bit_width=bits, return_quant_tensor=True)
    scaling = _tensor_quant(ident).scaling_impl
    with torch.no_grad():
        scaling.start.copy_(fx_fq.start.reshape(()))
        scaling.widths.copy_(fx_fq.widths)
        scaling.output_scale.copy_(fx_fq.output_scale.reshape(()))
        scaling.zero_point.copy_(fx_fq.zero_point.reshape(()))
        scaling.initialized.fill_(True)
    x1 = (torch.randn(1000) * 2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, out = fx_fq(x1), ident(x2)
    assert torch.equal(y1, out.value)
    fx_scale, fx_zero_point = fx_fq.calculate_qparams()
    assert torch.allclose(out.scale, fx_scale) and float(out.zero_point) == fx_zero_point.item() - (
        2 ** (bits - 1) if signed else 0)
    g = torch.randn(1000)
    grads_fx = torch.autograd.grad(y1, [x1, fx_fq.start, fx_fq.widths, fx_fq.output_scale], g)
    grads_br = torch.autograd.grad(out.value, [x2, scaling.start, scaling.widths, scaling.output_scale], g)
    for a, b in zip(grads_fx, grads_br):
        assert torch.allclose(a.reshape(b.shape), b, atol=1e-6)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_match_daq_fx(per_channel):
    conv = qnn.QuantConv2d(4, 6, 3, weight_quant=db.N2UQWeightPerChannel if per_channel else db.N2UQWeightPerTensor,
                           weight_bit_width=3, bias=False, return_quant_tensor=False)
    fx_fq = daq_fx.N2UQFakeQuantize(role="weight", bits=3, ch_axis=0 if per_channel else None)
    qw = conv.quant_weight()
    assert torch.equal(qw.value, fx_fq(conv.weight))
    fx_scale, _ = fx_fq.calculate_qparams()
    assert torch.allclose(qw.scale.flatten(), 2 * fx_scale)          # 2α/n vs α/n: same grid, zero point -0.5
    ints = qw.value / qw.scale + qw.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.round().min() >= -4 and ints.round().max() <= 3
    assert float(qw.zero_point) == -0.5


def test_quantize_model_switch_and_parameters():
    torch.manual_seed(0)
    daq = db.quantize_model(FloatNet())
    assert not any(isinstance(m, (db.N2UQActScaling, db.N2UQWeightScaling)) for m in daq.modules())
    assert any(isinstance(m, db.DAQActScaling) for m in daq.modules())
    n2uq = db.quantize_model(FloatNet(), quantizer="n2uq", keep_first_last_float=False)
    assert not any(isinstance(m, (db.DAQActScaling, db.DAQWeightScaling)) for m in n2uq.modules())
    assert len(_scalings(n2uq)) >= 2 and any(isinstance(m, db.N2UQWeightScaling) for m in n2uq.modules())
    n2uq(torch.randn(4, 3, 8, 8))
    quant, rest = db.quantizer_parameters(n2uq)
    assert {id(p) for p in quant} == {id(p) for s in _scalings(n2uq) for p in (s.start, s.widths, s.output_scale)}
    assert len(quant) + len(rest) == len(list(n2uq.parameters()))
    with pytest.raises(ValueError, match="quantizer must be one of"):
        db.quantize_model(FloatNet(), quantizer="lsq")


def test_training_keeps_thresholds_monotone_and_levels_uniform():
    torch.manual_seed(0)
    model = TinyN2UQNet(bits=2)
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    model(x)
    quant, rest = db.quantizer_parameters(model)
    initial = [s.widths.detach().clone() for s in _scalings(model)]
    opt = torch.optim.Adam([{"params": quant, "lr": 0.02}, {"params": rest, "lr": 0.01}])
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for scaling, before in zip(_scalings(model), initial):
        t = scaling.thresholds()
        assert (t[1:] > t[:-1]).all()
    assert any(not torch.allclose(s.widths.detach(), b) for s, b in zip(_scalings(model), initial))
    out = model.relu1(model.conv1(model.inp(x)))
    ints = out.value / out.scale + out.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.round().max() <= 3


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyN2UQNet(bits=3)
    x = torch.randn(4, 3, 8, 8)
    model(x)
    with torch.no_grad():
        for s in _scalings(model):
            s.widths.mul_(torch.rand_like(s.widths) + 0.5)
    fresh = TinyN2UQNet(bits=3)
    fresh.load_state_dict(model.state_dict())
    assert all(bool(s.initialized) for s in _scalings(fresh))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))
    with pytest.raises(ValueError, match="bit_width=3"):
        TinyN2UQNet(bits=2).load_state_dict(model.state_dict())


def test_export_refused_for_n2uq_activations(tmp_path):
    from brevitas.export import export_qonnx
    model = TinyN2UQNet(bits=4)
    model(torch.randn(2, 3, 8, 8))
    with pytest.raises(db.DAQExportError, match="N2UQ activation quantizers cannot be exported"):
        export_qonnx(model.eval(), args=torch.randn(1, 3, 8, 8), export_path=str(tmp_path / "n2uq.onnx"))
