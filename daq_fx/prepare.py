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

import math

import copy
import inspect
import operator
import sys
import traceback
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, QConfigMapping
from torch.ao.quantization import quantize_fx as _quantize_fx

from daq_core import check_bits, check_finite

from .fake_quantize import ACTIVATION, AveragedActivation, DAQFakeQuantize, FamilyFakeQuantize
from .qconfig import get_daq_backend_config

__all__ = ["prepare_qat_fx", "prepare_timm_model", "check_batchnorm", "initialize_weight_quantizers",
           "initialize_activations_off_lattice", "OFF_LATTICE_FACTOR", "static_same_padding", "static_shape_modules",
           "dropout_follows_training", "stochastic_depth_modules", "name_quantizers", "refuse_nonfinite_first_batch",
           "weight_quantizers_follow_their_layer",
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


# --------------------------------------------------------------------------------------
# modules with shape-dependent Python control flow: traced at the example's shapes
# --------------------------------------------------------------------------------------

class _ExampleSize(tuple):
    """``x.shape`` while tracing at the example's shapes: ints, and proxies for the batch-dependent sizes."""

    def numel(self):
        total = 1
        for size in self:
            total = total * size
        return total


class _ExampleShapeProxy(torch.fx.Proxy):
    """A proxy whose ``shape`` / ``size()`` / ``dim()`` are the example's (see :class:`_ExampleShapeTracer`)."""

    @property
    def shape(self):
        return self.tracer.example_size(self)

    def size(self, dim=None):
        size = self.tracer.example_size(self)
        return size if dim is None else size[dim]

    def dim(self):
        return len(self.tracer.example_size(self))

    @property
    def ndim(self):
        return self.dim()


class _ExampleShapeTracer:
    """Mixin over torch.ao's ``QuantizationTracer``: tensor sizes resolve to the example's values.

    ``calls`` holds the traced module's recorded ``(args, kwargs)`` at two batch sizes. When the
    module's code reads a size, the graph traced so far is evaluated on both calls (incrementally,
    under ``no_grad``, the module in eval mode, the global RNG untouched): a size equal in both is
    returned as an ``int`` — Python control flow and arithmetic on it run at trace time, as for
    ``static_same_padding`` — a size that changes with the batch stays symbolic.
    """

    def __init__(self, skipped_module_names, skipped_module_classes, calls):
        super().__init__(skipped_module_names, skipped_module_classes)
        self._calls = calls
        self._envs = [dict() for _ in calls]
        self._evaluating = False

    def proxy(self, node):
        return _ExampleShapeProxy(node, self)

    # while tracing, torch.fx routes every module call and parameter read through the tracer: when
    # evaluating the graph on the example, modules run and parameters are read as usual
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _evaluate(self, target: torch.fx.Node, call_index: int):
        env = self._envs[call_index]
        if target in env:
            return env[target]
        args, kwargs = self._calls[call_index]
        bound = inspect.signature(self.root.forward).bind(*args, **kwargs).arguments
        load = lambda a: torch.fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
        modes = {m: m.training for m in self.root.modules()}
        self.root.eval()
        self._evaluating = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for node in self.graph.nodes:
                    if node in env:
                        continue
                    if node.op == "placeholder":
                        if node.target not in bound:
                            raise KeyError(f"placeholder {node.target!r} has no recorded value")
                        value = bound[node.target]
                    elif node.op == "get_attr":
                        value = self.root
                        for part in node.target.split("."):
                            value = getattr(value, part)
                    elif node.op == "call_function":
                        value = node.target(*load(node.args), **load(node.kwargs))
                    elif node.op == "call_method":
                        obj, *rest = load(node.args)
                        value = getattr(obj, node.target)(*rest, **load(node.kwargs))
                    elif node.op == "call_module":
                        value = self.root.get_submodule(node.target)(*load(node.args), **load(node.kwargs))
                    else:
                        continue
                    env[node] = value
                    if node is target:
                        break
        finally:
            self._evaluating = False
            for module, training in modes.items():
                module.training = training
        return env[target]

    def example_size(self, proxy: torch.fx.Proxy) -> _ExampleSize:
        shapes = [self._evaluate(proxy.node, i) for i in range(len(self._calls))]
        if not all(isinstance(v, torch.Tensor) for v in shapes) or len({v.dim() for v in shapes}) != 1:
            raise torch.fx.proxy.TraceError(f"cannot resolve the size of {proxy.node.name!r} from the example")
        sizes = []
        for dim, values in enumerate(zip(*(v.shape for v in shapes))):
            if len(set(values)) == 1:
                sizes.append(int(values[0]))
            else:   # depends on the batch size: stays symbolic
                sizes.append(self.create_proxy("call_function", getattr, (proxy, "shape"), {})[dim])
        return _ExampleSize(sizes)


def _prepare_custom_config(config):
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    config = config or PrepareCustomConfig()
    return PrepareCustomConfig.from_dict(config) if isinstance(config, dict) else config


def _tensor_map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_tensor_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _tensor_map(v, fn) for k, v in value.items()}
    return value


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(value.items()))
    return value


