"""``daq_fx.prepare_qat_fx``: torch.ao's ``prepare_qat_fx`` plus what timm models and DAQ need.

Before tracing (INTEGRATION-NOTES, "timm under FX"):

* timm's ``BatchNormAct2d`` is traced through into ``F.batch_norm(..., training=True)``
  with the flag frozen (eval would use batch statistics, Conv+BN would not fuse): it is
  replaced by a ``BatchNorm2d`` followed by its activation.
* ``ReLU6`` becomes ``ReLU`` so Conv-BN-ReLU fuses and the activation quantizer after it is
  unsigned; the clip at 6 is taken over by the quantizer's learned upper bound ``u``.
* BatchNorm with a zero ``γ`` (timm's ``zero_init_last``) or without running statistics
  is rejected with a message naming the module.

After tracing: dropout shares its input's qparams (see :func:`get_daq_backend_config`),
every DAQ weight quantizer is initialised from its (BN-folded) weight, so that per-channel
parameters have their final shapes and an optimizer can be built right away, and activation
quantizers get their first-batch grid moved off the input's value lattice
(:func:`initialize_activations_off_lattice`), so that QAT and int8 requantisation agree.
"""

from __future__ import annotations

import copy
import sys
import traceback
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, QConfigMapping
from torch.ao.quantization import quantize_fx as _quantize_fx

from daq_core import check_bits

from .fake_quantize import ACTIVATION, AveragedActivation, DAQFakeQuantize
from .n2uq import N2UQFakeQuantize
from .qconfig import get_daq_backend_config

__all__ = ["prepare_qat_fx", "prepare_timm_model", "check_batchnorm", "initialize_weight_quantizers",
           "initialize_activations_off_lattice", "OFF_LATTICE_FACTOR",
           "weight_fold_factor", "DAQPrepareError"]


class DAQPrepareError(RuntimeError):
    """A model that cannot be traced or quantized; the message names the module and what to do."""


# --------------------------------------------------------------------------------------
# model surgery before tracing
# --------------------------------------------------------------------------------------

def _batchnorm_act_classes():
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency, but keep torch-only models working
        return ()
    return (BatchNormAct2d,)


def _plain_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats)
    plain.load_state_dict(nn.BatchNorm2d.state_dict(bn), strict=True)
    plain.train(bn.training)
    return plain.to(next(iter(bn.state_dict().values())).device) if bn.state_dict() else plain


#: attribute set on the ReLU that replaced a ReLU6: its quantizer's upper bound is capped at 6
_RELU6_TAG = "_daq_relu6_limit"


def _relu_from_relu6(relu6: nn.ReLU6) -> nn.ReLU:
    relu = nn.ReLU(inplace=relu6.inplace)
    setattr(relu, _RELU6_TAG, 6.0)
    return relu


class TracedIdentity(nn.Module):
    """``nn.Identity`` that torch.fx traces through (not a ``torch.nn`` leaf): no node in the graph."""

    def forward(self, x, *args, **kwargs):
        return x


