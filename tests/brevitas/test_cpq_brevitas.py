"""CPQ through Brevitas: layer injectors, graph mode with learned bit-widths, QONNX with per-layer bit-widths."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.quant import Int32Bias

import daq_brevitas as db
from daq_brevitas import (CPQActPerTensor, CPQSignedActPerTensor, CPQWeightPerChannel, CPQWeightPerTensor,
                          FamilyScaling)

warnings.filterwarnings("ignore", message="Computing zero point of output accumulator")


def _set_bits(state, bits):
    drop = state.bits - bits
    with torch.no_grad():
        state.gate_logits.copy_(torch.tensor([-6.0 if j < drop else 6.0 for j in range(state.gate_logits.numel())]))


class _LearnedWeight(CPQWeightPerChannel):
    bit_width = 8
    learn_bits = True


class _LearnedAct(CPQActPerTensor):
    bit_width = 8
    learn_bits = True


class _LearnedSignedAct(CPQSignedActPerTensor):
    bit_width = 8
    learn_bits = True


class TinyCPQNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=_LearnedSignedAct, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=_LearnedWeight, bias_quant=Int32Bias,
                                     return_quant_tensor=False)
        self.relu1 = qnn.QuantReLU(act_quant=_LearnedAct, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 4, 3, weight_quant=_LearnedWeight, bias_quant=Int32Bias,
                                     return_quant_tensor=False)

    def forward(self, x):
        return self.conv2(self.relu1(self.conv1(self.inp(x))))


def test_layer_quantizers_put_weights_on_the_per_channel_grid():
    conv = qnn.QuantConv2d(3, 8, 3, weight_quant=CPQWeightPerChannel, weight_bit_width=3,
                           return_quant_tensor=False).eval()
    qw = conv.quant_weight()
    scaling = conv.weight_quant.tensor_quant.scaling_impl
    assert isinstance(scaling, FamilyScaling) and scaling.log_step.shape == (8,)
    codes = qw.value / qw.scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -4 and codes.round().max() <= 3 and int(qw.bit_width) == 3
    per_tensor = qnn.QuantConv2d(3, 8, 3, weight_quant=CPQWeightPerTensor, weight_bit_width=3)
    per_tensor.quant_weight()
    assert per_tensor.weight_quant.tensor_quant.scaling_impl.log_step.shape == (1,)


def test_learned_bit_widths_reach_the_brevitas_view_and_qonnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("qonnx")
    from brevitas.export import export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    torch.manual_seed(0)
    model = TinyCPQNet()
    model(torch.randn(8, 3, 12, 12))                # first batch initialises the steps
    chosen = {"conv1": 3, "conv2": 5}
    for name, bits in chosen.items():
        _set_bits(model.get_submodule(name).weight_quant.tensor_quant.scaling_impl, bits)
    _set_bits(model.inp.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl, 6)
    _set_bits(model.relu1.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl, 4)
    model.eval()
    assert int(model.conv1.quant_weight().bit_width) == 3 and int(model.conv2.quant_weight().bit_width) == 5
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x).numpy()
    path = tmp_path / "cpq.onnx"
    export_qonnx(model, args=x, export_path=str(path), dynamo=False)
    onnx_model = ModelWrapper(str(path)).transform(InferShapes())
    out = execute_onnx(onnx_model, {onnx_model.graph.input[0].name: x.numpy()})[onnx_model.graph.output[0].name]
    assert np.abs(out - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    bit_widths = sorted(int(onnx_model.get_initializer(n.input[3])) for n in onnx_model.graph.node
                        if n.op_type == "Quant")
    assert [b for b in bit_widths if b < 32] == [3, 4, 5, 6]      # 32: the Int32Bias biases


def test_graph_mode_family_options_and_layer_bit_widths():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    qmodel = db.quantize_model(model, weight_bit_width=8, act_bit_width=8, quantizer="cpq",
                               family_options={"learn_bits": True})
    qmodel.train()(torch.randn(4, 3, 32, 32))
    states = [m for m in qmodel.modules() if isinstance(m, FamilyScaling)]
    assert states and all(m.learn_bits and m.bits == 8 for m in states)
    layers = db.layer_bit_widths(qmodel)
    assert len(layers) == 19 and all(v == {"weight": 8, "activation": 8} for v in layers.values())
    quant, rest = db.quantizer_parameters(qmodel)
    ids = {id(p) for p in quant}
    assert all(id(m.gate_logits) in ids and id(m.log_step) in ids for m in states)
    with pytest.raises(ValueError, match="not options of"):
        db.quantize_model(timm.create_model("resnet18", pretrained=False, num_classes=10), quantizer="cpq",
                          family_options={"gamma": 2.0})


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyCPQNet()
    model(torch.randn(8, 3, 12, 12))
    _set_bits(model.conv1.weight_quant.tensor_quant.scaling_impl, 2)
    fresh = TinyCPQNet()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert db.layer_bit_widths(fresh)["conv1"]["weight"] == 2