@torch.no_grad()
def _record_calls(model: nn.Module, example_inputs: Tuple[Any, ...], modules: List[nn.Module]):
    """``{id(module): [(args, kwargs) at the example's batch size, at one more]}`` for modules
    called once (or always with the same shapes) by an eval-mode forward of the example."""
    batches = [example_inputs,
               tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                     for x in example_inputs)]
    records: Dict[int, list] = {id(m): [] for m in modules}
    consistent = {id(m): True for m in modules}
    for index, inputs in enumerate(batches):
        def hook(module, args, kwargs):
            calls = records[id(module)]
            if len(calls) > index:      # called again in this forward: only usable if the shapes repeat
                consistent[id(module)] &= _shapes((args, kwargs)) == _shapes(calls[index])
                return None
            calls.append(_tensor_map((args, kwargs), lambda t: t.detach().clone()))
            return None
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            model(*inputs)
        except Exception:     # e.g. the batch is not dim 0: shapes cannot be told apart from the batch
            return {}
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
    return {key: calls for key, calls in records.items() if len(calls) == 2 and consistent[key]}


def _trace_at_example_shapes(module: nn.Module, name: str, calls, config) -> Optional[torch.fx.GraphModule]:
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    class Tracer(_ExampleShapeTracer, QuantizationTracer):
        pass

    prefix = name + "."
    skipped = [n[len(prefix):] for n in config.non_traceable_module_names if n.startswith(prefix)]
    tracer = Tracer(skipped, config.non_traceable_module_classes, calls)
    args, kwargs = calls[0]
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        concrete = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception:
        return None
    for node in reversed(list(graph.nodes)):    # batch-size reads that the code did not use
        if not node.users and node.op == "call_function" and (
                node.target is operator.getitem or (node.target is getattr and node.args[1:] == ("shape",))):
            graph.erase_node(node)
    traced = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    traced.train(module.training)
    return traced


def static_shape_modules(model: nn.Module, example_inputs: Tuple[Any, ...], prepare_custom_config=None,
                         max_rounds: int = 32) -> List[str]:
    """Replace (in place) modules that torch.fx cannot trace because of *shape*-dependent control flow.

    Some modules branch in Python on their input's size, e.g. timm's ``ConvMlp`` (the VGG head:
    ``if x.shape[-2] < 7: x = adaptive_avg_pool2d(x, (7, 7))``); symbolic tracing cannot evaluate
    the condition and ``prepare_qat_fx`` failed at such a module. Like :func:`static_same_padding`,
    this specialises them to the example's sizes: the model is traced with torch.ao's tracer; when
    the trace fails inside a module, every module of that class is traced on its own with sizes
    resolved from the example (:class:`_ExampleShapeTracer`: the module's inputs are recorded by
    eval-mode forwards of ``example_inputs`` and of the same inputs with one more sample, so sizes
    that follow the batch size stay symbolic and everything else becomes a constant) and replaced
    by the resulting ``GraphModule`` (same submodules and parameter names). Repeated until the
    model traces or the failing module cannot be specialised (value-dependent control flow: the
    tracing error is then reported as before). The prepared model is specific to the example's
    spatial size in these modules only: prepare with the size you deploy.

    Returns:
        The names of the replaced modules.
    """
    from torch.ao.quantization.fx.tracer import QuantizationTracer
    config = _prepare_custom_config(prepare_custom_config)
    replaced: List[str] = []
    for _ in range(max_rounds):
        try:
            QuantizationTracer(config.non_traceable_module_names, config.non_traceable_module_classes).trace(model)
            return replaced
        except Exception as error:
            found = _failing_module(model, error.__traceback__)
        if found is None or not found[0] or isinstance(found[1], torch.fx.GraphModule):
            return replaced       # the root's own forward, or nothing to specialise: prepare explains the error
        cls = type(found[1])
        targets = [(n, m) for n, m in model.named_modules() if n and type(m) is cls]
        calls = _record_calls(model, example_inputs, [m for _, m in targets])
        progress = False
        for target_name, target in targets:
            traced = _trace_at_example_shapes(target, target_name, calls[id(target)], config) \
                if id(target) in calls else None
            if traced is None:
                continue
            parent_name, _, child_name = target_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, traced)
            replaced.append(target_name)
            progress |= target_name == found[0]
        if not progress:
            return replaced
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
        if isinstance(fq, FamilyFakeQuantize) and fq.initialized[0] == 0:
            fq.initialize(folded_weight(module))
            count += 1
    return count


