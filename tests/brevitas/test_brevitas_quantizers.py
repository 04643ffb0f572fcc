"""DAQ quantizers inside Brevitas layers: grids, numerics, gradients, initialisation."""

import warnings

import pytest
import torch

import brevitas.nn as qnn
from brevitas.quant import Int32Bias

import daq_core
from daq_brevitas import (DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor,
                          DAQWeightScaling)

from _daq_brevitas_models import TinyDAQNet, act_scalings, weight_scalings

warnings.filterwarnings("ignore", message="Computing zero point of output accumulator")


def _ints(qt):
    """Integer codes of a QuantTensor, checking that its value is exactly ``(int - zero_point) * scale``."""
    raw = qt.value / qt.scale + qt.zero_point
    ints = raw.round()
    assert torch.allclose(raw, ints, rtol=0, atol=1e-4)
    assert torch.equal(qt.value, (ints - qt.zero_point) * qt.scale), "value must be exactly (int - zp) * scale"
    return ints


@pytest.mark.parametrize("quant", [DAQWeightPerTensor, DAQWeightPerChannel])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quant_weight_lies_on_daq_grid(quant, bits):
    conv = qnn.QuantConv2d(16, 32, 3, weight_quant=quant, weight_bit_width=bits, bias=False)
    with torch.no_grad():
        conv.weight.normal_()  # Gaussian weights reach the outer levels (kaiming-uniform stays within ±1.8σ)
    qw = conv.quant_weight()
    ints = _ints(qw)
    assert int(qw.bit_width) == bits and qw.signed
    if bits == 1:  # Brevitas's binary convention (±s, s, 0, 1)
        assert float(qw.zero_point) == 0.0
        assert set(ints.unique().tolist()) == {-1.0, 1.0}
    else:  # 2^b symmetric levels without zero: signed ints with zero point -0.5
        assert float(qw.zero_point) == -0.5
        assert ints.min() >= -2 ** (bits - 1) and ints.max() <= 2 ** (bits - 1) - 1
        assert not bool((qw.value == 0).any()), "the DAQ weight grid has no zero level"
        # value = (k + 1/2) * scale: odd multiples of scale/2, symmetric around 0
        odd = (2 * qw.value / qw.scale).round()
        assert bool((odd.remainder(2) == 1).all())
    per_channel_scales = qw.scale.reshape(-1).numel()
    assert per_channel_scales == (32 if quant is DAQWeightPerChannel else 1)
    assert len(ints.unique()) <= 2 ** bits
    if bits <= 4:
        assert len(ints.unique()) == 2 ** bits, "Gaussian weights with 144 fan-in use every level"
        if bits > 1:  # the used levels are symmetric around 0: k <-> -k - 1
            assert torch.equal(ints.unique(), -ints.unique().flip(0) - 1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("quant,signed", [(DAQActPerTensor, False), (DAQSignedActPerTensor, True)])
def test_activation_grid(bits, quant, signed):
    act = qnn.QuantIdentity(act_quant=quant, bit_width=bits, return_quant_tensor=True)
    x = torch.randn(4, 8, 6, 6) * 2
    qt = act(x)
    ints = _ints(qt)
    assert qt.signed == signed
    lo, hi = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    assert ints.min() >= lo and ints.max() <= hi
    scaling = act_scalings(act)[0]
    n = 2 ** bits - 1
    step = (scaling.upper - scaling.lower) / n
    assert torch.allclose(qt.scale, step)
    if not signed:
        assert float(scaling.lower) == 0.0 and float(qt.zero_point) == 0.0
        assert float(qt.value.min()) >= 0.0


def test_same_numerics_as_daq_core():
    torch.manual_seed(1)
    conv = qnn.QuantConv2d(8, 16, 3, weight_quant=DAQWeightPerChannel, weight_bit_width=3, bias=False)
    qw = conv.quant_weight().value
    s = weight_scalings(conv)[0]
    assert not s.center, "per-channel weights are divided by their rms (no mean removal), as in daq_fx"
    rms = conv.weight.detach().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    ref = daq_core.fake_quantize_weight(conv.weight / rms, s.lower, s.upper, s.scale, 3, ch_axis=0,
                                        standardize_input=False)
    assert torch.allclose(qw, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    conv = qnn.QuantConv2d(8, 16, 3, weight_quant=DAQWeightPerTensor, weight_bit_width=3, bias=False)
    qw = conv.quant_weight().value
    s = weight_scalings(conv)[0]
    assert s.center, "per-tensor weights are standardised as in the paper"
    ref = daq_core.fake_quantize_weight(conv.weight, s.lower, s.upper, s.scale, 3)
    assert torch.allclose(qw, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    act = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=3)
    x = torch.randn(2, 4, 5, 5)
    y = act(x)
    a = act_scalings(act)[0]
    ref = daq_core.fake_quantize_activation(torch.relu(x), a.lower, a.upper, 3)
    assert torch.allclose(y, ref, rtol=0, atol=1e-6)


class _PaperAct(DAQActPerTensor):
    init = "std"


class _PaperSignedAct(DAQSignedActPerTensor):
    init = "std"


class _PaperWeight(DAQWeightPerTensor):
    init = "std"


def test_first_batch_initialisation_paper():
    torch.manual_seed(2)
    relu = qnn.QuantReLU(act_quant=_PaperAct, bit_width=4)
    signed = qnn.QuantIdentity(act_quant=_PaperSignedAct, bit_width=4)
    a, b = torch.randn(64, 32), torch.randn(64, 32) * 5
    relu(a)
    signed(a)
    up = act_scalings(relu)[0].upper.detach().clone()
    assert torch.allclose(up, 3 * torch.relu(a).std(unbiased=False))
    s = act_scalings(signed)[0]
    assert torch.allclose(s.lower, -3 * a.std(unbiased=False)) and torch.allclose(s.upper, 3 * a.std(unbiased=False))
    relu(b)  # later batches do not re-initialise
    assert torch.equal(act_scalings(relu)[0].upper.detach(), up)

    conv = qnn.QuantConv2d(4, 8, 3, weight_quant=_PaperWeight, weight_bit_width=2, bias=False)
    ws = weight_scalings(conv)[0]
    assert not bool(ws.initialized)
    conv.quant_weight()
    assert bool(ws.initialized)
    assert float(ws.lower) == -3.0 and float(ws.upper) == 3.0
    expected = daq_core.init_weight_scale(conv.weight.detach(), -3.0, 3.0, 2)
    assert torch.allclose(ws.scale.detach(), expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_initialisation_is_no_worse_than_paper(bits):
    torch.manual_seed(3)
    x = torch.randn(4096).exp()  # heavy-tailed, positive
    errors = []
    for quant in (_PaperAct, DAQActPerTensor):
        act = qnn.QuantIdentity(act_quant=quant, bit_width=bits)
        errors.append(float((act(x) - x).pow(2).mean()))
    assert errors[1] <= errors[0]
    w = torch.randn(16, 8, 3, 3) ** 3  # heavy tails: the ±3σ bounds clip much of the energy
    errors = []
    for quant in (_PaperWeight, DAQWeightPerTensor):
        conv = qnn.QuantConv2d(8, 16, 3, weight_quant=quant, weight_bit_width=bits, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        errors.append(float((conv.quant_weight().value - w).pow(2).sum()))
    assert errors[1] < errors[0]


def test_train_mode_forward_equals_eval_mode_forward():
    torch.manual_seed(3)
    model = TinyDAQNet(weight_bits=2, act_bits=3)
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        model.train()
        model(torch.randn(4, 3, 10, 10))  # initialise
        y_train = model(x)
        model.eval()
        y_eval = model(x)
    assert torch.equal(y_train, y_eval)


def test_gradients_reach_weights_bounds_and_scale():
    torch.manual_seed(4)
    model = TinyDAQNet(weight_bits=3, act_bits=3)
    x = torch.randn(4, 3, 10, 10)
    model(x)
    model.zero_grad()
    model(x).square().sum().backward()
    for name, conv in [("conv1", model.conv1), ("conv2", model.conv2), ("fc", model.fc)]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, name
        s = weight_scalings(conv)[0]
        for pname in ("lower", "upper", "scale"):
            g = getattr(s, pname).grad
            assert g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0, (name, pname)
    inp = act_scalings(model.inp)[0]
    assert inp.lower.grad is not None and inp.lower.grad.abs() > 0
    assert inp.upper.grad is not None and inp.upper.grad.abs() > 0
    relu = act_scalings(model.relu1)[0]
    assert relu.upper.grad is not None and relu.upper.grad.abs() > 0
    assert not relu.lower.requires_grad, "unsigned DAQ activations keep l = 0 fixed"


def test_gamma_sigma_are_class_attributes():
    class SharpWeight(DAQWeightPerTensor):
        sigma = 0.5
        gamma = 3.0

    torch.manual_seed(5)
    base = qnn.QuantConv2d(4, 4, 3, weight_quant=DAQWeightPerTensor, weight_bit_width=3, bias=False)
    sharp = qnn.QuantConv2d(4, 4, 3, weight_quant=SharpWeight, weight_bit_width=3, bias=False)
    sharp.weight.data.copy_(base.weight.data)
    iq = sharp.weight_quant.tensor_quant.int_quant
    assert (iq.gamma, iq.sigma) == (3.0, 0.5)
    assert base.weight_quant.tensor_quant.int_quant.sigma == daq_core.DEFAULT_WEIGHT_SIGMA
    grads = []
    for conv in (base, sharp):
        conv.quant_weight().value.sum().backward()
        grads.append(conv.weight.grad.clone())
    assert torch.equal(base.quant_weight().value, sharp.quant_weight().value), "the forward is rounding for any γ, σ"
    assert not torch.allclose(grads[0], grads[1]), "γ, σ shape the DASR gradient"

    class Act(DAQActPerTensor):
        bit_width = 3
        sigma = 1.5

    relu = qnn.QuantReLU(act_quant=Act)
    iq = relu.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant
    assert (iq.bits, iq.sigma, iq.gamma) == (3, 1.5, daq_core.DEFAULT_GAMMA)


def test_int32_bias_with_quant_tensor_input():
    torch.manual_seed(6)
    relu = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=4, return_quant_tensor=True)
    conv = qnn.QuantConv2d(3, 8, 3, weight_quant=DAQWeightPerChannel, weight_bit_width=4, bias=True,
                           bias_quant=Int32Bias, return_quant_tensor=False)
    x = relu(torch.randn(2, 3, 8, 8))
    out = conv(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 6, 6)
    qb = conv.bias_quant(conv.bias, x, conv.quant_weight())
    expected_scale = (x.scale * conv.quant_weight().scale).reshape(-1)
    assert torch.allclose(qb.scale.reshape(-1), expected_scale)
    assert int(qb.bit_width) == 32


def test_quant_linear_per_channel_grid():
    lin = qnn.QuantLinear(20, 6, weight_quant=DAQWeightPerChannel, weight_bit_width=2, bias=False)
    qw = lin.quant_weight()
    assert qw.scale.shape == (6, 1)
    ints = _ints(qw)
    assert set(ints.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}


def test_initialisation_overridable_as_class_attributes():
    class WideWeight(DAQWeightPerTensor):
        init_bound = 5.0
        init = "std"

    class WideAct(DAQActPerTensor):
        init_num_std = 6.0
        init = "std"

    conv = qnn.QuantConv2d(4, 8, 3, weight_quant=WideWeight, weight_bit_width=4, bias=False)
    s = weight_scalings(conv)[0]
    assert (float(s.lower), float(s.upper)) == (-5.0, 5.0)
    relu = qnn.QuantReLU(act_quant=WideAct, bit_width=4)
    x = torch.randn(256)
    relu(x)
    assert torch.allclose(act_scalings(relu)[0].upper, 6 * torch.relu(x).std(unbiased=False))
    with pytest.raises(ValueError, match="init_bound"):
        qnn.QuantConv2d(4, 8, 3, weight_quant=type("W", (DAQWeightPerTensor,), {"init_bound": 0.0}))
    with pytest.raises(ValueError, match="init"):
        qnn.QuantReLU(act_quant=type("A", (DAQActPerTensor,), {"init": "minmax"}))
