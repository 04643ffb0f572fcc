"""ONNX Runtime deployment of a converted DAQ model: QDQ / integer ONNX export and ORT helpers.

:func:`export_qdq_onnx` walks the graph of a model from :func:`daq_fx.convert_fx` (torch.ao's
quantized modules, x86/fbgemm) and writes an ONNX model that onnxruntime's CPU provider runs with
int8 kernels. Two lowerings of each quantized conv / linear / add (``kernels=``):

``"integer"`` (default, exact)
    ``ConvInteger`` / ``MatMulInteger`` (uint8 activations × int8 weights, int32 accumulation), then
    torch.ao's fbgemm requantisation written out in float32: ``y = (float(acc) + b / (s_x s_w)) ·
    (s_x s_w / s_y)``, rounded half to even, plus the output zero point (``QuantizeLinear`` with
    scale 1), i.e. the formula of fbgemm's ``ReQuantizeOutput`` with a float bias, with the same
    float32 constants. Residual adds dequantize both operands, add, multiply by ``1 / s_y`` and
    round. The codes equal the torch.ao x86 model's (up to float ties the two evaluate in a
    different order, none seen in the tests); ~1.4x the latency of torch's int8 kernels on
    ResNet-20.
``"qlinear"`` (fast, not exact)
    The standard QDQ form (``DequantizeLinear → Conv / Gemm / Add → QuantizeLinear``, int32 bias)
    that ORT fuses into ``QLinearConv`` / ``QGemm`` / ``QLinearAdd``. ORT requantises with its
    own float formula and an integer bias (rounded to units of ``s_x s_w``): near rounding ties it
    picks the other code, which 4-bit networks amplify (trained ResNet-20 W4A4: top-1 agreement
    with the QAT model ~0.90).

Both forms keep DAQ's sub-8-bit activation clamps: every clamp ``convert_fx(exact=True)`` inserted
(and every fused ReLU) becomes a ``Clip`` on the uint8 codes (``[zero_point or 0, quant_max]``),
because int8 kernels saturate at 0..255 only. Global average pools are exported exactly in both
forms (the mean of ``code - zero_point`` rounded half to even, as torch's quantized
``adaptive_avg_pool2d``).

:func:`ort_session` builds an ``InferenceSession`` with a given number of threads;
:func:`ort_op_types` runs a session with ORT's profiler on and returns the op types that ran
(to check that convs run as ``ConvInteger`` / ``QLinearConv``, not as float ``Conv`` after
``DequantizeLinear``); :func:`clamp_count` counts the sub-8-bit clamps in an ONNX model.

Needs the ``export`` extra (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import collections
import json
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import fx, nn

__all__ = ["export_qdq_onnx", "ort_session", "ort_run", "ort_op_types", "clamp_count", "DAQOnnxExportError",
           "KERNELS", "DEFAULT_OPSET", "INTEGER_CONV_OPS", "FLOAT_CONV_OPS"]

KERNELS = ("integer", "qlinear")
DEFAULT_OPSET = 17
#: ORT op types that run a conv / linear on integer data (any of them counts as "integer")
INTEGER_CONV_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm",
                              "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv"})
#: ORT op types that run a conv / linear in float
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"})


#: largest |int8 weight| for which ORT's u8s8 kernels cannot saturate their int16 pair sums
#: (2 · 255 · 64 ≤ 32767); above it weights are stored as uint8 with zero point 128
SAFE_S8_WEIGHT = 64


class DAQOnnxExportError(RuntimeError):
    """The converted model contains an op the ONNX exporter does not handle (the message names it)."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("daq_fx.export_onnx needs onnx: pip install 'daq-quant[export]'") from error
    return onnx, helper, numpy_helper


def _ort():
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover
        raise ImportError("ONNX Runtime is not installed: pip install 'daq-quant[export]' (onnxruntime)") from error
    return onnxruntime


# --------------------------------------------------------------------------------------
# what each FX node produced on the example inputs
# --------------------------------------------------------------------------------------

@dataclass
class _Meta:
    quantized: bool = False
    scale: float = 0.0
    zero_point: int = 0
    dtype: Any = None
    shape: Tuple[int, ...] = ()
    value: Any = None          # non-tensor results and small get_attr tensors


