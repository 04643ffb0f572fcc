"""``daq_fx.convert_fx``: bake DAQ weights, lower with torch.ao, clamp sub-8-bit activations.

Two facts about torch.ao's lowering make a plain ``convert_fx`` silently wrong for DAQ
(INTEGRATION-NOTES, torch.ao FX):

1. Weights are quantized from the *float* weight with ``round(W / scale)`` and no clamp,
   not through the fake-quant forward. DAQ standardises and clips, so the weights are
   first *baked*: ``W ← fq(W · f) / f`` (``f`` the BN fold factor of ConvBn modules,
   1 otherwise) and the weight fake-quant is switched off. BN folding then reproduces
   ``fq(W · f)`` to ~1 ulp and ``round`` lands exactly on the odd-integer grid.
2. Lowered int8 kernels saturate at 0..255, not at the fake-quant's ``quant_max = 2^b - 1``.
   With ``exact=True`` a quantized clamp (in-place ``F.hardtanh``) is inserted after every op
   that produces new quantized values (its output qparams differ from its inputs'), restoring
   the fake-quant's clip at ``u``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.ao.quantization import quantize_fx as _quantize_fx

from .fake_quantize import FamilyFakeQuantize
from .n2uq import check_convertible
from .prepare import _fold_shape, weight_fold_factor
from .qconfig import get_daq_backend_config

__all__ = ["bake_weight", "bake_daq_weights", "convert_fx", "insert_activation_clamps", "activation_grids",
           "quantized_zero_padding", "output_agreement", "ExactQuantizedConv", "exact_saturating_layers",
           "INT16_PAIR_LIMIT"]


@torch.no_grad()
def bake_weight(fake_quant: FamilyFakeQuantize, weight: torch.Tensor,
                fold_factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float weight that any ``round(W f / scale)`` lowering turns into DAQ's integers.

    Returns ``fq(W · f) / f`` (``f`` reshaped to broadcast on the output-channel axis, or 1).
    Framework-neutral: the FX convert below and a pt2e flow use the same function. N2UQ weights
    (:class:`daq_fx.N2UQFakeQuantize`) lie on the same odd-integer grid and are baked the same way.

    Raises:
        ValueError: if ``f`` is zero in some channel (zero BN γ): the fold cannot be undone.
    """
    if not isinstance(fake_quant, FamilyFakeQuantize) or not fake_quant.is_weight:
        raise TypeError(f"fake_quant must be a weight DAQFakeQuantize, N2UQFakeQuantize or CPQFakeQuantize"
                        f" (a daq_fx.FamilyFakeQuantize), got {fake_quant!r}")
    if fold_factor is not None and bool((fold_factor == 0).any()):
        raise ValueError("fold_factor (BatchNorm gamma / sqrt(var + eps)) is zero in some channel: the baked"
                         " weight would be inf. Re-initialise the BatchNorm gamma (timm: zero_init_last=False).")
    training = fake_quant.training
    fake_quant.eval()    # the eval forward (CPQ: no DropBits) whatever mode a frozen-BN ConvBn left it in
    try:
        if fold_factor is None:
            return fake_quant(weight).detach()
        return (fake_quant(weight * fold_factor) / fold_factor).detach()
    finally:
        fake_quant.train(training)


@torch.no_grad()
def bake_daq_weights(model: nn.Module) -> List[str]:
    """Write DAQ's (or N2UQ's) fake-quantized weights into every module with such a ``weight_fake_quant``.

    For fused ConvBn QAT modules the BN fold factor ``γ / sqrt(running_var + eps)`` is taken into
    account; the fake-quant is then disabled (observer too), so the QAT model's eval output is
    unchanged (up to ~1 ulp) and torch.ao's convert quantizes exactly onto the grid.
    Modules are modified in place.

    Returns:
        The names of the baked modules.
    """
    baked = []
    for name, module in model.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, FamilyFakeQuantize) or fq.fake_quant_enabled[0] == 0:
            continue
        factor = weight_fold_factor(module)
        if factor is not None:
            if bool((factor == 0).any()):
                raise ValueError(f"module {name!r}: BatchNorm gamma is zero in some channel, the folded weight cannot"
                                 " be baked. Re-initialise gamma (timm: zero_init_last=False) and retrain.")
            factor = factor.reshape(_fold_shape(module, module.weight))
        if fq.initialized[0] == 0:
            fq.initialize(module.weight if factor is None else module.weight * factor)
        module.weight.copy_(bake_weight(fq, module.weight, factor))
        fq.disable_fake_quant()
        fq.disable_observer()
        baked.append(name)
    if isinstance(model, fx.GraphModule):
        baked += _bake_functional_weights(model)
    return baked