def prepare_timm_model(model: nn.Module, relu6_to_relu: bool = True) -> nn.Module:
    """Rewrite (in place) what torch.ao FX cannot quantize correctly in timm models.

    * ``BatchNormAct2d(bn, drop, act)`` → ``Sequential(bn=BatchNorm2d, [drop], [act])``.
    * ``ReLU6`` → ``ReLU`` when ``relu6_to_relu`` (Conv-BN-ReLU fuses; unsigned quantizer).
      ``daq_fx.prepare_qat_fx`` caps the upper bound of the quantizer after it at 6, so the
      quantized model still clips at 6 (the float model without quantizers clips only at ``u``).
    * ``nn.Identity`` placeholders (timm ``BasicBlock.drop_block`` / ``aa``, disabled drop-path)
      → a module FX traces *through*, so they vanish from the graph. FX keeps ``nn.Identity`` as a
      call between ``bn1`` and ``act1`` of every timm ResNet block, which stops Conv-BN-ReLU from
      fusing: the pre-ReLU BN output then gets a *signed* quantizer (half its levels wasted after
      the ReLU) and the block differs from torch.export/pt2e's graph, where the Identity is gone.

    Returns the same model object.
    """
    bn_act = _batchnorm_act_classes()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            replacement = None
            if bn_act and isinstance(child, bn_act):
                parts = OrderedDict(bn=_plain_batchnorm(child))
                if not isinstance(child.drop, nn.Identity):
                    parts["drop"] = child.drop
                act = child.act
                if relu6_to_relu and isinstance(act, nn.ReLU6):
                    act = _relu_from_relu6(act)
                if not isinstance(act, nn.Identity):
                    parts["act"] = act
                replacement = nn.Sequential(parts)
            elif relu6_to_relu and type(child) is nn.ReLU6:
                replacement = _relu_from_relu6(child)
            elif type(child) is nn.Identity:
                replacement = TracedIdentity()
            if replacement is not None:
                setattr(parent, child_name, replacement)
    return model


def _same_padding_classes():
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return (Conv2dSame,)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial dim as timm's ``pad_same`` applies it: (before, after)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@torch.no_grad()
def static_same_padding(model: nn.Module, example_inputs: Tuple[Any, ...]) -> List[str]:
    """Replace (in place) timm's ``Conv2dSame`` by the padding it applies at the example's input size.

    ``Conv2dSame`` (timm's ``tf_*`` models: TensorFlow "SAME" padding) computes its padding from
    the input size in ``forward``, which FX cannot trace. One eval-mode forward of
    ``example_inputs`` records each one's input size; it becomes ``nn.Conv2d(padding=(p_h, p_w))``
    where the padding is symmetric, else ``Sequential(pad=nn.ZeroPad2d((left, right, top,
    bottom)), conv=nn.Conv2d(padding=0))`` (same parameters, the same output at that size;
    Conv-BN still fuses, and the pad shares its input's quantizer: 0 lies on the DAQ grid). The
    model is then specific to that input size, like timm's static "same" layers: prepare with
    the size you deploy.

    Returns:
        The names of the replaced modules.
    """
    classes = _same_padding_classes()
    targets = [(name, m) for name, m in model.named_modules() if name and classes and isinstance(m, classes)]
    if not targets:
        return []
    sizes: Dict[str, Tuple[int, ...]] = {}

    def record(name):
        def hook(_, args):   # returns None: the input is left as is
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in targets]
    was_training = model.training
    model.eval()    # no BN statistics update, no dropout
    try:
        model(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    replaced = []
    for name, conv in targets:
        if name not in sizes:
            continue   # not reached by the example: left as is (tracing names it if it is used)
        (top, bottom), (left, right) = (_same_padding(*args) for args in
                                        zip(sizes[name], conv.kernel_size, conv.stride, conv.dilation))
        symmetric = top == bottom and left == right
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          (top, left) if symmetric else 0, conv.dilation, conv.groups, conv.bias is not None,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        plain.weight, plain.bias = conv.weight, conv.bias
        replacement = plain if symmetric else nn.Sequential(
            OrderedDict(pad=nn.ZeroPad2d((left, right, top, bottom)), conv=plain))
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)
        replaced.append(name)
    return replaced