class _Recorder(fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.meta: Dict[fx.Node, _Meta] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            if out.is_quantized:
                if out.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    raise DAQOnnxExportError(f"node {n.name!r}: per-channel quantized activations are not supported")
                self.meta[n] = _Meta(True, float(out.q_scale()), int(out.q_zero_point()), out.dtype, tuple(out.shape))
            else:
                small = out.detach().clone() if out.numel() <= 16 else None
                self.meta[n] = _Meta(False, dtype=out.dtype, shape=tuple(out.shape), value=small)
        else:
            self.meta[n] = _Meta(value=out)
        return out


@dataclass
class _Value:
    """An ONNX tensor: float, or uint8 codes with (scale, zero point)."""
    name: str
    scale: Optional[float] = None
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale is not None


# --------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------

class _Builder:
    def __init__(self, kernels: str):
        self.kernels = kernels
        self.nodes: List[Any] = []
        self.initializers: List[Any] = []
        self.used = collections.Counter()
        _, self.helper, self.numpy_helper = _onnx()
        self._consts: Dict[Tuple, str] = {}

    def fresh(self, hint: str) -> str:
        hint = "".join(c if c.isalnum() or c in "_." else "_" for c in hint) or "t"
        self.used[hint] += 1
        return hint if self.used[hint] == 1 else f"{hint}_{self.used[hint] - 1}"

    def const(self, array, hint: str) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(array.copy(order="C"), name))
        if key is not None:
            self._consts[key] = name
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=self.fresh(f"{op}_{hint}"), **attrs))
        return out

    # quantized helpers ------------------------------------------------------------------
    def u8(self, value: int) -> np.ndarray:
        return np.array(value, dtype=np.uint8)

    def dequantize(self, v: _Value, hint: str) -> str:
        return self.node("DequantizeLinear", [v.name, self.const(np.float32(v.scale), "scale"),
                                              self.const(self.u8(v.zero_point), "zero_point")], hint + "_dq")

    def quantize(self, x: str, scale: float, zero_point: int, hint: str) -> str:
        return self.node("QuantizeLinear", [x, self.const(np.float32(scale), "scale"),
                                            self.const(self.u8(zero_point), "zero_point")], hint)

    def round_to_codes(self, y: str, zero_point: int, hint: str) -> str:
        """uint8 ``saturate(round_half_even(y) + zero_point)`` (``QuantizeLinear`` with scale 1)."""
        return self.quantize(y, 1.0, zero_point, hint)

    def clip_codes(self, x: str, low: int, high: int, hint: str) -> str:
        if low <= 0 and high >= 255:
            return x
        return self.node("Clip", [x, self.const(self.u8(max(low, 0)), "clip_min"),
                                  self.const(self.u8(min(high, 255)), "clip_max")], hint + "_clamp")


