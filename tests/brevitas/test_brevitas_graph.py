"""Graph-mode DAQ quantization of timm models through brevitas.graph."""

import warnings

import pytest
import torch
from torch import nn

import brevitas.nn as qnn

from daq_brevitas import (DAQActQuantProxy, DAQWeightQuantProxy, quantize_model, quantizer_parameters,
                          replace_batchnorm_act)

timm = pytest.importorskip("timm")

warnings.filterwarnings("ignore", message="Computing zero point of output accumulator")


def _timm(name, **kwargs):
    torch.manual_seed(0)
    if name.startswith("resnet"):
        kwargs.setdefault("zero_init_last", False)  # no pretrained weights here: avoid all-zero BN γ
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _quant_layers(model):
    return [m for m in model.modules() if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))]


def _float_layers(model):
    return [m for m in model.modules()
            if type(m) in (nn.Conv2d, nn.Linear)]


def test_replace_batchnorm_act_mobilenetv2():
    from timm.layers import BatchNormAct2d
    model = _timm("mobilenetv2_100").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        replace_batchnorm_act(model)
        out = model(x)
    assert not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert torch.allclose(out, ref, atol=1e-5)


def test_zero_init_last_is_detected():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)  # zero_init_last=True by default
    with pytest.warns(UserWarning, match="zero_init_last"):
        quantize_model(model)


@pytest.mark.parametrize("name,keep_float,align", [("resnet18", True, False), ("mobilenetv2_100", False, False),
                                                   ("resnet18", True, True)])
def test_quantize_model_structure(name, keep_float, align):
    model = quantize_model(_timm(name), weight_bit_width=4, act_bit_width=4, keep_first_last_float=keep_float,
                           align_residuals=align)
    quant, floats = _quant_layers(model), _float_layers(model)
    assert all(isinstance(m.weight_quant, DAQWeightQuantProxy) for m in quant)
    assert all(int(m.weight_quant.tensor_quant.int_quant.bits) == 4 for m in quant)
    acts = [m for m in model.modules() if isinstance(m, DAQActQuantProxy)]
    assert len(acts) >= len(quant) // 2
    if keep_float:
        assert len(floats) == 2 and len(quant) == 19, "resnet18: 20 convs + fc, first conv and fc float"
        for node in model.graph.nodes:  # float first/last layers have float inputs and outputs
            if node.op == "call_module" and type(model.get_submodule(node.target)) in (nn.Conv2d, nn.Linear):
                for other in list(node.all_input_nodes) + list(node.users):
                    if other.op == "call_module":
                        assert not isinstance(model.get_submodule(other.target), qnn.QuantIdentity), other.target
    else:
        assert not floats and len(quant) == 53, "mobilenetv2_100: 52 convs + classifier, all quantized"
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 10) and bool(torch.isfinite(y).all())


@pytest.mark.slow
@pytest.mark.parametrize("name,bits,keep_float", [
    ("resnet18", 4, True), ("resnet18", 2, True),
    ("mobilenetv2_100", 4, False), ("mobilenetv2_100", 2, False),
])
def test_few_training_steps_reduce_loss(name, bits, keep_float):
    model = quantize_model(_timm(name), weight_bit_width=bits, act_bit_width=bits,
                           keep_first_last_float=keep_float).train()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        model(x)  # first-batch initialisation of bounds and scales
    qp, wp = quantizer_parameters(model)
    opt_q = torch.optim.Adam(qp, lr=1e-3)
    opt_w = torch.optim.SGD(wp, lr=1e-2, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt_q.zero_grad()
        opt_w.zero_grad()
        loss.backward()
        opt_q.step()
        opt_w.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and min(losses[1:]) < 0.95 * losses[0], losses


def test_quantizer_overrides_replace_the_daq_quantizers():
    """Brevitas injector classes are falsy: overrides must still be used (not `x or default`)."""
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
    model = _timm("resnet18")
    stock = quantize_model(model, 4, 4, weight_quant=Int8WeightPerChannelFloat, act_quant=Uint8ActPerTensorFloat,
                           signed_act_quant=Int8ActPerTensorFloat)
    daq = quantize_model(_timm("resnet18"), 4, 4)
    for qmodel, expect_daq in ((stock, False), (daq, True)):
        weight_proxies = [m.weight_quant for m in _quant_layers(qmodel)]
        assert weight_proxies
        assert all(isinstance(p, DAQWeightQuantProxy) == expect_daq for p in weight_proxies)
        act_proxies = [m for m in qmodel.modules() if type(m).__name__.endswith("ActQuantProxyFromInjector")
                       or isinstance(m, DAQActQuantProxy)]
        assert any(isinstance(p, DAQActQuantProxy) for p in act_proxies) == expect_daq
    assert all(int(m.quant_weight().bit_width) == 4 for m in _quant_layers(stock))