def _follow_layer_mode(module: nn.Module, args) -> None:
    """Forward pre-hook: the layer's weight fake-quant takes the layer's train/eval mode."""
    fq = module.weight_fake_quant
    if fq.training != module.training:
        fq.train(module.training)


def weight_quantizers_follow_their_layer(model: nn.Module) -> int:
    """Keep each weight fake-quant in its layer's train/eval mode (families whose forward depends on it).

    torch.ao's fused ConvBn QAT modules with frozen BN (``freeze_bn``, e.g. after
    ``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` or the recipes' ``--freeze-bn``) do not pass
    ``train()`` / ``eval()`` on to their children: their weight fake-quant would stay in training
    mode after ``model.eval()``. DAQ's forward does not depend on it; CPQ's does (DropBits drops bits
    in training only), so its eval forward and the converted model would drop bits at random.
    Installs a forward pre-hook on every layer with a :class:`FamilyFakeQuantize` weight quantizer of
    such a family. Returns how many layers got it.
    """
    count = 0
    for module in model.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if isinstance(fq, FamilyFakeQuantize) and fq.family.learns_bits:
            module.register_forward_pre_hook(_follow_layer_mode)
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
                    if isinstance(fq, FamilyFakeQuantize) and not fq.is_weight:
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
        if isinstance(module, DAQFakeQuantize):
            module.lower_bound.mul_(OFF_LATTICE_FACTOR)     # 0 (unsigned) stays 0; the zero point is unchanged
            module.upper_bound.mul_(OFF_LATTICE_FACTOR)
        else:                                               # CPQ: the step (zero point 0 or 2^(b-1))
            module.log_step.add_(math.log(OFF_LATTICE_FACTOR))


def _on_lattice_grid(module: FamilyFakeQuantize) -> bool:
    """Families whose activation grid is uniform and set from the first batch's range (DAQ, CPQ)."""
    return isinstance(module, DAQFakeQuantize) or module.family.name == "cpq"


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
        if isinstance(module, FamilyFakeQuantize) and _on_lattice_grid(module) and not module.is_weight \
                and id(module) not in seen:
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
        fq = modules.get(node.target)
        if node.op != "call_module" or not isinstance(fq, FamilyFakeQuantize) or fq.is_weight \
                or not fq.family.convertible_activations:
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
# functional dropout follows train / eval; quantizer names for messages
# --------------------------------------------------------------------------------------

#: functional dropouts and the module that applies them according to its own ``training`` flag
_DROPOUT_MODULES = {
    nn.functional.dropout: nn.Dropout, nn.functional.dropout1d: nn.Dropout1d,
    nn.functional.dropout2d: nn.Dropout2d, nn.functional.dropout3d: nn.Dropout3d,
    nn.functional.alpha_dropout: nn.AlphaDropout, nn.functional.feature_alpha_dropout: nn.FeatureAlphaDropout,
    torch.dropout: nn.Dropout, torch.alpha_dropout: nn.AlphaDropout,
    torch.feature_alpha_dropout: nn.FeatureAlphaDropout,
}
#: (positional index, keyword) of the ``p``, ``training`` and ``inplace`` arguments, by function
_DROPOUT_ARGS = {fn: ((1, "p"), (2, "training"), (3, "inplace")) for fn in _DROPOUT_MODULES}
for _fn in (torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout):   # (input, p, train)
    _DROPOUT_ARGS[_fn] = ((1, "p"), (2, "train"), (None, None))