def _offset_weight(ints: np.ndarray) -> np.ndarray:
    """int8 codes (or zero points) + 128 as uint8: the same products after subtracting the zero point."""
    return (ints.astype(np.int16) + 128).astype(np.uint8)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v, n=2) -> List[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


class _Exporter:
    def __init__(self, gm: fx.GraphModule, meta: Dict[fx.Node, _Meta], kernels: str):
        self.gm, self.meta, self.b = gm, meta, _Builder(kernels)
        self.kernels = kernels
        self.env: Dict[fx.Node, Any] = {}
        self.graph_inputs: List[Any] = []
        self.graph_outputs: List[Any] = []
        self.clamps = 0

    # ----------------------------------------------------------------------------------
    def run(self, input_names, output_names, dynamic_batch: bool):
        helper = self.b.helper
        onnx, _, _ = _onnx()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for k, node in enumerate(placeholders):
            meta = self.meta.get(node)
            if meta is None or meta.quantized or meta.dtype is None or not meta.dtype.is_floating_point:
                raise DAQOnnxExportError(f"input {node.name!r}: only float tensor inputs are supported")
            name = input_names[k] if k < len(input_names) else node.name
            self.b.used[name] += 1
            shape = list(meta.shape)
            if dynamic_batch and shape:
                shape[0] = "batch"
            self.graph_inputs.append(helper.make_tensor_value_info(name, _onnx_dtype(meta.dtype), shape))
            self.env[node] = _Value(name)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                self._output(node, output_names, dynamic_batch)
                continue
            try:
                self.env[node] = self._emit(node)
            except DAQOnnxExportError:
                raise
            except Exception as error:   # pragma: no cover - reported with the node
                raise DAQOnnxExportError(f"exporting node {node.name!r} ({node.op} {node.target}) failed: {error}") \
                    from error
        graph = helper.make_graph(self.b.nodes, "daq_int8", self.graph_inputs, self.graph_outputs,
                                  self.b.initializers)
        return graph

    def _output(self, node: fx.Node, output_names, dynamic_batch):
        helper = self.b.helper
        results = node.args[0]
        flat = list(results) if isinstance(results, (tuple, list)) else [results]
        for k, item in enumerate(flat):
            if not isinstance(item, fx.Node):
                raise DAQOnnxExportError("only tensor outputs are supported")
            v = self.env[item]
            name = v.name
            if v.quantized:                 # a quantized output is returned dequantized
                name = self.b.dequantize(v, "output")
            out_name = output_names[k] if k < len(output_names) else f"output_{k}"
            self.b.nodes.append(helper.make_node("Identity", [name], [out_name], name=self.b.fresh("output_identity")))
            meta = self.meta[item]
            shape = list(meta.shape)
            if dynamic_batch and shape:
                shape[0] = "batch"
            self.graph_outputs.append(helper.make_tensor_value_info(out_name, _onnx_dtype(torch.float32), shape))

    # ----------------------------------------------------------------------------------
    def _val(self, arg) -> _Value:
        if not isinstance(arg, fx.Node) or arg not in self.env or not isinstance(self.env[arg], _Value):
            raise DAQOnnxExportError(f"expected a tensor produced by the graph, got {arg!r}")
        return self.env[arg]

    def _scalar(self, arg):
        if isinstance(arg, fx.Node):
            value = self.meta[arg].value
            return value.item() if isinstance(value, torch.Tensor) else value
        return arg

    def _float(self, v: _Value, hint: str) -> str:
        return self.b.dequantize(v, hint) if v.quantized else v.name

    def _emit(self, node: fx.Node):
        if node.op == "get_attr":
            return None      # scales / zero points are read from the recorded values where used
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(node.target))
        if node.op == "call_method":
            return self._method(node)
        if node.op == "call_function":
            return self._function(node)
        raise DAQOnnxExportError(f"unsupported node {node.name!r} ({node.op})")

    # ----------------------------------------------------------------------------------
    # quantized convolution / linear
    # ----------------------------------------------------------------------------------
    def _qweight(self, module):
        from .convert import ExactQuantizedConv
        if isinstance(module, ExactQuantizedConv):
            ints = module.int_weight.numpy().astype(np.int8)
            bias = None if module.bias is None else module.bias.numpy().astype(np.float32)
            return ints, _f32(module.weight_scales.numpy()), np.zeros(ints.shape[0], np.int8), bias
        weight = module.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                torch.per_channel_affine_float_qparams):
            if weight.q_per_channel_axis() != 0:
                raise DAQOnnxExportError("per-channel weights must be quantized along axis 0")
            scales = weight.q_per_channel_scales().to(torch.float32).numpy()
            zero_points = weight.q_per_channel_zero_points().numpy()
        else:
            scales = np.full(weight.shape[0], float(weight.q_scale()), np.float32)
            zero_points = np.full(weight.shape[0], int(weight.q_zero_point()))
        if weight.dtype != torch.qint8:
            raise DAQOnnxExportError(f"only qint8 weights are supported, got {weight.dtype}")
        ints = weight.int_repr().numpy().astype(np.int8)
        bias = module.bias()
        bias = None if bias is None else bias.detach().to(torch.float32).numpy()
        return ints, _f32(scales), zero_points.astype(np.int8), bias

    def _requantize_integer(self, acc: str, x: _Value, w_scales, bias, out_scale, out_zp, hint, channel_shape):
        """fbgemm's ``ReQuantizeOutput`` (float bias): ``round((acc + b / (s_x s_w)) · (s_x s_w / s_y)) + z_y``."""
        b = self.b
        act_times_w = (np.float32(x.scale) * w_scales).astype(np.float32)
        y = b.node("Cast", [acc], hint + "_acc_f", to=_onnx_dtype(torch.float32))
        if bias is not None:
            y = b.node("Add", [y, b.const((bias / act_times_w).astype(np.float32).reshape(channel_shape), "bias_acc")],
                       hint + "_biased")
        y = b.node("Mul", [y, b.const((act_times_w / np.float32(out_scale)).astype(np.float32).reshape(channel_shape),
                                      "multiplier")], hint + "_scaled")
        q = b.round_to_codes(y, out_zp, hint + "_q")
        return q

    def _qconv(self, node, module, relu: bool):
        b, x = self.b, self._val(node.args[0])
        if not x.quantized:
            raise DAQOnnxExportError(f"{node.name}: quantized conv on a float input")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise DAQOnnxExportError(f"{node.name}: padding_mode={module.padding_mode!r} is not supported")
        ints, w_scales, w_zps, bias = self._qweight(module)
        spatial = ints.ndim - 2
        attrs = dict(strides=_pair(module.stride, spatial), dilations=_pair(module.dilation, spatial),
                     pads=_pair(module.padding, spatial) * 2, group=int(module.groups),
                     kernel_shape=list(ints.shape[2:]))
        if isinstance(module.padding, str):
            raise DAQOnnxExportError(f"{node.name}: string padding {module.padding!r} is not supported")
        out_scale, out_zp = float(module.scale), int(module.zero_point)
        hint = node.name
        if self.kernels == "integer":
            # uint8 weights (int8 + 128, zero point 128): ORT's u8u8 ConvInteger kernel is ~6x faster than u8s8
            inputs = [x.name, b.const(_offset_weight(ints), hint + "_weight_u8"),
                      b.const(b.u8(x.zero_point), "zero_point"),
                      b.const(_offset_weight(w_zps[0] if np.all(w_zps == w_zps[0]) else w_zps), "weight_zero_point")]
            acc = b.node("ConvInteger", inputs, hint + "_acc", **attrs)
            q = self._requantize_integer(acc, x, w_scales, bias, out_scale, out_zp, hint,
                                         (1, -1) + (1,) * spatial)
        else:
            x_f = b.dequantize(x, hint + "_in")
            w_f = self._dq_weight(ints, w_scales, w_zps, hint)
            inputs = [x_f, w_f]
            if bias is not None:
                inputs.append(self._dq_bias(bias, x.scale, w_scales, hint))
            y = b.node("Conv", inputs, hint + "_conv", **attrs)
            q = self._quantize_float(y, relu, out_scale, out_zp, hint)
        if relu:
            q = b.clip_codes(q, out_zp, 255, hint + "_relu")
        return _Value(q, out_scale, out_zp)

    def _quantize_float(self, y, relu: bool, out_scale: float, out_zp: int, hint: str):
        """The qlinear form's output: ``y`` (float) through a ReLU where the zero point keeps negatives, quantized."""
        if relu and out_zp > 0:
            y = self.b.node("Relu", [y], hint + "_relu")
        return self.b.quantize(y, out_scale, out_zp, hint + "_q")

    def _dq_weight(self, ints, w_scales, w_zps, hint):
        b = self.b
        if np.abs(ints.astype(np.int32)).max(initial=0) > SAFE_S8_WEIGHT:
            # uint8 weights (+128, zero point 128): ORT's u8s8 kernels saturate on AVX2 without VNNI
            ints, w_zps = _offset_weight(ints), _offset_weight(w_zps)
        return b.node("DequantizeLinear", [b.const(ints, hint + "_weight"), b.const(w_scales, hint + "_weight_scale"),
                                           b.const(w_zps, hint + "_weight_zero_point")], hint + "_weight_dq", axis=0)

    def _dq_bias(self, bias, x_scale, w_scales, hint):
        b = self.b
        bias_scale = (np.float32(x_scale) * w_scales).astype(np.float32)
        ints = np.clip(np.rint(bias / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
        return b.node("DequantizeLinear", [b.const(ints, hint + "_bias"), b.const(bias_scale, hint + "_bias_scale"),
                                           b.const(np.zeros_like(ints), hint + "_bias_zero_point")],
                      hint + "_bias_dq", axis=0)

    def _qlinear(self, node, module, relu: bool):
        b, x = self.b, self._val(node.args[0])
        if not x.quantized:
            raise DAQOnnxExportError(f"{node.name}: quantized linear on a float input")
        ints, w_scales, w_zps, bias = self._qweight(module)
        out_scale, out_zp = float(module.scale), int(module.zero_point)
        hint = node.name
        if self.kernels == "integer":
            # uint8 weights: ORT's u8s8 MatMulInteger saturates int16 pair sums on AVX2 without VNNI
            # (measured: 255 x 127 products off by up to 2e5), the u8u8 kernel does not
            if not np.all(w_zps == w_zps[0]):
                raise DAQOnnxExportError(f"{node.name}: per-channel weight zero points in a linear layer")
            inputs = [x.name, b.const(_offset_weight(np.ascontiguousarray(ints.T)), hint + "_weight_t_u8"),
                      b.const(b.u8(x.zero_point), "zero_point"), b.const(_offset_weight(w_zps[0]), "weight_zero_point")]
            acc = b.node("MatMulInteger", inputs, hint + "_acc")
            q = self._requantize_integer(acc, x, w_scales, bias, out_scale, out_zp, hint, (-1,))
        else:
            x_f = b.dequantize(x, hint + "_in")
            w_f = self._dq_weight(ints, w_scales, w_zps, hint)
            if len(self.meta[node.args[0]].shape) == 2:
                inputs = [x_f, w_f] + ([self._dq_bias(bias, x.scale, w_scales, hint)] if bias is not None else [])
                y = b.node("Gemm", inputs, hint + "_gemm", transB=1)
            else:
                w_t = b.node("Transpose", [w_f], hint + "_weight_t", perm=[1, 0])
                y = b.node("MatMul", [x_f, w_t], hint + "_matmul")
                if bias is not None:
                    y = b.node("Add", [y, self._dq_bias(bias, x.scale, w_scales, hint)], hint + "_bias")
            q = self._quantize_float(y, relu, out_scale, out_zp, hint)
        if relu:
            q = b.clip_codes(q, out_zp, 255, hint + "_relu")
        return _Value(q, out_scale, out_zp)

    # ----------------------------------------------------------------------------------
    # element-wise quantized ops
    # ----------------------------------------------------------------------------------
    def _qbinary(self, node, op: str, relu: bool):
        b = self.b
        a, c = self._val(node.args[0]), self._val(node.args[1])
        if not (a.quantized and c.quantized):
            raise DAQOnnxExportError(f"{node.name}: quantized {op} needs two quantized operands")
        meta = self.meta[node]
        out_scale, out_zp = meta.scale, meta.zero_point
        hint = node.name
        if op == "Mul":
            if self.kernels != "integer":
                y = b.node("Mul", [b.dequantize(a, hint + "_a"), b.dequantize(c, hint + "_b")], hint + "_mul")
                q = b.quantize(y, out_scale, out_zp, hint + "_q")
            else:   # (a - z_a)(b - z_b) in float (exact for codes), times s_a s_b / s_y
                ai = b.node("Sub", [b.node("Cast", [a.name], hint + "_a_f", to=1), b.const(_f32(a.zero_point), "zp_f")],
                            hint + "_a_c")
                ci = b.node("Sub", [b.node("Cast", [c.name], hint + "_b_f", to=1), b.const(_f32(c.zero_point), "zp_f")],
                            hint + "_b_c")
                y = b.node("Mul", [ai, ci], hint + "_prod")
                multiplier = np.float32(np.float32(a.scale) * np.float32(c.scale) / np.float32(out_scale))
                y = b.node("Mul", [y, b.const(_f32(multiplier), "multiplier")], hint + "_scaled")
                q = b.round_to_codes(y, out_zp, hint + "_q")
        else:
            y = b.node("Add", [b.dequantize(a, hint + "_a"), b.dequantize(c, hint + "_b")], hint + "_add")
            if self.kernels == "integer":    # torch: round(x * (1 / s_y)) + z_y; the Mul also keeps ORT from QLinearAdd
                y = b.node("Mul", [y, b.const(_f32(np.float32(1.0) / np.float32(out_scale)), "inv_scale")],
                           hint + "_scaled")
                q = b.round_to_codes(y, out_zp, hint + "_q")
            else:
                if relu and out_zp > 0:
                    y = b.node("Relu", [y], hint + "_relu")
                q = b.quantize(y, out_scale, out_zp, hint + "_q")
        if relu:
            q = b.clip_codes(q, out_zp, 255, hint + "_relu")
        return _Value(q, out_scale, out_zp)

    def _clamp(self, node, x: _Value, min_val, max_val):
        b = self.b
        if not x.quantized:
            inputs = [x.name, b.const(_f32(-np.inf if min_val is None else min_val), "min"),
                      b.const(_f32(np.inf if max_val is None else max_val), "max")]
            return _Value(b.node("Clip", inputs, node.name))
        # the codes of torch's quantized clamp: the bounds quantized with the tensor's qparams
        bounds = torch.tensor([-1e30 if min_val is None else min_val, 1e30 if max_val is None else max_val],
                              dtype=torch.float32)
        low, high = torch.quantize_per_tensor(bounds, x.scale, x.zero_point, torch.quint8).int_repr().tolist()
        out = b.clip_codes(x.name, low, high, node.name)
        if out != x.name and high < 255:
            self.clamps += 1
        return _Value(out, x.scale, x.zero_point)

    def _qrelu(self, node, x: _Value):
        if not x.quantized:
            return _Value(self.b.node("Relu", [x.name], node.name))
        return _Value(self.b.clip_codes(x.name, x.zero_point, 255, node.name), x.scale, x.zero_point)

    def _global_avg_pool(self, node, x: _Value):
        b = self.b
        if not x.quantized:
            return _Value(b.node("GlobalAveragePool", [x.name], node.name))
        meta = self.meta[node]
        if (meta.scale, meta.zero_point) != (x.scale, x.zero_point):
            raise DAQOnnxExportError(f"{node.name}: average pool changes the qparams")
        # mean of (code - zero point), rounded half to even (torch's quantized adaptive_avg_pool2d)
        centred = b.node("Sub", [b.node("Cast", [x.name], node.name + "_f", to=1), b.const(_f32(x.zero_point), "zp_f")],
                         node.name + "_centred")
        mean = b.node("GlobalAveragePool", [centred], node.name + "_mean")
        return _Value(b.round_to_codes(mean, x.zero_point, node.name), x.scale, x.zero_point)

    def _max_pool(self, node, x: _Value, kernel, stride, padding, dilation, ceil_mode, spatial=2):
        kernel = _pair(kernel, spatial)
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride, spatial)
        out = self.b.node("MaxPool", [x.name], node.name, kernel_shape=kernel, strides=stride,
                          pads=_pair(padding, spatial) * 2, dilations=_pair(dilation, spatial),
                          ceil_mode=int(bool(ceil_mode)))
        return _Value(out, x.scale, x.zero_point)

    def _pad(self, node, x: _Value, pad, value):
        rank = len(self.meta[node.args[0]].shape)
        pad = list(pad)
        begins, ends = [0] * rank, [0] * rank
        for k in range(len(pad) // 2):
            begins[rank - 1 - k], ends[rank - 1 - k] = pad[2 * k], pad[2 * k + 1]
        b = self.b
        if x.quantized:
            if value not in (None, 0):
                raise DAQOnnxExportError(f"{node.name}: only zero padding of quantized tensors is supported")
            fill = b.const(b.u8(x.zero_point), "zero_point")
        else:
            fill = b.const(_f32(0.0 if value is None else value), "pad_value")
        out = b.node("Pad", [x.name, b.const(np.array(begins + ends, np.int64), "pads"), fill], node.name)
        return _Value(out, x.scale, x.zero_point)

    def _flatten(self, node, x: _Value, start: int, end: int):
        rank = len(self.meta[node.args[0]].shape)
        start, end = start % rank, end % rank
        if end == rank - 1:
            out = self.b.node("Flatten", [x.name], node.name, axis=start)
            if start == 0:
                out = self.b.node("Reshape", [out, self.b.const(np.array([-1], np.int64), "shape")], node.name + "_1d")
            return _Value(out, x.scale, x.zero_point)
        return self._reshape(node, x)

    def _reshape(self, node, x: _Value):
        shape = list(self.meta[node].shape)
        if shape:
            shape[0] = -1 if len(shape) > 1 else shape[0]
        out = self.b.node("Reshape", [x.name, self.b.const(np.array(shape, np.int64), "shape")], node.name)
        return _Value(out, x.scale, x.zero_point)

    # ----------------------------------------------------------------------------------
    # float modules (layers DAQ keeps in float, e.g. the first conv / last linear)
    # ----------------------------------------------------------------------------------
    def _float_conv(self, hint, x: _Value, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None):
        b = self.b
        weight = conv.weight.detach().to(torch.float32)
        bias = conv.bias.detach().to(torch.float32) if conv.bias is not None else torch.zeros(weight.shape[0])
        if bn is not None:
            factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight = weight * factor.view(-1, *([1] * (weight.dim() - 1)))
            bias = (bias - bn.running_mean) * factor + bn.bias.detach()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise DAQOnnxExportError(f"{hint}: conv padding {conv.padding!r} / {conv.padding_mode!r} is not supported")
        spatial = weight.dim() - 2
        out = b.node("Conv", [self._float(x, hint + "_in"), b.const(weight.numpy(), hint + "_weight"),
                              b.const(bias.numpy(), hint + "_bias")], hint,
                     strides=_pair(conv.stride, spatial), dilations=_pair(conv.dilation, spatial),
                     pads=_pair(conv.padding, spatial) * 2, group=int(conv.groups),
                     kernel_shape=list(weight.shape[2:]))
        return _Value(out)

    def _float_linear(self, hint, x: _Value, linear: nn.Linear):
        b = self.b
        inputs = [self._float(x, hint + "_in"), b.const(linear.weight.detach().to(torch.float32).numpy(),
                                                        hint + "_weight")]
        if linear.bias is not None:
            inputs.append(b.const(linear.bias.detach().to(torch.float32).numpy(), hint + "_bias"))
        return _Value(b.node("Gemm", inputs, hint, transB=1))

    def _float_sequence(self, node, modules: List[nn.Module], x: _Value) -> _Value:
        k = 0
        while k < len(modules):
            m, hint = modules[k], f"{node.name}_{k}"
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                following = modules[k + 1] if k + 1 < len(modules) else None
                bn = following if isinstance(following, nn.modules.batchnorm._BatchNorm) else None
                x = self._float_conv(hint, x, m, bn)
                k += 2 if bn is not None else 1
                continue
            if isinstance(m, nn.Linear):
                x = self._float_linear(hint, x, m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                b = self.b
                x = _Value(b.node("BatchNormalization", [
                    self._float(x, hint), b.const(m.weight.detach().numpy(), hint + "_gamma"),
                    b.const(m.bias.detach().numpy(), hint + "_beta"), b.const(m.running_mean.numpy(), hint + "_mean"),
                    b.const(m.running_var.numpy(), hint + "_var")], hint, epsilon=float(m.eps)))
            elif isinstance(m, nn.ReLU):
                x = _Value(self.b.node("Relu", [self._float(x, hint)], hint))
            elif isinstance(m, nn.ReLU6):
                x = _Value(self.b.node("Clip", [self._float(x, hint), self.b.const(_f32(0), "min"),
                                                self.b.const(_f32(6), "max")], hint))
            elif isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
                pass
            else:
                raise DAQOnnxExportError(f"{node.name}: float module {type(m).__name__} is not supported")
            k += 1
        return x

    # ----------------------------------------------------------------------------------
    # dispatch
    # ----------------------------------------------------------------------------------
    def _module(self, node: fx.Node, module: nn.Module):
        import torch.ao.nn.intrinsic.quantized as nniq
        import torch.ao.nn.quantized as nnq
        from .convert import ExactQuantizedConv
        x = self._val(node.args[0]) if node.args else None
        if isinstance(module, ExactQuantizedConv):      # a layer kept off fbgemm's saturating kernels
            return (self._qlinear if module.is_linear else self._qconv)(node, module, relu=module.relu)
        if isinstance(module, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d)):
            return self._qconv(node, module, relu=True)
        if hasattr(nniq, "ConvAdd2d") and isinstance(module, (nniq.ConvAdd2d, nniq.ConvAddReLU2d)):
            raise DAQOnnxExportError(f"{node.name}: fused conv-add modules are not supported")
        if isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)):
            return self._qconv(node, module, relu=False)
        if isinstance(module, nniq.LinearReLU):
            return self._qlinear(node, module, relu=True)
        if isinstance(module, nnq.Linear):
            return self._qlinear(node, module, relu=False)
        if isinstance(module, (nnq.Dropout, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)):
            return x
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim, module.end_dim)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = _pair(module.output_size)
            if size != [1, 1]:
                raise DAQOnnxExportError(f"{node.name}: only global average pooling (output size 1) is supported")
            return self._global_avg_pool(node, x)
        if isinstance(module, nn.MaxPool2d):
            return self._max_pool(node, x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  module.ceil_mode)
        if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
            return self._pad(node, x, module.padding, getattr(module, "value", 0))
        if isinstance(module, nn.ReLU):
            return self._qrelu(node, x)
        if isinstance(module, nn.ReLU6) or isinstance(module, nn.Hardtanh):
            low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
            return self._clamp(node, x, low, high)
        if isinstance(module, nn.Sequential):
            return self._float_sequence(node, list(module), x)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return self._float_sequence(node, [module], x)
        raise DAQOnnxExportError(f"{node.name}: module {type(module).__module__}.{type(module).__name__} is not"
                                 " supported by the ONNX exporter")

    def _method(self, node: fx.Node):
        name = node.target
        x = self._val(node.args[0])
        if name == "dequantize":
            return _Value(self.b.dequantize(x, node.name)) if x.quantized else x
        if name in ("contiguous", "detach", "clone"):
            return x
        if name == "flatten":
            return self._flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self._reshape(node, x)
        if name in ("relu", "relu_"):
            return self._qrelu(node, x)
        if name in ("clamp", "clamp_"):
            return self._clamp(node, x, self._scalar(_arg(node, 1, "min")), self._scalar(_arg(node, 2, "max")))
        raise DAQOnnxExportError(f"{node.name}: method .{name}() is not supported by the ONNX exporter")

    def _function(self, node: fx.Node):
        target = node.target
        F = nn.functional
        if target is torch.quantize_per_tensor:
            x = self._val(node.args[0])
            dtype = self._scalar(_arg(node, 3, "dtype"))
            if dtype != torch.quint8:
                raise DAQOnnxExportError(f"{node.name}: only quint8 activations are supported, got {dtype}")
            meta = self.meta[node]
            return _Value(self.b.quantize(x.name, meta.scale, meta.zero_point, node.name), meta.scale,
                          meta.zero_point)
        if target is torch.dequantize:
            x = self._val(node.args[0])
            return _Value(self.b.dequantize(x, node.name)) if x.quantized else x
        if target in (F.hardtanh, F.hardtanh_, torch.clamp, torch.clip):
            x = self._val(node.args[0])
            if target in (F.hardtanh, F.hardtanh_):
                low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            else:
                low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
            return self._clamp(node, x, self._scalar(low), self._scalar(high))
        if target in (F.relu, torch.relu, F.relu_, torch.relu_):
            return self._qrelu(node, self._val(node.args[0]))
        if target is F.relu6:
            return self._clamp(node, self._val(node.args[0]), 0.0, 6.0)
        name = str(target)
        quantized_ops = {"quantized.add": ("Add", False), "quantized.add_relu": ("Add", True),
                         "quantized.mul": ("Mul", False), "quantized.mul_relu": ("Mul", True)}
        if name in quantized_ops:
            op, relu = quantized_ops[name]
            return self._qbinary(node, op, relu)
        if target in (F.max_pool2d, torch.max_pool2d):
            return self._max_pool(node, self._val(node.args[0]), _arg(node, 1, "kernel_size"),
                                  _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
                                  _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False))
        if target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
            if _pair(_arg(node, 1, "output_size")) != [1, 1]:
                raise DAQOnnxExportError(f"{node.name}: only global average pooling (output size 1) is supported")
            return self._global_avg_pool(node, self._val(node.args[0]))
        if target is torch.flatten:
            return self._flatten(node, self._val(node.args[0]), _arg(node, 1, "start_dim", 0),
                                 _arg(node, 2, "end_dim", -1))
        if target in (torch.reshape,):
            return self._reshape(node, self._val(node.args[0]))
        if target is F.pad:
            mode = _arg(node, 2, "mode", "constant")
            if mode != "constant":
                raise DAQOnnxExportError(f"{node.name}: pad mode {mode!r} is not supported")
            return self._pad(node, self._val(node.args[0]), _arg(node, 1, "pad"), _arg(node, 3, "value", None))
        if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
            return self._val(node.args[0])
        if target in (operator.add, torch.add) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            a, c = self._val(node.args[0]), self._val(node.args[1])
            if a.quantized or c.quantized:
                raise DAQOnnxExportError(f"{node.name}: float add of quantized tensors")
            return _Value(self.b.node("Add", [a.name, c.name], node.name))
        if target is F.linear:
            x = self._val(node.args[0])
            weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                raise DAQOnnxExportError(f"{node.name}: F.linear with a computed weight is not supported")
            linear = nn.Linear(1, 1)
            linear.weight = nn.Parameter(_get_attr(self.gm, weight.target).detach())
            linear.bias = None if bias is None else nn.Parameter(_get_attr(self.gm, bias.target).detach())
            return self._float_linear(node.name, x, linear)
        raise DAQOnnxExportError(f"{node.name}: function {getattr(target, '__module__', '')}."
                                 f"{getattr(target, '__name__', target)} is not supported by the ONNX exporter")