def check_batchnorm(model: nn.Module) -> None:
    """Reject BatchNorm layers that break Conv-BN QAT, naming them.

    * ``γ = 0`` in any channel: the BN-folded weight ``W γ / sqrt(var + eps)`` is zero,
      the weight quantizer has nothing to standardise and convert fails ("zero_point
      -2147483648 is below lower bound"). timm's ResNet/RegNet zero-initialise the last BN of
      every block (``zero_init_last=True``) when created without pretrained weights.
    * no running statistics (``track_running_stats=False``): eval would use batch statistics.
    """
    zero, no_stats = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine and module.weight is not None and bool((module.weight.detach() == 0).any()):
                zero.append(name)
            if module.running_var is None:
                no_stats.append(name)
    if zero:
        shown = ", ".join(repr(n) for n in zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        raise ValueError(
            f"BatchNorm {shown} has weight (gamma) = 0 in some channel: the BN-folded weight is zero there,"
            " which DAQ cannot standardise and torch.ao cannot convert. This is timm's zero_init_last"
            " initialisation of randomly initialised ResNet/RegNet models. Load pretrained weights, create the"
            " model with zero_init_last=False, or re-initialise the gamma "
            "(e.g. nn.init.ones_(bn.weight)) before daq_fx.prepare_qat_fx.")
    if no_stats:
        raise ValueError(
            f"BatchNorm {no_stats[0]!r} has track_running_stats=False: in eval it would normalise with batch"
            " statistics, so outputs depend on the batch and it cannot be folded into the convolution."
            " Use track_running_stats=True.")


# --------------------------------------------------------------------------------------
# weight quantizer initialisation (shared with bake)
# --------------------------------------------------------------------------------------

def weight_fold_factor(module: nn.Module) -> Optional[torch.Tensor]:
    """``γ / sqrt(running_var + eps)`` for fused ConvBn QAT modules (the BN fold), else ``None``.

    torch.ao's ConvBn QAT modules fake-quantize ``W · factor`` (reshaped on the output axis).
    """
    bn = getattr(module, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not hasattr(module, "weight_fake_quant"):
        return None
    running_std = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / running_std if bn.weight is not None else 1.0 / running_std


def _fold_shape(module: nn.Module, weight: torch.Tensor):
    shape = [1] * weight.dim()
    axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    shape[axis] = -1
    return shape


def folded_weight(module: nn.Module) -> torch.Tensor:
    """The weight torch.ao feeds to ``module.weight_fake_quant`` (BN-folded for ConvBn modules)."""
    factor = weight_fold_factor(module)
    if factor is None:
        return module.weight
    return module.weight * factor.reshape(_fold_shape(module, module.weight))


@torch.no_grad()
def initialize_weight_quantizers(model: nn.Module) -> int:
    """Initialise every DAQ weight quantizer of a prepared model from its (BN-folded) weight.

    Gives per-channel parameters their final shapes (build the optimizer after this).
    Quantizers already initialised (e.g. loaded from a state_dict) are left alone.

    Returns:
        How many quantizers were initialised.
    """
    count = 0
    for module in model.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if isinstance(fq, (DAQFakeQuantize, N2UQFakeQuantize)) and fq.initialized[0] == 0:
            fq.initialize(folded_weight(module))
            count += 1
    return count


# --------------------------------------------------------------------------------------
# ReLU6 caps and exact rounding of averages
# --------------------------------------------------------------------------------------

def _relu6_anchors(model: nn.Module, prepare_custom_config) -> Dict[str, float]:
    """Module names whose output (after prepare: after fusion) is a ReLU6-turned-ReLU output."""
    tagged = {name for name, m in model.named_modules() if getattr(m, _RELU6_TAG, None)}
    if not tagged:
        return {}
    from torch.ao.quantization.fx.tracer import QuantizationTracer
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    config = prepare_custom_config or PrepareCustomConfig()
    if isinstance(config, dict):
        config = PrepareCustomConfig.from_dict(config)
    graph = QuantizationTracer(config.non_traceable_module_names, config.non_traceable_module_classes).trace(model)
    modules = dict(model.named_modules())
    anchors = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in tagged:
            anchor = node.target
            source = node.args[0] if node.args else None
            # Conv -> BN -> ReLU and Conv -> ReLU fuse into one module named after the conv
            if isinstance(source, torch.fx.Node) and source.op == "call_module" and \
                    isinstance(modules.get(source.target), nn.modules.batchnorm._BatchNorm):
                source = source.args[0]
            if isinstance(source, torch.fx.Node) and source.op == "call_module" and \
                    isinstance(modules.get(source.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                anchor = source.target
            anchors[anchor] = 6.0
            anchors[node.target] = 6.0
    return anchors


def _apply_relu6_caps(prepared: torch.fx.GraphModule, anchors: Dict[str, float]) -> int:
    count = 0
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target in anchors:
            for user in node.users:
                if user.op == "call_module":
                    fq = prepared.get_submodule(user.target)
                    if isinstance(fq, (DAQFakeQuantize, N2UQFakeQuantize)) and not fq.is_weight:
                        fq.set_upper_limit(anchors[node.target])
                        count += 1
    return count


def _feeds_quantized_layer(node: torch.fx.Node, modules, seen=None) -> bool:
    """Whether ``node``'s value reaches the input of a layer with a weight fake-quant before
    being requantized (paths through qparam-sharing ops: pooling, padding, reshapes, ReLU ...)."""
    seen = set() if seen is None else seen
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            continue
        if user.op == "call_module":
            module = modules.get(user.target)
            if isinstance(module, FakeQuantizeBase):
                continue                        # requantized here: this path ends
            if hasattr(module, "weight_fake_quant"):
                return True
        if _feeds_quantized_layer(user, modules, seen):
            return True
    return False


def widen_intermediate_activations(prepared: torch.fx.GraphModule, bits: int) -> List[str]:
    """Give ``bits``-bit DAQ quantizers to activations that are not the input of a quantized layer.

    DAQ (like the paper's code) quantizes the *inputs of conv/linear layers*; an integer backend
    also needs quantized tensors where the paper stays in float — a residual ``add``'s operands
    (e.g. a BN output before the add, a shortcut), the inputs of float layers, the network output.
    torch.ao's FX prepare gives those the same qconfig, i.e. the same low bit-width, so a W2A2
    ResNet's residual branch outputs get 4 *signed* levels. This pass replaces every activation
    :class:`DAQFakeQuantize` whose value reaches no quantized layer before being requantized by one
    with ``max(bits, its bits)`` bits and otherwise the same settings; conv/linear inputs keep
    theirs. Exact conversion is unchanged (clamps are inserted where grids differ). Called by
    :func:`prepare_qat_fx` when the mapping was made with ``intermediate_act_bits``.

    Returns:
        The names of the replaced quantizers.
    """
    bits = check_bits(bits, "intermediate_act_bits")
    modules = {node.target: prepared.get_submodule(node.target)
               for node in prepared.graph.nodes if node.op == "call_module"}
    nodes_of: Dict[int, List[torch.fx.Node]] = {}
    for node in prepared.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, DAQFakeQuantize) and not module.is_weight:
            nodes_of.setdefault(id(module), []).append(node)
    replaced = []
    for nodes in nodes_of.values():
        old = modules[nodes[0].target]
        if old.bits >= bits or any(_feeds_quantized_layer(n, modules) for n in nodes):
            continue
        signed = {-1: None, 0: False, 1: True}[int(old.signed.item())]
        new = DAQFakeQuantize(role=ACTIVATION, bits=bits, signed=signed, gamma=old.gamma, sigma=old.sigma,
                              num_std=old.num_std, init=old.init, rounding=old.rounding, beta=old.beta,
                              factory_kwargs={"device": old.lower_bound.device})
        new.train(old.training)
        for name in {n.target for n in nodes}:
            parent, _, attr = name.rpartition(".")
            setattr(prepared.get_submodule(parent) if parent else prepared, attr, new)
            replaced.append(name)
    return sorted(replaced)


_AVERAGING_METHODS = {"mean"}
_AVERAGING_FUNCTIONS = {torch.mean, torch.nn.functional.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
                        torch.nn.functional.adaptive_avg_pool1d, torch.adaptive_avg_pool1d}
_AVERAGING_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _is_averaging(node: torch.fx.Node, modules) -> bool:
    if node.op == "call_method":
        return node.target in _AVERAGING_METHODS
    if node.op == "call_function":
        return node.target in _AVERAGING_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _AVERAGING_MODULES)
    return False


#: Factor applied to an activation quantizer's first-batch bounds (see :func:`initialize_activations_off_lattice`):
#: close to 1: the bounds change by 1e-4 (the first batch's MSE choice is far coarser).
OFF_LATTICE_FACTOR = 1.0 - 1e-4


@torch.no_grad()
def _initialize_off_lattice(module: DAQFakeQuantize, args) -> None:
    """Forward pre-hook: the first-batch initialisation, then both bounds times ``OFF_LATTICE_FACTOR``."""
    if module.initialized[0] == 0 and module.observer_enabled[0] == 1 and args and isinstance(args[0], torch.Tensor):
        module.initialize(args[0])
        module.lower_bound.mul_(OFF_LATTICE_FACTOR)     # 0 (unsigned) stays 0; the zero point is unchanged
        module.upper_bound.mul_(OFF_LATTICE_FACTOR)


def initialize_activations_off_lattice(model: nn.Module) -> int:
    """Make every DAQ activation quantizer's first-batch grid step incommensurate with its input.

    The input of a quantizer after ``add``, ``mul`` (squeeze-excite gates), ``hardswish`` ... lies
    on a lattice: sums and products of the integer codes of the input grids. The first-batch
    initialisation picks bounds at (fractions of) the batch's min and max, i.e. lattice points,
    so the new step is a ratio of small integers of the input steps and a large share of the
    outputs lies *exactly* on a rounding tie (seen: 1-3 % of an SE multiply's or a residual add's
    outputs). The QAT model rounds its float ``(x - l) / Δ`` and the int8 kernel its own float
    requantisation (``acc · multiplier``, ``x · (1/Δ)``): each breaks an exact tie by its own
    rounding error, differently on about half of them, and a few learning steps (bounds move by
    ~1e-7 relative) do not move the grid off the lattice. Scaling both bounds by
    ``OFF_LATTICE_FACTOR`` right after initialisation moves every exact tie ``(m + ½)`` by
    ``(m + ½)·1e-4``, far above float error (~1e-6), leaving only the rare generic near-ties.

    Installs a forward pre-hook on every activation :class:`DAQFakeQuantize` that is not yet
    initialised (``daq_fx.prepare_qat_fx`` does this; other flows can call it on their prepared
    model). Quantizers loaded from a state_dict are initialised already: the hook does nothing.

    Returns:
        The number of quantizers hooked.
    """
    count = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, DAQFakeQuantize) and not module.is_weight and id(module) not in seen:
            seen.add(id(module))
            if module.initialized[0] == 0:
                module.register_forward_pre_hook(_initialize_off_lattice)
                count += 1
    return count


def _wrap_averages(prepared: torch.fx.GraphModule) -> int:
    """Route the (shared) quantizer after mean / adaptive-average-pool through :class:`AveragedActivation`."""
    # named_modules() lists a shared quantizer once: resolve every node's target instead
    modules = {node.target: prepared.get_submodule(node.target)
               for node in prepared.graph.nodes if node.op == "call_module"}
    count = 0
    for node in list(prepared.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), DAQFakeQuantize):
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or not _is_averaging(source, modules):
            continue
        data = source.args[0]
        if not (isinstance(data, torch.fx.Node) and data.op == "call_module"
                and modules.get(data.target) is modules[node.target]):
            continue     # only the shared-grid case: the int kernel averages codes of that grid
        name = f"{node.target.replace('.', '_')}_average"
        prepared.add_submodule(name, AveragedActivation(modules[node.target]))
        node.target = name
        count += 1
    if count:
        prepared.recompile()
    return count