def _argument(node: torch.fx.Node, index: Optional[int], keyword: Optional[str], default):
    if index is not None and index < len(node.args):
        return node.args[index]
    return node.kwargs.get(keyword, default) if keyword else default


def dropout_follows_training(graph_module: torch.fx.GraphModule) -> List[str]:
    """Make every traced functional dropout follow the module's train / eval state (in place).

    torch.fx evaluates ``F.dropout(x, p, training=self.training)`` (timm's ``forward_head`` with
    ``drop_rate > 0``, e.g. ghostnet_100 or ``resnet18(drop_rate=0.2)``) while tracing, in train
    mode: the graph holds ``dropout(x, p, training=True)``, and ``.eval()`` could not switch it off —
    the QAT model dropped activations in eval (two eval calls on one input differed, every eval
    figure was wrong). Each such node becomes a call of ``nn.Dropout(p)`` (``Dropout1d/2d/3d``,
    ``AlphaDropout``, ``FeatureAlphaDropout`` for the other variants), a submodule of
    ``graph_module`` that follows ``train()`` / ``eval()``; torch.ao converts it like a model's own
    ``nn.Dropout`` (identity in the int8 model). Dropouts traced with ``training=False`` are no-ops
    either way and stay; a constant ``training=True`` is taken to be a traced ``self.training``
    (a dropout meant to stay on in eval, e.g. Monte-Carlo dropout, is not kept on).

    Returns:
        The names of the new dropout modules.
    """
    added = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUT_MODULES:
            continue
        (p_index, p_key), (t_index, t_key), (i_index, i_key) = _DROPOUT_ARGS[node.target]
        training = _argument(node, t_index, t_key, True)
        p = _argument(node, p_index, p_key, 0.5)
        inplace = _argument(node, i_index, i_key, False)
        if training is not True or not isinstance(p, (int, float)) or not isinstance(inplace, bool):
            continue     # off in both modes, or a flag computed in the graph: leave it
        name, index = f"{node.name}_module", 1
        while hasattr(graph_module, name):
            name, index = f"{node.name}_module_{index}", index + 1
        module = _DROPOUT_MODULES[node.target](float(p), inplace=inplace)
        module.train(graph_module.training)
        graph_module.add_submodule(name, module)
        node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],), {}
        added.append(name)
    if added:
        graph_module.recompile()
    return added


def stochastic_depth_modules(model: nn.Module) -> List[str]:
    """Names of timm ``DropPath`` / ``DropBlock2d`` modules with ``drop_prob > 0``.

    Their forward branches on ``self.training`` in Python (``if drop_prob == 0 or not training:
    return x``): torch.fx traced it in train mode into ``bernoulli_`` ops that stay in the graph —
    the QAT model kept dropping residual branches in eval, and torch.ao put a fake-quant on the
    traced shape arithmetic (a tuple: the first batch failed with "'tuple' object has no attribute
    'detach'"). ``prepare_qat_fx`` makes these modules leaves (non-traceable, so they follow
    train / eval as modules) that share their input's quantizer
    (:func:`daq_fx.get_daq_backend_config`); ``convert_fx`` keeps them as identities.
    """
    from .qconfig import _stochastic_depth_classes
    classes = _stochastic_depth_classes()
    return [name for name, module in model.named_modules()
            if name and classes and isinstance(module, classes) and float(getattr(module, "drop_prob", 0) or 0) > 0]


def _with_leaf_modules(prepare_custom_config, names: List[str]):
    """A copy of ``prepare_custom_config`` (or a new one) that also keeps ``names`` untraced."""
    if not names:
        return prepare_custom_config
    config = copy.deepcopy(_prepare_custom_config(prepare_custom_config))
    config.set_non_traceable_module_names(list(config.non_traceable_module_names) +
                                          [n for n in names if n not in config.non_traceable_module_names])
    return config