def _get_attr(gm: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _onnx_dtype(dtype) -> int:
    from onnx import TensorProto
    return {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.float16: TensorProto.FLOAT16,
            torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.uint8: TensorProto.UINT8}[dtype]


def _merge_clips(model) -> int:
    """Merge chains of uint8 ``Clip`` nodes (a fused ReLU's clip followed by DAQ's clamp) into one."""
    from onnx import numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    merged, removed = 0, set()
    for n in list(graph.node):
        if n.op_type != "Clip" or len(n.input) != 3 or id(n) in removed:
            continue
        first = producers.get(n.input[0])
        if first is None or first.op_type != "Clip" or len(first.input) != 3 or len(consumers[first.output[0]]) != 1 \
                or first.output[0] in outputs or not all(i in inits for i in (*first.input[1:], *n.input[1:])):
            continue
        values = [numpy_helper.to_array(inits[i]) for i in (*first.input[1:], *n.input[1:])]
        if any(v.dtype != np.uint8 for v in values):
            continue
        low, high = max(values[0], values[2]), min(values[1], values[3])
        low_name = first.input[1] if values[0] >= values[2] else n.input[1]
        high_name = first.input[2] if values[1] <= values[3] else n.input[2]
        n.input[0], n.input[1], n.input[2] = first.input[0], low_name, high_name
        if low > high:   # pragma: no cover - an empty range; keep semantics (ONNX Clip: min wins after max)
            continue
        removed.add(id(first))
        merged += 1
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
    return merged


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------

def export_qdq_onnx(model: nn.Module, example_inputs: Tuple[Any, ...], path: Union[str, os.PathLike, None] = None,
                    kernels: str = "integer", *, opset: int = DEFAULT_OPSET, input_names: Sequence[str] = ("input",),
                    output_names: Sequence[str] = ("output",), dynamic_batch: bool = True, check: bool = True):
    """Export a converted DAQ model (:func:`daq_fx.convert_fx`) to ONNX for onnxruntime's int8 kernels.

    Args:
        model: the int model from ``daq_fx.convert_fx(qat)`` (x86 / fbgemm backend), or a prepared
            QAT ``GraphModule`` from :func:`daq_fx.prepare_qat_fx` (converted here with
            ``daq_fx.convert_fx(model, exact=True, example_inputs=example_inputs)``).
        example_inputs: a tuple of float inputs; they are run through the model once to read every
            activation's (scale, zero point) and shape.
        path: where to write the ``.onnx`` file (``None``: only return the model).
        kernels: ``"integer"`` (exact: ``ConvInteger`` / ``MatMulInteger`` and fbgemm's requantisation
            in float32) or ``"qlinear"`` (QDQ that ORT fuses into ``QLinearConv`` / ``QGemm`` /
            ``QLinearAdd``: faster, not exact). See the module docstring.
        opset: ONNX opset (≥ 13; per-channel ``DequantizeLinear``).
        dynamic_batch: make the first dimension of inputs and outputs symbolic (``"batch"``).
        check: run ``onnx.checker`` on the result.

    Returns:
        The ``onnx.ModelProto``. ``model.metadata_props`` records ``daq_kernels`` and
        ``daq_activation_clamps`` (the number of sub-8-bit clamps, see :func:`clamp_count`).

    Raises:
        DAQOnnxExportError: an op of the model has no exporter (the message names the node).
    """
    onnx, helper, _ = _onnx()
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-channel DequantizeLinear), got {opset}")
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"model must be a GraphModule from daq_fx.convert_fx, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    if _is_prepared(model):
        from .convert import convert_fx
        model = convert_fx(model, exact=True, example_inputs=example_inputs)
    model = model.eval()
    recorder = _Recorder(model)
    with torch.no_grad():
        recorder.run(*example_inputs)
    exporter = _Exporter(model, recorder.meta, kernels)
    graph = exporter.run(list(input_names), list(output_names), dynamic_batch)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="daq_fx.export_onnx")
    onnx_model.ir_version = min(onnx_model.ir_version, 9)
    _merge_clips(onnx_model)
    clamps = clamp_count(onnx_model)
    helper.set_model_props(onnx_model, {"daq_kernels": kernels, "daq_activation_clamps": str(clamps)})
    if check:
        onnx.checker.check_model(onnx_model)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx_model, str(path))
    return onnx_model


