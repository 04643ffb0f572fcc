"""DAQ on torchao's pt2e flow (``torch.export`` → ``prepare_qat_pt2e`` → ``convert_pt2e``).

torch 2.14 deprecates ``torch.ao.quantization`` in favour of torchao's pt2e flow. This module
puts the *same* DAQ fake-quant (:class:`daq_fx.DAQFakeQuantize`, numerics in :mod:`daq_core`)
into that flow; it needs ``torchao>=0.15,<0.19`` (``pip install "daq-quant[pt2e]"``)::

    import timm, torch
    from daq_fx import pt2e
    model = timm.create_model("mobilenetv2_100", num_classes=10)
    example = (torch.randn(2, 3, 96, 96),)
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, example), pt2e.DAQQuantizer(4, 4))
    ...  # train qat (quantizer parameters: daq_fx.quantizer_parameters(qat))
    int8 = pt2e.convert_pt2e(qat)                       # q/dq reference model, ints on DAQ's grid
    x86 = pt2e.lower_to_x86(int8, example)              # oneDNN int8 kernels (see ISA note there)

What differs from a plain torchao flow, and why (INTEGRATION-NOTES):

* :class:`DAQQuantizer` annotates like torch.ao's x86 FX backend config: the input of every
  conv / linear, its weight, and the output of the fused ``conv [+ bn] [+ relu/relu6]`` pattern;
  residual ``add [+ relu]``; pooling / flatten / dropout share their input's grid. The fake-quants
  therefore sit where :func:`daq_fx.prepare_qat_fx` puts them and both flows compute the same
  function.
* :func:`convert_pt2e` *bakes* the weights first: pt2e, like torch.ao, quantizes the float (BN-folded)
  weight with ``round(W f / scale)``, which is not DAQ's standardise-and-clip mapping. The weight is
  replaced by ``fq(W f) / f`` (:func:`daq_fx.bake_weight`) so that the folded weight lies on the grid.
* :func:`lower_to_x86` clamps 4-bit (sub-8-bit) activation codes after the oneDNN kernels, which
  saturate at 0..255 and ignore ``quant_max``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import fx, nn

try:
    from torchao.quantization.pt2e import FakeQuantizeBase as _TorchaoFakeQuantizeBase
    from torchao.quantization.pt2e import move_exported_model_to_eval as _torchao_move_to_eval
    from torchao.quantization.pt2e import move_exported_model_to_train as _torchao_move_to_train
    from torchao.quantization.pt2e import quantize_pt2e as _quantize_pt2e
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
        SharedQuantizationSpec,
    )
except ImportError as _error:  # pragma: no cover - exercised only without torchao
    raise ImportError(
        "daq_fx.pt2e needs torchao's pt2e quantization (torchao>=0.15,<0.19): "
        "pip install 'daq-quant[pt2e]'  or  pip install 'torchao>=0.15,<0.19'") from _error

from daq_core import DEFAULT_GAMMA, MAX_INT8_WEIGHT_BITS, check_bits, check_positive, num_levels

from .convert import bake_weight
from .fake_quantize import ACTIVATION, WEIGHT, AveragedActivation, DAQFakeQuantize
from .prepare import initialize_activations_off_lattice, refuse_nonfinite_first_batch

__all__ = [
    "DAQFakeQuantizePT2E",
    "DAQQuantizer",
    "DropPathAsDropout",
    "export_for_qat",
    "prepare_qat_pt2e",
    "convert_pt2e",
    "bake_daq_weights_pt2e",
    "weight_fake_quants",
    "quantized_weights",
    "lower_to_x86",
    "check_x86_lowering",
    "insert_float_clamps",
    "saturation_risk",
    "exact_averages",
    "AveragedActivationPT2E",
    "compile_x86",
    "CompiledX86",
    "move_exported_model_to_eval",
    "move_exported_model_to_train",
    "ONEDNN_ISA_ENV",
    "SAFE_ONEDNN_ISA",
]

aten = torch.ops.aten
_Q_ANNOTATION_KEY = "quantization_annotation"


# --------------------------------------------------------------------------------------
# the fake-quant: DAQFakeQuantize, recognised by torchao
# --------------------------------------------------------------------------------------

class DAQFakeQuantizePT2E(_TorchaoFakeQuantizeBase, DAQFakeQuantize):
    """:class:`daq_fx.DAQFakeQuantize` as a torchao pt2e fake-quant (same numerics, same state).

    torchao recognises fake-quants by ``isinstance(torchao.quantization.pt2e.FakeQuantizeBase)``
    and builds them as ``ctr(dtype=, quant_min=, quant_max=, qscheme=, is_dynamic=)`` from the
    annotation's ``QuantizationSpec``; those arguments are checked against DAQ's grid and
    otherwise ignored. Everything else (forward, first-batch initialisation, ``calculate_qparams``,
    parameters ``lower_bound`` / ``upper_bound`` / ``output_scale``) is :class:`DAQFakeQuantize`'s,
    so :func:`daq_fx.quantizer_parameters` and :func:`daq_fx.bake_weight` work unchanged.
    """

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, gamma: float = DEFAULT_GAMMA, sigma: Optional[float] = None,
                 num_std: float = 3.0, center: Optional[bool] = None, init: str = "mse",
                 factory_kwargs: Optional[dict] = None, *, dtype: Optional[torch.dtype] = None,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 qscheme: Optional[torch.qscheme] = None, is_dynamic: bool = False) -> None:
        DAQFakeQuantize.__init__(self, role=role, bits=bits, ch_axis=ch_axis, signed=signed, gamma=gamma,
                                 sigma=sigma, num_std=num_std, center=center, init=init,
                                 factory_kwargs=factory_kwargs)
        expected = {"quant_min": (quant_min, self.quant_min), "quant_max": (quant_max, self.quant_max),
                    "qscheme": (qscheme, self.qscheme)}
        for name, (given, own) in expected.items():
            if given is not None and given != own:
                raise ValueError(f"QuantizationSpec {name}={given!r} does not describe DAQ's {role} grid at {bits}"
                                 f" bits ({name}={own!r}); build specs with daq_fx.pt2e.DAQQuantizer")
        if dtype is not None and dtype not in (torch.int8, torch.uint8, torch.qint8, torch.quint8):
            raise ValueError(f"DAQ quantizes to int8/uint8, got dtype={dtype!r}")
        if is_dynamic:
            raise ValueError("DAQ quantizers are static (learned bounds): is_dynamic=True is not supported")

    # torchao's base declares these abstract and comes first in the MRO: take DAQ's
    forward = DAQFakeQuantize.forward
    calculate_qparams = DAQFakeQuantize.calculate_qparams


class AveragedActivationPT2E(_TorchaoFakeQuantizeBase, AveragedActivation):
    """:class:`daq_fx.AveragedActivation` for torchao: the shared quantizer after an average (global
    pool, ``mean``) rounds exact ties ``k + 1/2`` of the averaged codes half to even, like an integer
    average kernel, instead of leaving them to float error (see :func:`prepare_qat_pt2e`)."""

    def __init__(self, source: DAQFakeQuantize) -> None:
        AveragedActivation.__init__(self, source)   # (as DAQFakeQuantizePT2E: DAQ's constructor only)

    forward = AveragedActivation.forward
    calculate_qparams = AveragedActivation.calculate_qparams


# --------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------

_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_LINEAR = {aten.linear.default}
_BATCHNORM = {aten.batch_norm.default}
_UNARY = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
_RELU = {aten.relu.default, aten.relu_.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
#: ops that only move, select or average values: their output keeps the input's grid
_SHARED = {aten.max_pool2d.default, aten.max_pool1d.default, aten.avg_pool2d.default,
           aten.adaptive_avg_pool2d.default, aten.mean.dim, aten.flatten.using_ints, aten.dropout.default,
           aten.view.default, aten.reshape.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
           aten.permute.default, aten.clone.default, aten.contiguous.default}
#: padding ops; a zero pad adds 0, a value of every DAQ activation grid, so it shares its input's
#: quantizer too (as in the FX flow: timm's TensorFlow-"SAME" convs export to ``aten.pad``)
_PAD = {aten.pad.default, aten.constant_pad_nd.default}


def _is_zero_pad(node: fx.Node) -> bool:
    if node.target not in _PAD:
        return False
    if node.target is aten.pad.default:   # pad(x, pad, mode="constant", value=None)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and (value is None or value == 0)
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)   # constant_pad_nd(x, pad, value=0)
    return value == 0


def _is_float_tensor_node(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op == "get_attr":
        return False
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _module_path(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def _is_annotated(node: fx.Node) -> bool:
    annotation = node.meta.get(_Q_ANNOTATION_KEY)
    return annotation is not None and annotation._annotated


def _annotate(node: fx.Node, input_qspec_map=None, output_qspec=None) -> None:
    node.meta[_Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=dict(input_qspec_map or {}),
                                                          output_qspec=output_qspec, _annotated=True)


def _single_user(node: fx.Node, targets) -> Optional[fx.Node]:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" and user.target in targets else None


class DAQQuantizer(Quantizer):
    """A torchao pt2e ``Quantizer`` that puts DAQ fake-quants on a ``torch.export``-ed model.

    Annotated (the placement of torch.ao's x86 FX backend config, so that
    :func:`daq_fx.prepare_qat_fx` and this flow quantize the same tensors):

    * ``conv1d/2d/3d`` and ``linear``: input activation, weight (per output channel or per tensor),
      and the output of the fused pattern ``conv [→ batch_norm] [→ relu | hardtanh]``
      (ReLU6 exports as ``hardtanh(0, 6)``; the quantizer after it is capped at 6 by
      :func:`prepare_qat_pt2e`, the same clip :func:`daq_fx.prepare_qat_fx` gives);
    * ``add [→ relu]``: both inputs and the output;
    * pooling, mean, flatten, dropout, view/reshape: output shares the input's quantizer
      (only where the input is quantized).

    Biases stay float (int32 accumulation in the backends); other ops stay float.

    Args:
        weight_bits: 1..7 (DAQ's odd-integer grid ±(2^b - 1) must fit int8).
        act_bits: 1..8.
        per_channel: per-output-channel weight bounds, scale and normalisation (recommended);
            ``False`` is the paper's per-layer form.
        gamma, weight_sigma, act_sigma, act_signed, init: as :func:`daq_fx.get_daq_qconfig`.
        float_module_names: module paths (as in ``model.named_modules()``) whose conv/linear
            layers stay in float, e.g. ``daq_fx.first_and_last_layer_names(model)``.
    """

    def __init__(self, weight_bits: int = 4, act_bits: int = 4, per_channel: bool = True,
                 gamma: float = DEFAULT_GAMMA, weight_sigma: Optional[float] = None,
                 act_sigma: Optional[float] = None, act_signed: Optional[bool] = None, init: str = "mse",
                 float_module_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.weight_bits = check_bits(weight_bits, "weight_bits", MAX_INT8_WEIGHT_BITS)
        self.act_bits = check_bits(act_bits, "act_bits")
        check_positive(gamma, "gamma")
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be True or False, got {per_channel!r}")
        if isinstance(float_module_names, str):
            raise TypeError(f"float_module_names must be a list of module names; write [{float_module_names!r}]")
        self.per_channel = per_channel
        self.float_module_names = tuple(float_module_names)
        n_w, n_a = num_levels(self.weight_bits), num_levels(self.act_bits)
        weight_ctr = DAQFakeQuantizePT2E.with_args(role=WEIGHT, bits=self.weight_bits,
                                                   ch_axis=0 if per_channel else None, gamma=gamma,
                                                   sigma=weight_sigma, init=init)
        act_ctr = DAQFakeQuantizePT2E.with_args(role=ACTIVATION, bits=self.act_bits, gamma=gamma, sigma=act_sigma,
                                                signed=act_signed, init=init)
        # one spec object each: equal specs on an op's output and its users' input edges share one fake-quant
        self.weight_spec = QuantizationSpec(
            dtype=torch.int8, observer_or_fake_quant_ctr=weight_ctr, quant_min=-n_w, quant_max=n_w,
            qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
            ch_axis=0 if per_channel else None)
        self.act_spec = QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=act_ctr, quant_min=0,
                                         quant_max=n_a, qscheme=torch.per_tensor_affine)

    def _is_float_module(self, node: fx.Node) -> bool:
        if not self.float_module_names:
            return False
        paths = _module_path(node)
        return any(path == name or path.startswith(name + ".") for path in paths for name in self.float_module_names)

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        act, weight = self.act_spec, self.weight_spec
        quantized = set()          # nodes whose output carries a DAQ activation quantizer
        for node in model.graph.nodes:
            if node.op != "call_function" or _is_annotated(node):
                continue
            if node.target in _CONV or node.target in _LINEAR:
                x, w = node.args[0], node.args[1]
                if self._is_float_module(node) or not isinstance(w, fx.Node) or not _is_float_tensor_node(x):
                    continue
                if node.target in _CONV and w.meta.get("val") is not None and w.meta["val"].dim() < 3:
                    continue
                last = node
                bn = _single_user(node, _BATCHNORM) if node.target in _CONV else None
                if bn is not None:
                    last = bn
                unary = _single_user(last, _UNARY)
                if unary is not None:
                    last = unary
                _annotate(node, {x: act, w: weight}, act if last is node else None)
                for inner in (bn, unary):
                    if inner is not None:
                        _annotate(inner, output_qspec=act if inner is last else None)
                quantized.add(last)
            elif node.target in _ADD:
                a, b = node.args[0], node.args[1]
                if not (_is_float_tensor_node(a) and _is_float_tensor_node(b)) or self._is_float_module(node):
                    continue      # e.g. BN's num_batches_tracked += 1, or a scalar add
                relu = _single_user(node, _RELU)
                _annotate(node, {a: act, b: act}, act if relu is None else None)
                if relu is not None:
                    _annotate(relu, output_qspec=act)
                quantized.add(relu or node)
            elif node.target in _SHARED or _is_zero_pad(node):
                source = node.args[0]
                if not isinstance(source, fx.Node) or source not in quantized:
                    continue
                _annotate(node, {source: act}, SharedQuantizationSpec((source, node)))
                quantized.add(node)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------

def export_for_qat(model: nn.Module, example_inputs: Tuple[Any, ...], *, dynamic_batch: bool = True,
                   **export_kwargs) -> fx.GraphModule:
    """``torch.export.export(model.train(), example_inputs).module()``: the graph pt2e QAT starts from.

    Export in train mode (BatchNorm with batch statistics, as QAT trains); timm models need no
    rewriting (``BatchNormAct2d`` exports to ``batch_norm`` + activation, ``ReLU6`` to
    ``hardtanh(0, 6)``) except timm's ``DropPath`` with ``drop_prob > 0``, exported as
    :class:`DropPathAsDropout` so that it follows :func:`move_exported_model_to_eval` / ``_train``
    (``model`` itself is left as it was). Zero BN γ (timm ``zero_init_last``) is rejected as in
    the FX flow.
    ``dynamic_batch`` (default) leaves the first dimension of every tensor input dynamic (otherwise
    the exported graph only accepts the example's batch size); ``export_kwargs`` go to
    ``torch.export.export`` (``dynamic_shapes=`` there overrides it).
    """
    from .prepare import check_batchnorm
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of inputs, e.g. (torch.randn(1, 3, 224, 224),)")
    check_batchnorm(model)
    model.train()
    if dynamic_batch and "dynamic_shapes" not in export_kwargs:
        export_kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) else None
                                                for x in example_inputs)
    swapped = _swap_drop_paths(model)
    try:
        return torch.export.export(model, example_inputs, **export_kwargs).module()
    finally:
        for parent, child, original in swapped:
            setattr(parent, child, original)


class DropPathAsDropout(nn.Module):
    """timm's ``DropPath`` (stochastic depth, ``scale_by_keep=True``) written with ``F.dropout``.

    ``torch.export`` in train mode turns ``DropPath``'s ``if not self.training`` into ``bernoulli_``
    ops that stay in the graph: after ``move_exported_model_to_eval`` the model still dropped
    residual branches. Here the per-sample mask is ``dropout(ones(B, 1, ...), p)``, an
    ``aten.dropout`` that :func:`move_exported_model_to_eval` switches off (the mask becomes
    exactly 1) and :func:`move_exported_model_to_train` back on.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x.new_ones((x.shape[0],) + (1,) * (x.dim() - 1))
        return x * torch.nn.functional.dropout(mask, self.drop_prob, self.training)


def _swap_drop_paths(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Replace (in place; the caller restores) timm ``DropPath(drop_prob > 0, scale_by_keep)`` modules."""
    try:
        from timm.layers import DropPath
    except ImportError:  # pragma: no cover - timm is a dependency
        return []
    swapped = []
    for parent in list(model.modules()):
        for child, module in list(parent.named_children()):
            if type(module) is DropPath and module.drop_prob > 0 and getattr(module, "scale_by_keep", True):
                replacement = DropPathAsDropout(module.drop_prob)
                replacement.train(module.training)
                setattr(parent, child, replacement)
                swapped.append((parent, child, module))
    return swapped


def _evaluate(node: Any, model: fx.GraphModule, cache: Dict[fx.Node, Any]):
    """Value of a node that depends only on parameters / buffers (no placeholders)."""
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return type(node)(_evaluate(a, model, cache) for a in node)
        return node
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = model
        for part in node.target.split("."):
            value = getattr(value, part)
    elif node.op == "call_function":
        args = _evaluate(tuple(node.args), model, cache)
        kwargs = {k: _evaluate(v, model, cache) for k, v in node.kwargs.items()}
        value = node.target(*args, **kwargs)
    else:
        raise ValueError(f"node {node.name} ({node.op}) depends on the model's inputs")
    cache[node] = value
    return value


def weight_fake_quants(model: fx.GraphModule) -> List[Tuple[str, DAQFakeQuantizePT2E, Optional[torch.Tensor]]]:
    """``(weight name, fake-quant, fold factor)`` for every DAQ weight quantizer of a prepared model.

    In the order of the conv / linear ops that use them (the order of :func:`quantized_weights`).

    The fake-quant sees ``weight * fold_factor`` (pt2e's QAT Conv-BN fold, ``γ / sqrt(running_var +
    eps)`` reshaped to the weight's output axis) or the weight itself (``fold_factor`` ``None``).
    """
    found, seen = [], set()
    with torch.no_grad():
        for consumer in model.graph.nodes:       # in the order of the conv / linear ops that use them
            if consumer.op != "call_function" or (consumer.target not in _CONV and consumer.target not in _LINEAR):
                continue
            node = consumer.args[1]
            if not isinstance(node, fx.Node) or node.op != "call_module" or node in seen:
                continue
            seen.add(node)
            fq = model.get_submodule(node.target)
            if not isinstance(fq, DAQFakeQuantize) or not fq.is_weight:
                continue
            source = node.args[0]
            factor = None
            if source.op == "call_function" and source.target is aten.mul.Tensor and \
                    isinstance(source.args[0], fx.Node) and source.args[0].op == "get_attr":
                factor = _evaluate(source.args[1], model, {}).detach()
                source = source.args[0]
            if source.op != "get_attr":
                raise ValueError(f"weight quantizer {node.target!r}: unexpected weight subgraph {source.format_node()}")
            found.append((source.target, fq, factor))
    return found


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    value = model
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _apply_relu6_caps(model: fx.GraphModule) -> int:
    count = 0
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        fq = model.get_submodule(node.target)
        source = node.args[0]
        if not isinstance(fq, DAQFakeQuantize) or fq.is_weight or not isinstance(source, fx.Node):
            continue
        if source.op == "call_function" and source.target in (aten.hardtanh.default, aten.hardtanh_.default):
            low = source.args[1] if len(source.args) > 1 else source.kwargs.get("min_val", -1.0)
            high = source.args[2] if len(source.args) > 2 else source.kwargs.get("max_val", 1.0)
            if low == 0 and high > 0:
                fq.set_upper_limit(float(high))
                count += 1
    return count


#: aten dropouts, all ``(input, p, train)``
_DROPOUTS = {getattr(aten, name).default for name in (
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "feature_alpha_dropout_") if hasattr(aten, name)}
#: ``model.meta`` key: for each dropout in graph order, whether it follows train / eval
_DROPOUT_MODES = "daq_dropout_follows_mode"


def _dropouts(model: fx.GraphModule) -> List[fx.Node]:
    return [node for node in model.graph.nodes if node.op == "call_function" and node.target in _DROPOUTS]


def _dropout_state(node: fx.Node) -> Tuple[Any, Any]:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return p, train


def _move_keeping_dropouts(model: fx.GraphModule, training: bool, torchao_move) -> fx.GraphModule:
    """torchao's move function, then every dropout gets back its own ``p`` and the right ``train`` flag.

    torchao switches dropout by replacing ``aten.dropout(x, p, train)`` with a pattern traced at
    ``p = 0.5``, matched with ``ignore_literals=True``: after ``move_exported_model_to_eval`` and
    back to train every ``aten.dropout`` had ``p = 0.5`` (a ``resnet18(drop_rate=0.2)`` trained
    on with 0.5), and a dropout exported off (``training=False`` in the model's code) was switched
    on. torchao's replacement keeps the number and order of the dropout nodes, so they are restored
    by position from the record :func:`prepare_qat_pt2e` keeps (``feature_dropout`` and
    ``alpha_dropout`` variants, which torchao does not switch, are switched here too).
    """
    before = [_dropout_state(node) for node in _dropouts(model)]
    follows = model.meta.get(_DROPOUT_MODES)
    if follows is None or len(follows) != len(before):
        follows = [True] * len(before)
    torchao_move(model)
    after = _dropouts(model)
    if len(after) != len(before):
        raise RuntimeError(f"torchao's move to {'train' if training else 'eval'} changed the number of dropout ops"
                           f" ({len(before)} -> {len(after)}); cannot restore their rates")
    changed = False
    for node, (p, train), follow in zip(after, before, follows):
        wanted = (p, training if follow else train)
        if _dropout_state(node) != wanted:
            node.args = (node.args[0], *wanted) + tuple(node.args[3:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("p", "train")}
            changed = True
    if changed:
        model.recompile()
    return model


def move_exported_model_to_eval(model: fx.GraphModule) -> fx.GraphModule:
    """torchao's ``move_exported_model_to_eval`` (BatchNorm, dropout off) keeping each dropout's rate.

    See :func:`_move_keeping_dropouts`: torchao's own function left every ``aten.dropout`` at
    ``p = 0.5`` once the model went back to train.
    """
    return _move_keeping_dropouts(model, False, _torchao_move_to_eval)


def move_exported_model_to_train(model: fx.GraphModule) -> fx.GraphModule:
    """torchao's ``move_exported_model_to_train`` keeping each dropout's rate (and a dropout exported
    off, off)."""
    return _move_keeping_dropouts(model, True, _torchao_move_to_train)


def prepare_qat_pt2e(model, quantizer: Quantizer) -> fx.GraphModule:
    """torchao's ``prepare_qat_pt2e`` plus DAQ's weight initialisation and ReLU6 caps.

    Args:
        model: the result of :func:`export_for_qat` / ``torch.export.export(...).module()``
            (an ``ExportedProgram`` is accepted too), exported in train mode.
        quantizer: usually :class:`DAQQuantizer`.

    Returns:
        The QAT ``GraphModule``: train it as is; switch with :func:`move_exported_model_to_eval` /
        :func:`move_exported_model_to_train` (``.eval()`` is not allowed on pt2e models). Every DAQ
        weight quantizer is initialised from its (BN-folded) weight, so an optimizer over
        ``daq_fx.quantizer_parameters(model)`` may be built right away; activation bounds are set by
        the first training batch (moved off the input lattice as in ``daq_fx.prepare_qat_fx``, see
        :func:`daq_fx.prepare.initialize_activations_off_lattice`).
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, fx.GraphModule):
        raise TypeError("model must be an exported GraphModule: daq_fx.pt2e.export_for_qat(model, example_inputs)"
                        f" or torch.export.export(model, example_inputs).module(); got {type(model).__name__}")
    prepared = _quantize_pt2e.prepare_qat_pt2e(model, quantizer)
    # exported in train mode: a dropout with train=True follows the mode, one with train=False stays off
    prepared.meta[_DROPOUT_MODES] = [_dropout_state(node)[1] is True for node in _dropouts(prepared)]
    _name_quantizers(prepared)
    with torch.no_grad():
        for name, fq, factor in weight_fake_quants(prepared):
            if fq.initialized[0] == 0:
                weight = _weight(prepared, name)
                fq.initialize(weight if factor is None else weight * factor)
    prepared.meta["daq_relu6_caps"] = _apply_relu6_caps(prepared)
    prepared.meta["daq_averaged_activations"] = _route_averages(prepared)
    # first-batch activation grids off the input lattice, as in daq_fx.prepare_qat_fx (exact ties
    # would round differently in the QAT model and the lowered int kernels)
    initialize_activations_off_lattice(prepared)
    refuse_nonfinite_first_batch(prepared)    # a NaN / Inf first batch is refused before any state changes
    return prepared


#: ops that average values of one grid (their output shares the input's quantizer)
_AVERAGES = {aten.adaptive_avg_pool2d.default, aten.mean.dim, aten.avg_pool2d.default}


def _route_averages(prepared: fx.GraphModule) -> int:
    """Send the (shared) quantizer call after each average through an :class:`AveragedActivationPT2E`.

    The average of codes ``c_i`` is often an exact tie ``k + 1/2`` (a 2x2 or 8x8 pool of integers).
    The float QAT graph computes it from dequantized values, where float error breaks the tie at
    random, and so would any kernel (eager q/dq, Inductor's C++, oneDNN) in its own way: the models
    split there (measured on the trained ResNet-20's 8x8 global pool: 0.7 % of the pooled codes).
    As in ``daq_fx.prepare_qat_fx``, the QAT model rounds such ties half to even, and
    :func:`convert_pt2e` computes averages on the codes exactly (:func:`exact_averages`).
    Returns the number of averages routed.
    """
    count = 0
    for node in list(prepared.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_function" or source.target not in _AVERAGES:
            continue
        fq = prepared.get_submodule(node.target)
        if not isinstance(fq, DAQFakeQuantize) or fq.is_weight:
            continue
        name = f"{node.target}_averaged_{count}"
        prepared.add_submodule(name, AveragedActivationPT2E(fq))
        node.target = name
        count += 1
    if count:
        prepared.recompile()
    return count


def _name_quantizers(prepared: fx.GraphModule) -> None:
    """``name`` of each DAQ quantizer (for messages): its module name and the op / module path it quantizes."""
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        fq = prepared.get_submodule(node.target)
        if not isinstance(fq, DAQFakeQuantize) or fq.name:
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node):
            paths = _module_path(source)
            where = f" in {paths[-1]!r}" if paths and paths[-1] else ""
            fq.name = f"{node.target} ({source.name}{where})"
        else:
            fq.name = node.target


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------

@torch.no_grad()
def bake_daq_weights_pt2e(model: fx.GraphModule) -> List[str]:
    """Write ``fq(W f) / f`` into every DAQ-quantized weight and switch its fake-quant off.

    pt2e's convert folds BN into the weight (``W f``) and quantizes it with ``round(W f / scale)``;
    after baking that lands exactly on DAQ's odd-integer grid. The QAT model's output is unchanged
    (to ~1 ulp). In place; returns the baked weights' names.
    """
    baked = []
    for name, fq, factor in weight_fake_quants(model):
        if fq.fake_quant_enabled[0] == 0:
            continue
        weight = _weight(model, name)
        if factor is not None and bool((factor == 0).any()):
            raise ValueError(f"weight {name!r}: BatchNorm gamma is zero in some channel, the folded weight cannot"
                             " be baked. Re-initialise gamma (timm: zero_init_last=False) and retrain.")
        if fq.initialized[0] == 0:
            fq.initialize(weight if factor is None else weight * factor)
        weight.copy_(bake_weight(fq, weight, factor))
        fq.disable_fake_quant()
        fq.disable_observer()
        baked.append(name)
    return baked


def convert_pt2e(model: fx.GraphModule, *, inplace: bool = False, use_reference_representation: bool = False,
                 fold_quantize: bool = True) -> fx.GraphModule:
    """Bake DAQ weights, then torchao's ``convert_pt2e``: a q/dq model with int8 weights on DAQ's grid.

    The result computes in float between ``quantize_per_tensor`` / ``dequantize_per_tensor`` pairs
    that clamp to ``quant_min..quant_max`` (4-bit activations stay 0..15), so it reproduces the QAT
    model in eval. For oneDNN int8 kernels pass it to :func:`lower_to_x86`.

    Args:
        model: from :func:`prepare_qat_pt2e`, trained.
        inplace: convert ``model`` itself (default: a deep copy; the QAT model stays usable).
        use_reference_representation, fold_quantize: as torchao's ``convert_pt2e``.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"model must be a prepared GraphModule, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    move_exported_model_to_eval(model)
    bake_daq_weights_pt2e(model)
    converted = _quantize_pt2e.convert_pt2e(model, use_reference_representation=use_reference_representation,
                                            fold_quantize=fold_quantize)
    converted.meta["daq_exact_averages"] = exact_averages(converted)
    return converted


def exact_averages(converted: fx.GraphModule) -> int:
    """Compute each ``dequantize → average → quantize`` (same qparams) on the integer codes.

    ``round_half_even(avg(code − z)) + z`` in float32: the codes and their sums are exact integers, a
    power-of-two count divides exactly, and any other count cannot produce a tie (the true average is
    at least ``1 / (2N)`` from one), so the result is the exact integer average whichever kernel runs
    it (eager, Inductor's C++) — the rounding :class:`AveragedActivationPT2E` gives the QAT model.
    In place; returns the number of averages rewritten.
    """
    graph = converted.graph
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _AVERAGES or len(node.users) != 1:
            continue
        dq, q = node.args[0], next(iter(node.users))
        if not (isinstance(dq, fx.Node) and dq.op == "call_function" and dq.target is dequantize
                and q.op == "call_function" and q.target is quantize):
            continue
        codes, scale, zero_point, quant_min, quant_max, dtype = dq.args[:6]
        if tuple(q.args[1:6]) != (scale, zero_point, quant_min, quant_max, dtype) or \
                not isinstance(zero_point, int):
            continue
        with graph.inserting_before(node):
            centred = graph.call_function(aten.sub.Tensor, (
                graph.call_function(aten._to_copy.default, (codes,), {"dtype": torch.float32}), zero_point))
            average = graph.call_function(node.target, (centred, *node.args[1:]), dict(node.kwargs))
            shifted = graph.call_function(aten.add.Tensor, (graph.call_function(aten.round.default, (average,)),
                                                            zero_point))
            clamped = graph.call_function(aten.clamp.default, (shifted, quant_min, quant_max))
            result = graph.call_function(aten._to_copy.default, (clamped,), {"dtype": dtype})
        q.replace_all_uses_with(result)
        graph.erase_node(q)
        graph.erase_node(node)
        if not dq.users:
            graph.erase_node(dq)
        count += 1
    if count:
        graph.lint()
        converted.recompile()
    return count


_DEQUANTIZE_WEIGHT = {torch.ops.quantized_decomposed.dequantize_per_channel.default,
                      torch.ops.quantized_decomposed.dequantize_per_tensor.default}


def quantized_weights(converted: fx.GraphModule) -> List[torch.Tensor]:
    """The int8 weight tensors of a converted model's conv / linear ops, in graph order."""
    found = []
    for node in converted.graph.nodes:
        if node.op != "call_function" or (node.target not in _CONV and node.target not in _LINEAR):
            continue
        dq = node.args[1]
        if isinstance(dq, fx.Node) and dq.op == "call_function" and dq.target in _DEQUANTIZE_WEIGHT \
                and dq.args[0].op == "get_attr":
            found.append(_weight(converted, dq.args[0].target))
    return found


# --------------------------------------------------------------------------------------
# lowering to x86 (oneDNN)
# --------------------------------------------------------------------------------------

#: oneDNN reads its ISA cap from this variable once, when the library first runs
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
#: on the project's VMs the lowered kernels die with SIGILL ("Illegal instruction") above this ISA
SAFE_ONEDNN_ISA = "AVX512_CORE_VNNI"

_CHECK_SCRIPT = r"""
import torch
torch.manual_seed(0)
conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
x = torch.randn(1, 3, 8, 8)
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer, get_default_x86_inductor_quantization_config)
from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
m = torch.export.export(conv, (x,)).module()
m = prepare_pt2e(m, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
m(x)
m = lower_pt2e_quantized_to_x86(convert_pt2e(m), (x,))
with torch.no_grad():
    m(x)
assert "onednn" in m.code
print("ok")
"""


def check_x86_lowering(timeout: float = 300.0) -> Tuple[bool, str]:
    """Run a tiny lowered x86 int8 model in a *subprocess* and report ``(works, explanation)``.

    Some (virtual) CPUs advertise instructions that oneDNN's JIT then uses and the CPU cannot
    execute: the process dies with SIGILL ("Illegal instruction"), which Python cannot catch.
    Capping oneDNN with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` (set *before* the first oneDNN call
    in the process, i.e. in the shell or at the top of the script) avoided it on the project's VMs.
    """
    env = dict(os.environ)
    try:
        result = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT], env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the lowering check did not finish within {timeout:.0f} s"
    if result.returncode == 0 and "ok" in result.stdout:
        return True, f"x86 int8 kernels run ({ONEDNN_ISA_ENV}={env.get(ONEDNN_ISA_ENV, 'unset')})"
    if result.returncode == -4:   # SIGILL
        return False, (f"lowered oneDNN kernels crash with 'Illegal instruction' (SIGILL) on this CPU "
                       f"({ONEDNN_ISA_ENV}={env.get(ONEDNN_ISA_ENV, 'unset')}). Set "
                       f"{ONEDNN_ISA_ENV}={SAFE_ONEDNN_ISA} in the environment before starting Python.")
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    return False, f"the lowering check failed (exit {result.returncode}): " + " | ".join(tail)


def _check_isa_env(check: Optional[bool]) -> None:
    if os.environ.get(ONEDNN_ISA_ENV):
        return
    if check is None:
        check = True
    if not check:
        warnings.warn(f"{ONEDNN_ISA_ENV} is not set: on CPUs whose advertised ISA oneDNN cannot use, the lowered"
                      f" kernels abort the process with 'Illegal instruction'; if that happens set"
                      f" {ONEDNN_ISA_ENV}={SAFE_ONEDNN_ISA}.", RuntimeWarning, stacklevel=3)
        return
    works, message = check_x86_lowering()
    if not works:
        raise RuntimeError(f"lower_to_x86: {message}")


def _activation_ranges(converted: fx.GraphModule) -> Dict[Tuple[float, int], Tuple[int, int]]:
    """``(scale, zero_point) -> (quant_min, quant_max)`` of every uint8 per-tensor quantize op."""
    ranges = {}
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    for node in converted.graph.nodes:
        if node.op == "call_function" and node.target is quantize and node.args[5] == torch.uint8:
            scale, zero_point, low, high = node.args[1:5]
            ranges[(float(scale), int(zero_point))] = (int(low), int(high))
    return ranges


def _schema_argument(node: fx.Node, name: str):
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return node.kwargs.get(name, argument.default_value)
    return None


def _insert_uint8_clamps(lowered: fx.GraphModule, ranges) -> int:
    """Clamp the uint8 output codes of fused oneDNN ops to their activation's ``quant_min..quant_max``."""
    count = 0
    for node in list(lowered.graph.nodes):
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.name.startswith("onednn::"):
            continue
        scale, zero_point = _schema_argument(node, "output_scale"), _schema_argument(node, "output_zero_point")
        value = node.meta.get("val")
        if not isinstance(scale, (int, float)) or not isinstance(zero_point, int) or \
                not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            continue
        key = (float(scale), int(zero_point))
        if key not in ranges or ranges[key] == (0, 255):
            continue
        low, high = ranges[key]
        users = list(node.users)
        with lowered.graph.inserting_after(node):
            clamp = lowered.graph.call_function(aten.clamp.default, (node, low, high))
        clamp.meta["val"] = value
        for user in users:
            user.replace_input_with(node, clamp)
        count += 1
    lowered.graph.lint()
    lowered.recompile()
    return count


def lower_to_x86(converted: fx.GraphModule, example_inputs: Tuple[Any, ...], *, exact: bool = True,
                 check_isa: Optional[bool] = None) -> fx.GraphModule:
    """Lower a :func:`convert_pt2e` model to oneDNN int8 kernels (torchao's ``lower_pt2e_quantized_to_x86``).

    Args:
        exact: clamp the uint8 outputs of fused oneDNN conv / linear kernels to the activation's
            ``quant_min..quant_max`` (the kernels saturate at 0..255 only, so a 4-bit activation above
            its learned bound would otherwise keep codes > 15 and differ from the QAT model).
        check_isa: if ``ONEDNN_MAX_CPU_ISA`` is unset, first run a tiny lowered model in a subprocess
            (default) and raise a ``RuntimeError`` that explains the fix instead of letting this process
            die of "Illegal instruction"; ``False`` only warns. Nothing is checked when the variable is set.

    Raises:
        RuntimeError: torchao has no x86 lowering, or the lowered kernels cannot run on this CPU.
    """
    try:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
        # importing torchao's x86 quantizer registers the int8 weight-prepack / qconv / qlinear fusion
        # patterns with inductor's freezing passes (without it the lowering leaves a float q/dq graph)
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as error:  # pragma: no cover - torchao < 0.15
        raise RuntimeError("this torchao has no torchao.quantization.pt2e.lowering.lower_pt2e_quantized_to_x86;"
                           " use torchao>=0.15,<0.19") from error
    _check_isa_env(check_isa)
    ranges = _activation_ranges(converted)
    with torch.no_grad():
        lowered = lower_pt2e_quantized_to_x86(converted, tuple(example_inputs))
    lowered.meta["daq_activation_clamps"] = _insert_uint8_clamps(lowered, ranges) if exact else 0
    lowered.meta["daq_onednn_ops"] = sum(1 for node in lowered.graph.nodes if node.op == "call_function"
                                         and str(getattr(node.target, "_schema", "")).startswith("onednn::"))
    if lowered.meta["daq_onednn_ops"] == 0:
        warnings.warn("lower_to_x86: no oneDNN int8 op was fused; the model runs as a float q/dq graph",
                      RuntimeWarning, stacklevel=2)
    return lowered


# --------------------------------------------------------------------------------------
# torch.compile (Inductor, freezing): fused oneDNN int8 kernels
# --------------------------------------------------------------------------------------

_QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
_CLAMPABLE_PRODUCERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
_RELU_OPS = {aten.relu.default, aten.relu_.default}
_HARDTANH_OPS = {aten.hardtanh.default, aten.hardtanh_.default}


def insert_float_clamps(converted: fx.GraphModule) -> int:
    """Clamp conv / linear outputs in float right before each sub-8-bit ``quantize_per_tensor``.

    Inductor's x86 int8 lowering fuses ``dequantize → conv / linear [→ relu | hardtanh] → quantize``
    into one oneDNN kernel (``onednn.qconv_pointwise`` / ``qlinear_pointwise``) whose uint8 output
    saturates at 0..255: the quantize op's ``quant_max`` (15 for a 4-bit activation) is dropped. This
    pass writes the clamp into the graph as ``clamp_max(clamp_min(y, (qmin − z)·s), (qmax − z)·s)``
    (merged with a ReLU / ReLU6 already there), the pattern Inductor fuses as the kernel's
    ``hardtanh`` post-op: the clamp runs inside the int8 kernel, and rounding the clamped float gives
    exactly the clamped codes (the bounds are codes, far from rounding ties). The q/dq model's output
    is unchanged (the quantize op clamps to the same codes). In place; returns the number of clamps.
    """
    graph = converted.graph
    count = 0
    for q in list(graph.nodes):
        if q.op != "call_function" or q.target is not _QUANTIZE:
            continue
        y, scale, zero_point, quant_min, quant_max, dtype = q.args[:6]
        if dtype != torch.uint8 or (quant_min, quant_max) == (0, 255) or not isinstance(y, fx.Node):
            continue
        if not all(isinstance(v, (int, float)) for v in (scale, zero_point, quant_min, quant_max)):
            continue
        low, high = (quant_min - zero_point) * scale, (quant_max - zero_point) * scale
        source, unary = y, None
        if source.op == "call_function" and source.target in (_RELU_OPS | _HARDTANH_OPS) and len(source.users) == 1:
            unary = source
            if source.target in _RELU_OPS:
                a, b = 0.0, float("inf")
            else:
                a = source.args[1] if len(source.args) > 1 else source.kwargs.get("min_val", -1.0)
                b = source.args[2] if len(source.args) > 2 else source.kwargs.get("max_val", 1.0)
            low, high = max(low, float(a)), min(high, float(b))
            source = source.args[0]
        if not (source.op == "call_function" and source.target in _CLAMPABLE_PRODUCERS):
            continue
        with graph.inserting_before(q):
            clamp_min = graph.call_function(aten.clamp_min.default, (source, low))
            clamp_max = graph.call_function(aten.clamp_max.default, (clamp_min, high))
        for node in (clamp_min, clamp_max):
            if "val" in source.meta:
                node.meta["val"] = source.meta["val"]
        q.replace_input_with(y, clamp_max)
        if unary is not None and not unary.users:
            graph.erase_node(unary)
        count += 1
    graph.lint()
    converted.recompile()
    return count


def _summarize_x86_code(source: str) -> Dict[str, int]:
    import re
    kernels = re.findall(r"torch\.ops\.onednn\.(q\w+?)_pointwise(?:\.\w+)?\((.*?)\)\n", source)
    summary = {"qconv": 0, "qlinear": 0, "hardtanh_post_ops": 0, "onednn_int8_ops": 0}
    for name, args in kernels:
        summary["onednn_int8_ops"] += 1
        if name.startswith("qconv"):
            summary["qconv"] += 1
        elif name.startswith("qlinear"):
            summary["qlinear"] += 1
        if "'hardtanh'" in args:
            summary["hardtanh_post_ops"] += 1
    summary["float_convs"] = len(re.findall(r"= (?:extern_kernels\.(?:convolution|mkldnn_convolution)|"
                                            r"torch\.ops\.mkldnn\._convolution_pointwise(?:\.\w+)?)\(", source))
    return summary


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and ("avx512_vnni" in line or "avx_vnni" in line) for line in f)
    except OSError:  # pragma: no cover - not Linux: assume a modern CPU
        return True


def saturation_risk(converted: fx.GraphModule, limit: int = 32767) -> List[str]:
    """Conv / linear nodes of a q/dq model whose int8 kernel can saturate int16 pair sums on CPUs without
    VNNI: ``2 · q_max(input) · max|w| > limit`` (7-bit weights with 8-bit activations; see
    ``daq_fx.ExactQuantizedConv`` for the FX flow's fix)."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    risky = []
    for node in converted.graph.nodes:
        if node.op != "call_function" or node.target not in (_CONV | _LINEAR) or len(node.args) < 2:
            continue
        x, w = node.args[0], node.args[1]
        if not (isinstance(x, fx.Node) and x.target is dequantize and isinstance(w, fx.Node)
                and w.target in _DEQUANTIZE_WEIGHT and w.args[0].op == "get_attr"):
            continue
        quant_max = x.args[4] if len(x.args) > 4 else 255
        max_weight = int(_weight(converted, w.args[0].target).to(torch.int32).abs().max())
        if 2 * int(quant_max) * max_weight > limit:
            risky.append(node.name)
    return risky


class CompiledX86(nn.Module):
    """A ``torch.compile``-d (Inductor, freezing) converted DAQ model: call it like the model.

    Runs under ``torch.no_grad()`` (Inductor freezes weights only without autograd). Attributes:
    ``compiled`` (the ``torch.compile`` module), ``activation_clamps`` (clamps written by
    :func:`insert_float_clamps`), ``compile_s`` (seconds of the first, compiling call; ``None``
    without example inputs) and ``kernels`` (from the generated code of the first call: ``qconv`` /
    ``qlinear`` oneDNN int8 kernels, ``hardtanh_post_ops`` — the fused clamps — and ``float_convs``).
    """

    def __init__(self, compiled, model, activation_clamps: int):
        super().__init__()
        self.compiled = compiled
        self.model = model
        self.activation_clamps = activation_clamps
        self.compile_s: Optional[float] = None
        self.kernels: Dict[str, int] = {}
        self.source: str = ""

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.compiled(*args, **kwargs)


def compile_x86(converted: fx.GraphModule, example_inputs: Optional[Tuple[Any, ...]] = None, *, exact: bool = True,
                check_isa: Optional[bool] = None, dynamic: bool = False) -> CompiledX86:
    """``torch.compile`` a :func:`convert_pt2e` model with Inductor's x86 int8 lowering (freezing on).

    Inductor's freezing passes (with torchao's x86 patterns registered) turn every
    ``dequantize → conv / linear → quantize`` of the q/dq model into a fused oneDNN int8 kernel
    (``onednn.qconv_pointwise`` / ``qlinear_pointwise``: uint8 activations, int8 weights on DAQ's
    grid, prepacked) and generate C++ for the rest (quantize of the input, residual adds, pools).

    Args:
        converted: from :func:`convert_pt2e` (left untouched: a deep copy is compiled).
        example_inputs: if given, the model is compiled right away (the first call), timed into
            ``compile_s``, and its generated code summarised into ``kernels``.
        exact: :func:`insert_float_clamps` first, so that sub-8-bit activations are clipped at
            ``quant_max`` inside the fused kernels (they saturate at 255 otherwise).
        check_isa: as :func:`lower_to_x86` (oneDNN's "Illegal instruction" on some virtual CPUs).
        dynamic: passed to ``torch.compile`` (default ``False``: one specialised graph per input shape).

    Returns:
        A :class:`CompiledX86` module (runs under ``torch.no_grad()``).
    """
    import time as _time

    try:
        # registers torchao's int8 weight-prepack / qconv / qlinear fusion passes with Inductor
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as error:  # pragma: no cover - torchao < 0.15
        raise RuntimeError("this torchao has no x86 Inductor quantizer; use torchao>=0.15,<0.19") from error
    if not isinstance(converted, fx.GraphModule):
        raise TypeError("converted must be a GraphModule from daq_fx.pt2e.convert_pt2e, got"
                        f" {type(converted).__name__}")
    _check_isa_env(check_isa)
    risky = saturation_risk(converted)
    if risky and not _has_vnni():
        warnings.warn(f"compile_x86: {len(risky)} conv / linear layers (e.g. {risky[0]!r}) combine 8-bit activations"
                      " with weights beyond ±64 (7-bit DAQ weights); oneDNN's int8 kernels on this CPU (no"
                      " AVX512-VNNI) add pairs of uint8 x int8 products in saturating int16 and return wrong codes"
                      " there. Use <= 6-bit weights, or daq_fx.export_onnx (exact integer kernels).",
                      RuntimeWarning, stacklevel=2)
    model = copy.deepcopy(converted)
    clamps = insert_float_clamps(model) if exact else 0
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch._inductor.config.freezing = True   # read when the first call compiles (and by recompiles)
    compiled = torch.compile(model, dynamic=dynamic)
    result = CompiledX86(compiled, model, clamps)
    if example_inputs is not None:
        from torch._inductor.utils import run_and_get_code
        start = _time.perf_counter()
        with torch.no_grad():
            _, sources = run_and_get_code(compiled, *example_inputs)
        result.compile_s = _time.perf_counter() - start
        result.source = "\n".join(sources)
        result.kernels = _summarize_x86_code(result.source)
        if result.kernels["onednn_int8_ops"] == 0:
            warnings.warn("compile_x86: Inductor fused no oneDNN int8 kernel; the model runs as a float q/dq graph",
                          RuntimeWarning, stacklevel=2)
    return result