def _bake_functional_weights(model: fx.GraphModule) -> List[str]:
    """Bake weights that reach a functional ``F.linear`` / ``F.conv*`` through a weight quantizer node.

    Modules that torch.ao does not swap for QAT modules are traced through (e.g. timm's
    ``timm.layers.Linear``, the classifier of MobileNetV3): their weight is a ``get_attr`` node
    followed by the weight fake-quant as an ``activation_post_process``. Lowering quantizes that
    float weight with ``round(W / scale)`` just like module weights, so it is baked the same way
    (no BN fold: torch.ao does not fuse functional ops with BN).
    """
    baked = []
    for node in model.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        fq = model.get_submodule(node.target)
        source = node.args[0]
        if not isinstance(fq, FamilyFakeQuantize) or not fq.is_weight \
                or fq.fake_quant_enabled[0] == 0 or not isinstance(source, fx.Node) or source.op != "get_attr":
            continue
        owner, _, attr = source.target.rpartition(".")
        weight = getattr(model.get_submodule(owner) if owner else model, attr)
        if fq.initialized[0] == 0:
            fq.initialize(weight)
        weight.copy_(bake_weight(fq, weight))
        fq.disable_fake_quant()
        fq.disable_observer()
        baked.append(source.target)
    return baked


def activation_grids(model: nn.Module) -> List[Tuple[float, int, int]]:
    """``(scale, zero_point, quant_max)`` of every DAQ / CPQ activation quantizer in a prepared model.

    CPQ quantizers report their learned bit-width's grid (``quant_max = 2^b - 1``).
    """
    grids = []
    for module in model.modules():
        if isinstance(module, FamilyFakeQuantize) and not module.is_weight and module.fake_quant_enabled[0] == 1 \
                and module.family.convertible_activations:
            scale, zero_point = module.calculate_qparams()
            grids.append((float(scale.item()), int(zero_point.item()), module.quant_max))
    return grids