# --------------------------------------------------------------------------------------
# tracing errors that name the module
# --------------------------------------------------------------------------------------

def _failing_module(model: nn.Module, tb) -> Optional[Tuple[str, nn.Module]]:
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(tb):
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in names:
            found = (names[id(candidate)], candidate)
    return found


def _explain_trace_error(model: nn.Module, error: BaseException) -> Optional[DAQPrepareError]:
    found = _failing_module(model, error.__traceback__)
    if found is None:
        return None
    name, module = found
    label = f"{name!r} ({type(module).__name__})" if name else f"the model's own forward ({type(module).__name__})"
    hint = (f"PrepareCustomConfig().set_non_traceable_module_names([{name!r}])" if name else
            "PrepareCustomConfig().set_non_traceable_module_classes([...]) for the offending submodule")
    return DAQPrepareError(
        f"torch.fx could not trace module {label}: {type(error).__name__}: {error}\n"
        f"What to do: keep that module in float and let the rest be quantized by passing"
        f" prepare_custom_config={hint} to daq_fx.prepare_qat_fx, or rewrite its forward without"
        f" data-dependent Python control flow (if/for on tensor values, .item(), shape asserts on"
        f" proxies).")


# --------------------------------------------------------------------------------------
# the drop-in
# --------------------------------------------------------------------------------------

