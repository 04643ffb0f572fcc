"""QONNX export of DAQ models executed with qonnx; QCDQ refused."""

import warnings

import numpy as np
import pytest
import torch

import brevitas.nn as qnn
from brevitas.quant import Int32Bias

from daq_brevitas import (DAQActPerTensor, DAQExportError, DAQSignedActPerTensor, DAQWeightPerChannel,
                          DAQWeightPerTensor, quantize_model)

pytest.importorskip("onnx")
qonnx = pytest.importorskip("qonnx")

warnings.filterwarnings("ignore", message="Computing zero point of output accumulator")


def _run_qonnx(path, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    model = ModelWrapper(str(path)).transform(InferShapes())
    out = execute_onnx(model, {model.graph.input[0].name: x.numpy()})[model.graph.output[0].name]
    return out, [n.op_type for n in model.graph.node]


class _Small(torch.nn.Module):
    def __init__(self, wb, ab):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=DAQSignedActPerTensor, bit_width=ab, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(3, 8, 3, weight_quant=DAQWeightPerChannel, weight_bit_width=wb,
                                    bias_quant=Int32Bias)
        self.relu = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=ab, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 4, 3, weight_quant=DAQWeightPerTensor, weight_bit_width=wb,
                                     bias_quant=Int32Bias)

    def forward(self, x):
        return self.conv2(self.relu(self.conv(self.inp(x))))


@pytest.mark.parametrize("wb,ab", [(1, 1), (1, 2), (2, 2), (3, 4), (8, 8)])
def test_qonnx_export_small_model_exact(tmp_path, wb, ab):
    from brevitas.export import export_qonnx
    torch.manual_seed(wb * 10 + ab)
    model = _Small(wb, ab).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model(torch.randn(4, 3, 12, 12))
        ref = model(x).numpy()
    export_qonnx(model, args=x, export_path=str(tmp_path / "small.onnx"), dynamo=False)
    out, ops = _run_qonnx(tmp_path / "small.onnx", x)
    assert ops.count("BipolarQuant") == (2 if wb == 1 else 0), "1-bit DAQ weights export as BipolarQuant"
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_qonnx_export_daq_resnet18_matches_pytorch(tmp_path):
    timm = pytest.importorskip("timm")
    from brevitas.export import export_qonnx
    torch.manual_seed(0)
    float_model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    float_model.train()
    with torch.no_grad():  # realistic BatchNorm statistics instead of the (0, 1) defaults
        for _ in range(2):
            float_model(torch.randn(8, 3, 32, 32))
    model = quantize_model(float_model, weight_bit_width=4, act_bit_width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # first-batch initialisation
        ref = model(x).numpy()
    export_qonnx(model, args=x, export_path=str(tmp_path / "resnet18_daq.onnx"))
    out, ops = _run_qonnx(tmp_path / "resnet18_daq.onnx", x)
    assert ops.count("Quant") >= 19 + 17, "19 quantized weights + 17 quantized activations"
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_qcdq_export_is_refused(tmp_path):
    from brevitas.export import export_onnx_qcdq
    conv = qnn.QuantConv2d(3, 4, 3, weight_quant=DAQWeightPerTensor, weight_bit_width=4).eval()
    with pytest.raises(DAQExportError, match="export_qonnx"):
        export_onnx_qcdq(conv, args=torch.randn(1, 3, 8, 8), export_path=str(tmp_path / "x.onnx"), dynamo=False)
    relu = qnn.QuantReLU(act_quant=DAQSignedActPerTensor, bit_width=4).eval()
    relu(torch.randn(4, 8))
    with pytest.raises(DAQExportError, match="zero point"):
        export_onnx_qcdq(relu, args=torch.randn(1, 8), export_path=str(tmp_path / "y.onnx"), dynamo=False)


def test_export_before_initialisation_is_refused(tmp_path):
    from brevitas.export import export_qonnx
    model = _Small(4, 4).eval()
    with pytest.raises(DAQExportError, match="forward pass"):
        export_qonnx(model, args=torch.randn(1, 3, 12, 12), export_path=str(tmp_path / "u.onnx"), dynamo=False)