class _QParamsRecorder(fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.qparams: Dict[fx.Node, Tuple[float, int]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_quantized and out.qscheme() == torch.per_tensor_affine:
            self.qparams[n] = (float(out.q_scale()), int(out.q_zero_point()))
        return out


def _find_grid(grids, scale: float, zero_point: int) -> Optional[int]:
    for g_scale, g_zero_point, quant_max in grids:
        if g_zero_point == zero_point and abs(g_scale - scale) <= 1e-6 * abs(g_scale):
            return quant_max
    return None


def _spatial_mean_keepdim(node: fx.Node):
    """``(input, keepdim)`` if ``node`` is ``x.mean((2, 3)[, keepdim])`` / ``torch.mean`` of that form."""
    if node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean:
        args = list(node.args)
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, (tuple, list)) and tuple(dims) in ((2, 3), (-2, -1)) and isinstance(keepdim, bool):
            return args[0], keepdim
    return None


def _rewrite_spatial_means(graph: fx.Graph, quantized: Dict[fx.Node, Tuple[float, int]]) -> int:
    """Quantized ``mean((2, 3))`` on channels-last tensors resolves exact ties by float error
    (seen: code 9.5 → 9), ``adaptive_avg_pool2d(x, 1)`` rounds them half to even like the QAT
    model (see ``AveragedActivation``): use the latter."""
    count = 0
    for node in list(graph.nodes):
        match = _spatial_mean_keepdim(node)
        if match is None or node not in quantized:
            continue
        source, keepdim = match
        with graph.inserting_before(node):
            pooled = graph.call_function(torch.nn.functional.adaptive_avg_pool2d, (source, 1))
            result = pooled if keepdim else graph.call_method("flatten", (pooled, 1))
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        quantized[pooled] = quantized.pop(node)
        if not keepdim:
            quantized[result] = quantized[pooled]
        count += 1
    return count


def quantized_zero_padding(converted: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> int:
    """Run ``nn.ZeroPad2d`` on the quantized tensor instead of ``dequantize → pad → quantize``.

    torch.ao lowers no quantized pad, so a pad that shares its input's quantizer (see
    :func:`daq_fx.get_daq_backend_config`; static "same" padding, :func:`daq_fx.static_same_padding`)
    becomes a float round trip. Where the requantization uses the input's own (scale, zero
    point), found by running ``example_inputs``, the quantized pad writes the same codes (0 → the
    zero point) without it. Returns the number of pads rewritten (the model is modified in place).
    """
    graph = converted.graph
    candidates = []
    for node in graph.nodes:
        users = list(node.users)
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 else None
        if isinstance(source, fx.Node) and isinstance(converted.get_submodule(node.target), nn.ZeroPad2d) \
                and source.op == "call_method" and source.target == "dequantize" and len(users) == 1 \
                and users[0].target is torch.quantize_per_tensor:
            candidates.append((node, source, users[0]))
    if not candidates:
        return 0
    recorder = _QParamsRecorder(converted)
    with torch.no_grad():
        recorder.run(*example_inputs)
    count = 0
    for pad, dequantize, quantize in candidates:
        quantized = dequantize.args[0]
        if quantized in recorder.qparams and recorder.qparams[quantized] == recorder.qparams.get(quantize):
            pad.replace_input_with(dequantize, quantized)
            quantize.replace_all_uses_with(pad)
            graph.erase_node(quantize)
            count += 1
    graph.eliminate_dead_code()
    graph.lint()
    converted.recompile()
    return count


def _requantizes(node: fx.Node, converted: fx.GraphModule) -> bool:
    """Whether ``node`` computes new values and rounds them onto its output grid (conv, linear, add,
    mul, quantize, ...), as opposed to moving or pooling its input's codes.

    Such an op needs its clamp even when its output grid happens to equal an input's (seen on a
    pretrained efficientnet_lite0: ReLU6-capped activations whose bounds both settle at ``[0, 6]``).
    """
    if node.op == "call_module":
        module = converted.get_submodule(node.target)
        return hasattr(module, "scale") and hasattr(module, "zero_point")   # quantized modules with own qparams
    if node.op == "call_function":
        return node.target is torch.quantize_per_tensor or str(node.target).startswith("quantized.")
    return False


def insert_activation_clamps(converted: fx.GraphModule, grids, example_inputs: Tuple[Any, ...],
                             contiguous: bool = False) -> int:
    """Insert a quantized clamp after every op whose quantized output lies on a sub-8-bit DAQ grid.

    Which ops: those that requantize (quantize_per_tensor, conv, linear, add, mul, hardswish, ...)
    and any other op whose output (scale, zero point) differs from those of all its quantized
    inputs, found by running ``example_inputs`` through ``converted``; ops that only move or pool
    values of an input on the same grid keep them in range.
    The clamp bounds are the grid's codes ``0`` and ``quant_max`` (±¼ step of margin against
    float rounding; the quantized clamp re-rounds them to those codes). The clamp is
    ``F.hardtanh(x, min, max, inplace=True)``: on quantized tensors it writes ``torch.clamp``'s
    codes into the op's own output (every user of which now reads the clamp); torch computes the
    quantized clamp out of place and copies it back, yet this measured ~1.2 ms of ~25 ms faster
    than ``torch.clamp`` (mobilenetv2_100 224 px batch 8, 65 clamps, interleaved A/B, 1 and 2
    threads).

    Returns:
        The number of clamps inserted.
    """
    recorder = _QParamsRecorder(converted)
    with torch.no_grad():
        recorder.run(*example_inputs)
    graph = converted.graph
    _rewrite_spatial_means(graph, recorder.qparams)
    targets = []
    for node in graph.nodes:   # decide on the unmodified graph
        if node not in recorder.qparams:
            continue
        scale, zero_point = recorder.qparams[node]
        quant_max = _find_grid(grids, scale, zero_point)
        if quant_max is None or quant_max >= 255:
            continue
        inputs = [a for a in node.all_input_nodes if a in recorder.qparams]
        if not _requantizes(node, converted) and any(recorder.qparams[a] == (scale, zero_point) for a in inputs):
            continue   # moves or pools values of an input on the same grid: they stay in range
        targets.append((node, scale, zero_point, quant_max))
    count = 0
    for node, scale, zero_point, quant_max in targets:
        users = list(node.users)
        with graph.inserting_after(node):
            source = node
            if contiguous:
                source = graph.call_method("contiguous", (node,))
            with graph.inserting_after(source):
                clamp = graph.call_function(nn.functional.hardtanh, (source,), {
                    "min_val": (-zero_point - 0.25) * scale, "max_val": (quant_max - zero_point + 0.25) * scale,
                    "inplace": True})
        for user in users:
            user.replace_input_with(node, clamp)
        count += 1
    graph.lint()
    converted.recompile()
    return count


def _on_cpu(value):
    """``value`` with every tensor in it (tuples, lists, dicts) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def check_on_cpu(model: nn.Module) -> None:
    """torch.ao's int8 kernels (x86, fbgemm, qnnpack) run on the CPU: refuse a model still on a GPU."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    off = sorted(str(d) for d in devices if d.type != "cpu")
    if off:
        raise ValueError(f"convert_fx lowers to torch.ao's CPU int8 kernels, but the model is on {', '.join(off)}:"
                         " move the trained QAT model to the CPU first, e.g. daq_fx.convert_fx(copy.deepcopy(qat)"
                         ".cpu()) (keep training on the GPU; convert on the CPU)")


#: x86 int8 kernels without VNNI (fbgemm's AVX2 paths, its depthwise kernels, oneDNN's AVX2 convs) add
#: pairs of uint8 x int8 products in saturating int16 (``vpmaddubsw``): exact only while
#: ``2 * max_code * max|w| <= INT16_PAIR_LIMIT``, e.g. not for 7-bit weights with 8-bit activations
INT16_PAIR_LIMIT = 32767


class ExactQuantizedConv(nn.Module):
    """A quantized conv / linear computed exactly, for layers whose torch.ao x86 kernel can saturate.

    fbgemm (torch.ao's ``x86`` / ``fbgemm`` engines on CPUs without AVX512-VNNI, and its depthwise
    kernels) multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds *pairs* of
    products in saturating int16: with 8-bit activations and 7-bit DAQ weights (|w| up to 127,
    2 · 255 · 127 > 32767) the accumulators are wrong (measured: 62 % of a random W7A8 conv's outputs,
    up to 91 codes off; a pretrained EfficientNet-Lite0 at W7A8 agreed with its QAT model on 28 % of
    predictions instead of 94 %). This module takes the lowered module's integer weights, scales,
    bias and output qparams and computes ``acc = Σ (x − z_x) · w`` exactly (float32 when every sum is
    below 2^24, float64 otherwise), then fbgemm's requantisation ``round((acc + b / (s_x s_w)) ·
    (s_x s_w / s_y)) + z_y`` in float32 — the codes a non-saturating kernel returns. Slower than the
    int8 kernel (a float conv); used only where the bound is exceeded (:func:`exact_saturating_layers`).
    """

    def __init__(self, module: nn.Module, input_quant_max: int, relu: bool) -> None:
        super().__init__()
        weight = module.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = weight.q_per_channel_scales().to(torch.float32)
            if bool((weight.q_per_channel_zero_points() != 0).any()):
                raise ValueError("ExactQuantizedConv needs symmetric weights (zero point 0)")
        else:
            scales = torch.full((weight.shape[0],), float(weight.q_scale()), dtype=torch.float32)
            if int(weight.q_zero_point()) != 0:
                raise ValueError("ExactQuantizedConv needs symmetric weights (zero point 0)")
        self.register_buffer("int_weight", weight.int_repr().to(torch.float32))
        self.register_buffer("weight_scales", scales)
        bias = module.bias()
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.is_linear = self.int_weight.dim() == 2
        if not self.is_linear:
            self.stride, self.padding, self.dilation, self.groups = (module.stride, module.padding, module.dilation,
                                                                     module.groups)
        self.scale, self.zero_point = float(module.scale), int(module.zero_point)
        self.relu = relu
        self.input_quant_max = int(input_quant_max)
        self.kind = type(module).__name__

    def _accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        weight = self.int_weight
        bound = float(codes.abs().max()) * float(weight.abs().flatten(1).sum(1).max()) if codes.numel() else 0.0
        dtype = torch.float32 if bound < 2 ** 24 else torch.float64
        codes, weight = codes.to(dtype), weight.to(dtype)
        if self.is_linear:
            return nn.functional.linear(codes, weight)
        conv = {3: nn.functional.conv1d, 4: nn.functional.conv2d, 5: nn.functional.conv3d}[codes.dim()]
        return conv(codes, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x.int_repr().to(torch.float32) - float(x.q_zero_point())
        acc = self._accumulate(codes).to(torch.float32)
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        act_times_w = torch.tensor(x.q_scale(), dtype=torch.float32) * self.weight_scales
        if self.bias is not None:
            acc = acc + (self.bias / act_times_w).reshape(shape)
        y = acc * (act_times_w / torch.tensor(self.scale, dtype=torch.float32)).reshape(shape)
        q = torch.round(y) + self.zero_point
        q = q.clamp(self.zero_point if self.relu else 0, 255).to(torch.uint8)
        return torch._make_per_tensor_quantized_tensor(q, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return (f"{self.kind}, exact integer accumulation (int8 kernel would saturate: input codes up to"
                f" {self.input_quant_max}, |w| up to {int(self.int_weight.abs().max())})")


def exact_saturating_layers(converted: fx.GraphModule, grids, example_inputs: Tuple[Any, ...]) -> List[str]:
    """Replace every quantized conv / linear whose x86 int8 kernel can saturate by :class:`ExactQuantizedConv`.

    At risk: ``2 · q_max · max|w| > 32767`` with ``q_max`` the input activation's largest code (its
    DAQ grid's ``quant_max``; 255 for inputs without one) and ``w`` the int8 weights. DAQ at ≤ 6-bit
    weights, or ≤ 7-bit activations with 7-bit weights, never is. Returns the replaced module names.
    """
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    recorder = _QParamsRecorder(converted)
    with torch.no_grad():
        recorder.run(*example_inputs)
    replaced = []
    for node in converted.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        module = converted.get_submodule(node.target)
        if not isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)):
            continue
        qparams = recorder.qparams.get(node.args[0])
        if qparams is None:
            continue
        quant_max = _find_grid(grids, *qparams) or 255
        max_weight = int(module.weight().int_repr().abs().max())
        if 2 * quant_max * max_weight <= INT16_PAIR_LIMIT:
            continue
        relu = isinstance(module, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d, nniq.LinearReLU))
        owner, _, attr = node.target.rpartition(".")
        setattr(converted.get_submodule(owner) if owner else converted, attr,
                ExactQuantizedConv(module, quant_max, relu))
        replaced.append(node.target)
    if replaced:
        converted.recompile()
    return replaced


def convert_fx(graph_module: fx.GraphModule, convert_custom_config=None, _remove_qconfig: bool = True,
               qconfig_mapping=None, backend_config=None, *, exact: bool = True,
               example_inputs: Optional[Tuple[Any, ...]] = None, inplace: bool = False) -> fx.GraphModule:
    """Same signature as ``torch.ao.quantization.quantize_fx.convert_fx``, plus DAQ's bake and clamps.

    Args:
        graph_module: a model from :func:`daq_fx.prepare_qat_fx` (or the stock prepare with a DAQ
            qconfig mapping; then pass ``backend_config`` and ``example_inputs``).
        exact: insert quantized clamps so that the int8 model reproduces the fake-quant model
            (``x86``/``fbgemm``: to float rounding), and compute layers whose x86 int8 kernel can
            saturate int16 pair sums (7-bit weights with 8-bit activations) exactly instead
            (:class:`ExactQuantizedConv`, listed in ``meta["daq_exact_layers"]``). ``exact=False``
            skips both: faster, but a sub-8-bit activation above its learned upper bound ``u`` is
            then clipped only at code 255 — **not exact** (outputs differ from the QAT model).
        example_inputs: inputs used to find the ops to clamp and the zero pads that can run on
            quantized tensors (:func:`quantized_zero_padding`; default: those given to prepare).
        inplace: bake into ``graph_module`` itself (default: into a deep copy; the QAT model is
            left untouched).

    Returns:
        The lowered int8 model (call ``.eval()``-mode only).

    Raises:
        N2UQConvertError: the model has enabled N2UQ activation quantizers (their learned
            non-uniform thresholds have no int8-kernel equivalent); the message names them.
        ValueError: the model is not on the CPU (train on the GPU, then ``convert_fx(qat.cpu())``;
            example inputs recorded on the GPU by prepare are moved to the CPU here).
    """
    if not isinstance(graph_module, fx.GraphModule):
        raise TypeError(f"graph_module must be a prepared torch.fx.GraphModule, got {type(graph_module).__name__}")
    check_convertible(graph_module)   # never lower N2UQ activations with uniform thresholds
    check_on_cpu(graph_module)
    meta = getattr(graph_module, "meta", {})
    backend = meta.get("daq_backend", "x86")
    if backend_config is None:
        backend_config = meta.get("daq_backend_config") or get_daq_backend_config(backend)
    if example_inputs is None:
        example_inputs = meta.get("daq_example_inputs")
    if example_inputs is not None:     # e.g. the GPU inputs given to prepare: the int8 model runs on the CPU
        example_inputs = _on_cpu(tuple(example_inputs))
    if exact and example_inputs is None:
        raise ValueError("convert_fx(exact=True) needs example_inputs to find the ops to clamp: pass"
                         " example_inputs=(x,), prepare with daq_fx.prepare_qat_fx, or use exact=False")
    model = graph_module if inplace else copy.deepcopy(graph_module)
    was_training = model.training
    model.eval()
    bake_daq_weights(model)
    grids = activation_grids(model)
    converted = _quantize_fx.convert_fx(model, convert_custom_config=convert_custom_config,
                                        _remove_qconfig=_remove_qconfig, qconfig_mapping=qconfig_mapping,
                                        backend_config=backend_config)
    converted.meta["daq_backend"] = backend
    converted.meta["daq_activation_clamps"] = 0
    converted.meta["daq_quantized_pads"] = (quantized_zero_padding(converted, tuple(example_inputs))
                                            if example_inputs is not None else 0)
    converted.meta["daq_exact_layers"] = []
    if exact and backend in ("x86", "fbgemm"):
        converted.meta["daq_exact_layers"] = exact_saturating_layers(converted, grids, tuple(example_inputs))
    if exact:
        converted.meta["daq_activation_clamps"] = insert_activation_clamps(
            converted, grids, tuple(example_inputs), contiguous=(backend == "qnnpack"))
    if inplace and was_training:
        model.train()
    return converted.eval()


@torch.no_grad()
def output_agreement(expected: torch.Tensor, got: torch.Tensor, atol: float = 1e-4) -> Dict[str, float]:
    """How closely a converted model's outputs ``got`` reproduce the QAT model's ``expected`` (N x C).

    Returns ``top1`` (fraction of rows with the same argmax), ``cosine`` (cosine similarity of the
    flattened outputs, in float64) and ``bit_exact_samples`` (fraction of rows equal to ``atol``).
    """
    if expected.shape != got.shape or expected.dim() != 2:
        raise ValueError(f"expected and got must be N x C outputs of the same shape, got {tuple(expected.shape)}"
                         f" and {tuple(got.shape)}")
    return {"top1": (expected.argmax(1) == got.argmax(1)).float().mean().item(),
            "cosine": torch.nn.functional.cosine_similarity(expected.flatten().double(), got.flatten().double(),
                                                            0).item(),
            "bit_exact_samples": ((expected - got).abs().amax(1) < atol).float().mean().item()}