def prepare_qat_fx(model: nn.Module, qconfig_mapping: QConfigMapping | Dict[str, Any],
                   example_inputs: Tuple[Any, ...], prepare_custom_config=None, backend_config=None, *,
                   backend: Optional[str] = None, prepare_timm: bool = True, relu6_to_relu: bool = True,
                   inplace: bool = False) -> torch.fx.GraphModule:
    """Same signature as ``torch.ao.quantization.quantize_fx.prepare_qat_fx``, plus DAQ/timm preparation.

    Args:
        model: a float model in train mode.
        qconfig_mapping: usually :func:`daq_fx.get_daq_qat_qconfig_mapping`.
        example_inputs: a tuple of inputs (used for tracing and kept for ``convert_fx(exact=True)``).
        prepare_custom_config, backend_config: as in torch.ao. ``backend_config=None`` uses torch's
            config for the backend with dropout sharing its input's qparams.
        backend: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``; default: the one the mapping was made for.
        prepare_timm: replace ``BatchNormAct2d`` (and ``ReLU6`` if ``relu6_to_relu``) first, and
            timm's ``Conv2dSame`` by its padding at the size of ``example_inputs``
            (:func:`static_same_padding`).
        inplace: modify ``model`` (default: work on a deep copy).

    Returns:
        The prepared ``GraphModule`` with DAQ weight quantizers initialised.

    Raises:
        ValueError: zero-γ BatchNorm, BatchNorm without running statistics (names the module).
        DAQPrepareError: the model cannot be traced (names the module and what to do).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of inputs, e.g. (torch.randn(1, 3, 224, 224),);"
                        f" got {type(example_inputs).__name__}")
    backend = backend or getattr(qconfig_mapping, "daq_backend", "x86")
    if not inplace:
        model = copy.deepcopy(model)
    if prepare_timm:
        prepare_timm_model(model, relu6_to_relu=relu6_to_relu)
        static_same_padding(model, example_inputs)
    check_batchnorm(model)
    if backend_config is None:
        backend_config = get_daq_backend_config(backend)
    model.train()
    try:
        anchors = _relu6_anchors(model, prepare_custom_config)
        prepared = _quantize_fx.prepare_qat_fx(model, qconfig_mapping, example_inputs,
                                               prepare_custom_config=prepare_custom_config,
                                               backend_config=backend_config)
    except Exception as error:  # re-raised as is unless we can name the failing module
        explained = _explain_trace_error(model, error)
        if explained is None:
            raise
        raise explained.with_traceback(None) from error
    initialize_weight_quantizers(prepared)
    intermediate_bits = getattr(qconfig_mapping, "daq_intermediate_act_bits", None)
    prepared.meta["daq_intermediate_activations"] = (
        widen_intermediate_activations(prepared, intermediate_bits) if intermediate_bits else [])
    _apply_relu6_caps(prepared, anchors)
    _wrap_averages(prepared)
    initialize_activations_off_lattice(prepared)
    prepared.meta["daq_backend"] = backend
    prepared.meta["daq_backend_config"] = backend_config
    prepared.meta["daq_example_inputs"] = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x
                                                for x in example_inputs)
    return prepared