def _describe_producer(node: Any, scopes: Dict[str, Tuple[str, Any]]) -> str:
    if not isinstance(node, torch.fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return f"model input {node.target!r}"
    if node.op == "call_module":
        return f"output of {node.target!r}"
    scope = scopes.get(node.name, ("", None))
    where = f" in {scope[0]!r} ({scope[1].__name__})" if scope[0] and isinstance(scope[1], type) else ""
    return f"output of {node.name!r}{where}"


def name_quantizers(prepared: torch.fx.GraphModule) -> int:
    """Set ``name`` on every DAQ quantizer of an FX-prepared model, for its messages.

    Weight quantizers: ``'<layer>.weight_fake_quant'``; activation quantizers: their module name and
    what they quantize, e.g. ``"activation_post_process_15 (output of 'mul' in 'stages.0.blocks.0'
    (ConvNeXtBlock))"``. Returns how many were named.
    """
    count = 0
    for name, module in prepared.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if isinstance(fq, FamilyFakeQuantize):
            fq.name = f"{name}.weight_fake_quant"
            count += 1
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    scopes = getattr(attrs, "node_name_to_scope", None) or {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        fq = prepared.get_submodule(node.target)
        if isinstance(fq, AveragedActivation):
            continue
        if isinstance(fq, FamilyFakeQuantize) and not fq.is_weight and not fq.name:
            fq.name = f"{node.target} ({_describe_producer(node.args[0] if node.args else None, scopes)})"
            count += 1
    return count


def _check_first_batch_finite(module: nn.Module, args) -> None:
    """Forward pre-hook of a prepared model: refuse a non-finite input while quantizers await their first batch."""
    if getattr(module, "_daq_activations_initialized", False):
        return
    pending = any(isinstance(m, FamilyFakeQuantize) and not m.is_weight
                  and m.initialized[0] == 0 and m.observer_enabled[0] == 1 for m in module.modules())
    if not pending:
        module._daq_activations_initialized = True     # checked once per call until then; free afterwards
        return
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            check_finite(value, f"model input {index} of the first (initialising) batch")


def refuse_nonfinite_first_batch(model: nn.Module):
    """Install :func:`_check_first_batch_finite` on a prepared model (``prepare_qat_fx`` and
    ``daq_fx.pt2e.prepare_qat_pt2e`` do): a first batch with NaN / Inf raises before any layer runs
    (no quantizer bound and no BatchNorm statistic is touched). Each quantizer checks its own first
    input too, which covers non-finite values produced inside the model. Returns the hook handle."""
    return model.register_forward_pre_hook(_check_first_batch_finite)


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
                   static_shapes: bool = True, inplace: bool = False) -> torch.fx.GraphModule:
    """Same signature as ``torch.ao.quantization.quantize_fx.prepare_qat_fx``, plus DAQ/timm preparation.

    Args:
        model: a float model in train mode.
        qconfig_mapping: usually :func:`daq_fx.get_daq_qat_qconfig_mapping`.
        example_inputs: a tuple of inputs (used for tracing and kept for ``convert_fx(exact=True)``).
        prepare_custom_config, backend_config: as in torch.ao. ``backend_config=None`` uses torch's
            config for the backend with dropout sharing its input's qparams.
        backend: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``; default: the one the mapping was made for.
        prepare_timm: replace ``BatchNormAct2d`` (and ``ReLU6`` if ``relu6_to_relu``) first,
            timm's ``Conv2dSame`` by its padding at the size of ``example_inputs``
            (:func:`static_same_padding`), and keep active ``DropPath`` / ``DropBlock2d`` as leaf
            modules that follow train / eval (:func:`stochastic_depth_modules`).
        static_shapes: modules whose Python control flow depends on tensor sizes (timm's ``ConvMlp``
            VGG head) are traced at the sizes of ``example_inputs`` (:func:`static_shape_modules`).
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
    if prepare_timm:
        prepare_custom_config = _with_leaf_modules(prepare_custom_config, stochastic_depth_modules(model))
    specialised = static_shape_modules(model, example_inputs, prepare_custom_config) if static_shapes else []
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
    prepared.meta["daq_static_shape_modules"] = specialised
    prepared.meta["daq_functional_dropouts"] = dropout_follows_training(prepared)
    intermediate_bits = getattr(qconfig_mapping, "daq_intermediate_act_bits", None)
    prepared.meta["daq_intermediate_activations"] = (
        widen_intermediate_activations(prepared, intermediate_bits) if intermediate_bits else [])
    name_quantizers(prepared)
    initialize_weight_quantizers(prepared)
    weight_quantizers_follow_their_layer(prepared)
    _apply_relu6_caps(prepared, anchors)
    _wrap_averages(prepared)
    initialize_activations_off_lattice(prepared)
    refuse_nonfinite_first_batch(prepared)
    prepared.meta["daq_backend"] = backend
    prepared.meta["daq_backend_config"] = backend_config
    prepared.meta["daq_example_inputs"] = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x
                                                for x in example_inputs)
    return prepared