def _is_prepared(model: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase
    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def clamp_count(model, below: int = 255) -> int:
    """Number of ``Clip`` nodes on uint8 codes whose upper bound is below ``below`` (DAQ's sub-8-bit clamps).

    ``model``: an ``onnx.ModelProto`` or a path.
    """
    onnx, _, numpy_helper = _onnx()
    if not hasattr(model, "graph"):
        model = onnx.load(str(model))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        if n.op_type == "Clip" and len(n.input) == 3 and n.input[2] in inits:
            high = inits[n.input[2]]
            if high.dtype == np.uint8 and int(high) < below:
                count += 1
    return count


def ort_session(path_or_model, threads: int = 1, *, optimization: str = "all", profile: bool = False,
                optimized_model_path: Union[str, os.PathLike, None] = None, spinning: Optional[bool] = None):
    """An onnxruntime CPU ``InferenceSession`` using ``threads`` intra-op threads (1 inter-op thread).

    Args:
        path_or_model: an ``.onnx`` path or an ``onnx.ModelProto``.
        optimization: ``"all"`` (default; ORT's QDQ fusions need it), ``"extended"``, ``"basic"`` or ``"none"``.
        profile: turn ORT's profiler on (see :func:`ort_op_types`).
        optimized_model_path: also write the graph ORT runs after its optimisations.
        spinning: ``False`` stops idle worker threads from spinning (kinder to a shared machine,
            slightly slower); ``None`` keeps ORT's default.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="daq_ort_profile_"), "ort")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    source = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_run(session, *inputs) -> List[torch.Tensor]:
    """Run ``session`` on torch tensors (in the order of the session's inputs); returns torch tensors."""
    feeds = {i.name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
             for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]


def ort_op_types(path_or_model, *inputs, threads: int = 1, runs: int = 1) -> collections.Counter:
    """The op types ORT's CPU provider ran (with how many node executions each), read from its profile.

    A fresh profiling session is built from ``path_or_model`` (ORT optimisations on, as in
    :func:`ort_session`), run ``runs`` times on ``inputs``, and the profile's ``Node`` events are
    counted by ``op_name``. Use it to check that convs run as integer ops::

        ops = ort_op_types("model.onnx", x)
        assert ops["ConvInteger"] + ops["QLinearConv"] > 0 and not ops.keys() & daq_fx.export_onnx.FLOAT_CONV_OPS
    """
    session = ort_session(path_or_model, threads, profile=True)
    for _ in range(runs):
        ort_run(session, *inputs)
    profile = session.end_profiling()
    try:
        with open(profile) as f:
            events = json.load(f)
    finally:
        try:
            os.remove(profile)
            os.rmdir(os.path.dirname(profile))
        except OSError:  # pragma: no cover
            pass
    counts = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name")
            if op:
                counts[op] += 1
    return counts
