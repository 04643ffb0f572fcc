"""Graph-mode DAQ quantization of whole models through ``brevitas.graph``.

:func:`quantize_model` runs Brevitas's own pipeline (``preprocess_for_quantize`` then
``brevitas.graph.quantize.quantize``) with copies of Brevitas's default layer maps in which the
quantizers are swapped for the DAQ ones. :func:`quantizer_parameters` splits the DAQ quantizer
state (bounds, scales) from the other parameters for the paper's two-optimizer recipe.
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch

import daq_core
from torch import nn

import brevitas.nn as qnn
from brevitas import config
from brevitas.graph import quantize as bq
from brevitas.graph import quantize_impl as qi
from brevitas.graph.quantize import preprocess_for_quantize
from brevitas.quant import Int32Bias

from daq_core import MAX_BITS, check_bits

from .core import DAQActScaling, DAQWeightScaling
from .cpq import CPQActPerTensor, CPQSignedActPerTensor, CPQWeightPerChannel, CPQWeightPerTensor
from .family import FamilyScaling
from .n2uq import N2UQActPerTensor, N2UQActScaling, N2UQSignedActPerTensor, N2UQWeightPerChannel, N2UQWeightPerTensor
from .quantizers import DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor

__all__ = ["quantize_model", "replace_batchnorm_act", "quantizer_parameters", "daq_layer_maps",
           "check_zero_bn_gamma"]

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: quantizer families: (per-channel weight, per-tensor weight, unsigned activation, signed activation)
QUANTIZER_FAMILIES = {
    "daq": (DAQWeightPerChannel, DAQWeightPerTensor, DAQActPerTensor, DAQSignedActPerTensor),
    "n2uq": (N2UQWeightPerChannel, N2UQWeightPerTensor, N2UQActPerTensor, N2UQSignedActPerTensor),
    "cpq": (CPQWeightPerChannel, CPQWeightPerTensor, CPQActPerTensor, CPQSignedActPerTensor),
}


def _family(quantizer: str):
    if quantizer not in QUANTIZER_FAMILIES:
        raise ValueError(f"quantizer must be one of {tuple(QUANTIZER_FAMILIES)}, got {quantizer!r}")
    return QUANTIZER_FAMILIES[quantizer]


def _declares(injector, name: str) -> bool:
    try:
        return hasattr(injector, name)
    except Exception:   # an injector raises DependencyError for names it cannot resolve
        return False


def _with_options(base, options: Optional[dict]):
    """A subclass of the injector ``base`` with the family's options as class attributes (declaration style)."""
    if not options:
        return base
    unknown = [k for k in options if not _declares(base, k)]
    if unknown:
        raise ValueError(f"family_options {unknown} are not options of {base.__name__}")
    suffix = "".join(f"_{k}{v}" for k, v in sorted(options.items())).replace(".", "p")
    return type(f"{base.__name__}{suffix}", (base,), {**options, "__module__": base.__module__})


def _bits_quantizer(base, bits: int, name: str):
    """A subclass of ``base`` with ``bit_width`` set (declaration style, picklable by name)."""
    bits = check_bits(bits, name, MAX_BITS)
    return type(f"{base.__name__}{bits}b", (base,), {"bit_width": bits, "__module__": base.__module__})


def daq_layer_maps(weight_bit_width: int = 4, act_bit_width: int = 4, per_channel: bool = True,
                   weight_quant=None, act_quant=None, signed_act_quant=None, quantizer: str = "daq",
                   family_options: Optional[dict] = None):
    """Copies of Brevitas's default graph-quantization maps with the DAQ quantizers swapped in.

    ``quantizer="n2uq"`` swaps in the N2UQ family instead (:mod:`daq_brevitas.n2uq`, DAQ-SPEC §8),
    ``quantizer="cpq"`` CPQ (:mod:`daq_brevitas.cpq`) with ``family_options`` (e.g.
    ``{"learn_bits": True}``) set on its injectors; explicit ``weight_quant`` / ``act_quant`` /
    ``signed_act_quant`` override any family.

    Compute layers (conv, linear) get a DAQ weight quantizer and ``Int32Bias`` and return plain
    tensors (``return_quant_tensor=False``: the weight zero point ``-0.5`` has no integer
    accumulator representation); ReLU-like activations get :class:`DAQActPerTensor`, other
    requantization points (inputs, residual adds) :class:`DAQSignedActPerTensor`.

    Returns:
        ``(compute_layer_map, quant_act_map, quant_identity_map, unsigned_act_tuple)``.
    """
    per_channel_weight, per_tensor_weight, unsigned_act, signed_act = (
        _with_options(q, family_options) for q in _family(quantizer))
    # `is None`, not `or`: a Brevitas injector class is falsy (its metaclass has __len__)
    if weight_quant is None:
        weight_quant = per_channel_weight if per_channel else per_tensor_weight
    if act_quant is None:
        act_quant = unsigned_act
    if signed_act_quant is None:
        signed_act_quant = signed_act
    weight_bits = check_bits(weight_bit_width, "weight_bit_width")
    act_bits = check_bits(act_bit_width, "act_bit_width")

    layer_kwargs = dict(weight_quant=weight_quant, weight_bit_width=weight_bits, bias_quant=Int32Bias,
                        return_quant_tensor=False)
    compute_layer_map = copy.copy(bq.COMPUTE_LAYER_MAP)
    for float_cls, entry in list(compute_layer_map.items()):
        if entry is None:
            continue
        if float_cls in _WEIGHT_LAYERS:
            compute_layer_map[float_cls] = (entry[0], dict(layer_kwargs))
        else:  # RNN/LSTM/attention: no DAQ quantizers for them, keep them float
            del compute_layer_map[float_cls]

    unsigned_act = dict(act_quant=act_quant, bit_width=act_bits, return_quant_tensor=True)
    quant_act_map = {
        nn.ReLU: (qnn.QuantReLU, dict(unsigned_act)),
        nn.ReLU6: (qnn.QuantReLU, dict(unsigned_act)),  # upper bound learned: ReLU6's clip is redundant
    }
    quant_identity_map = {
        "signed": (qnn.QuantIdentity, dict(act_quant=signed_act_quant, bit_width=act_bits, return_quant_tensor=True)),
        "unsigned": (qnn.QuantIdentity, dict(act_quant=act_quant, bit_width=act_bits, return_quant_tensor=True)),
    }
    unsigned_act_tuple = (nn.ReLU, nn.ReLU6)
    return compute_layer_map, quant_act_map, quant_identity_map, unsigned_act_tuple


def replace_batchnorm_act(model: nn.Module) -> nn.Module:
    """Replace timm's ``BatchNormAct2d`` (norm + drop + act in one module) by ``Sequential(BatchNorm2d, drop, act)``.

    Under tracing, ``BatchNormAct2d`` is traced into ``F.batch_norm`` with ``training`` frozen and its
    activation is hidden from the layer maps (and Brevitas's QuantTensor has no ``ndim`` it reads);
    the plain modules trace, fuse and quantize normally. Works in place; returns ``model``.
    """
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is optional
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict(), strict=False)
            bn.to(device=child.weight.device if child.weight is not None else None)
            bn.train(child.training)
            parts = [bn]
            for extra in (getattr(child, "drop", None), getattr(child, "act", None)):
                if extra is not None and not isinstance(extra, nn.Identity):
                    parts.append(extra)
            setattr(model, name, nn.Sequential(*parts) if len(parts) > 1 else bn)
        else:
            replace_batchnorm_act(child)
    return model


def check_zero_bn_gamma(model: nn.Module) -> List[str]:
    """Names of BatchNorm layers whose scale γ is all zero (timm's ``zero_init_last`` without pretrained weights).

    Such a block outputs a constant: its convolution gets no gradient and the first-batch statistics of
    the following quantizers are degenerate. :func:`quantize_model` warns about them.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight is not None:
            if bool((m.weight.detach() == 0).all()):
                names.append(name)
    return names


def _weight_layer_names(graph_model: nn.Module) -> List[str]:
    """Names of the conv/linear modules in execution order of the traced graph."""
    names = []
    for node in graph_model.graph.nodes:
        if node.op == "call_module":
            mod = graph_model.get_submodule(node.target)
            if isinstance(mod, _WEIGHT_LAYERS) and node.target not in names:
                names.append(node.target)
    return names


def _to_float_layer(module: nn.Module) -> nn.Module:
    """A plain ``nn.Conv*``/``nn.Linear`` with the weights of a Brevitas quant layer."""
    if isinstance(module, nn.Linear):
        layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[module.weight.dim() - 2]
        layer = conv_cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                         padding=module.padding, dilation=module.dilation, groups=module.groups,
                         bias=module.bias is not None, padding_mode=module.padding_mode)
    layer.weight = module.weight
    if module.bias is not None:
        layer.bias = module.bias
    layer.train(module.training)
    return layer


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _remove_identities(graph_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop ``nn.Identity`` calls (timm's ``drop_block``/``aa`` placeholders) so that Brevitas sees conv → bn → act."""
    for node in list(graph_model.graph.nodes):
        if node.op == "call_module" and type(graph_model.get_submodule(node.target)) is nn.Identity:
            if len(node.args) == 1 and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                graph_model.graph.erase_node(node)
    graph_model.graph.eliminate_dead_code()
    graph_model.delete_all_unused_submodules()
    graph_model.recompile()
    return graph_model


def _keep_float(qmodel: torch.fx.GraphModule, names: Iterable[str]) -> None:
    """Turn the named quant layers back into float layers, with float inputs and outputs.

    Quant identities that only feed (or only consume) a kept layer are replaced by ``nn.Identity``.
    """
    calls: Dict[str, int] = {}
    for node in qmodel.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in qmodel.graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        _set_submodule(qmodel, node.target, _to_float_layer(qmodel.get_submodule(node.target)))
        # requantizers that only feed this layer, and requantizers of its output
        inputs = [a for a in node.all_input_nodes if len(a.users) == 1]
        for other in inputs + list(node.users):
            if other.op == "call_module" and calls.get(other.target) == 1 and isinstance(
                    qmodel.get_submodule(other.target), qnn.QuantIdentity):
                _set_submodule(qmodel, other.target, nn.Identity())


def _plain_tensor_outputs(graph_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make the modules that produce the graph outputs return plain tensors (not QuantTensors)."""
    for node in graph_model.graph.nodes:
        if node.op == "output":
            for arg in node.all_input_nodes:
                if arg.op == "call_module":
                    mod = graph_model.get_submodule(arg.target)
                    if hasattr(mod, "return_quant_tensor"):
                        mod.return_quant_tensor = False
    return graph_model


def quantize_model(model: nn.Module, weight_bit_width: int = 4, act_bit_width: int = 4,
                   keep_first_last_float: bool = True, per_channel: bool = True, merge_bn: bool = False,
                   align_residuals: bool = False, weight_quant=None, act_quant=None,
                   signed_act_quant=None, quantizer: str = "daq",
                   family_options: Optional[dict] = None) -> torch.fx.GraphModule:
    """Quantize any traceable model (timm included) with DAQ through Brevitas's graph machinery.

    Steps: timm ``BatchNormAct2d`` → ``BatchNorm2d`` + activation; ``preprocess_for_quantize``
    (Brevitas's tracing and canonicalisation, ReLU6 → ReLU); then Brevitas's graph handlers with
    :func:`daq_layer_maps` — DAQ weights + ``Int32Bias`` on every conv/linear, unsigned DAQ
    (:class:`DAQActPerTensor`) on ReLUs, a signed DAQ quantizer on every other conv/linear input.
    Bounds and scales are initialised on the first forward pass (DAQ-SPEC §3-5): run one
    representative batch before training or export.

    Args:
        model: float model (modified in place where possible; pass a copy to keep the original).
        weight_bit_width, act_bit_width: ``b`` for weights and activations (1..8).
        keep_first_last_float: keep the first and last weight layers with their inputs and outputs
            in float, as the paper does for ResNets; ``False`` quantizes everything (the paper's
            "fully quantized" MobileNet-V2).
        per_channel: per-output-channel weight standardisation, bounds and scales.
        merge_bn: fold BatchNorm into the preceding conv first. The paper trains with BN
            unfolded (default ``False``).
        align_residuals: ``False`` (default) quantizes what the paper quantizes — the inputs and
            weights of conv/linear layers — and leaves residual adds in float. ``True`` runs
            Brevitas's full ``brevitas.graph.quantize.quantize``, which also requantizes layer
            outputs and aligns the inputs of residual adds to a shared quantizer (integer-only
            graph; more quantization points).
        weight_quant, act_quant, signed_act_quant: override the DAQ quantizer classes.
        quantizer: ``"daq"`` (default) or ``"n2uq"``: the quantizer family placed everywhere
            (:mod:`daq_brevitas.n2uq`: learned non-uniform activation thresholds with uniform output
            levels, ``α``-scaled no-zero weights; DAQ-SPEC §8) or ``"cpq"`` (:mod:`daq_brevitas.cpq`, CPQ
            reconstructed from the abstract). Everything else is the same.
        family_options: options of the family's injectors, e.g. ``{"learn_bits": True}`` for CPQ
            (the bit-widths then are the largest ones; each quantizer learns its own).

    Returns:
        The quantized ``torch.fx.GraphModule`` (in the training mode of ``model``).

    Example:
        >>> import timm
        >>> qmodel = quantize_model(timm.create_model("resnet18", pretrained=False, num_classes=10))
        >>> _ = qmodel.eval()(torch.randn(2, 3, 32, 32))   # first batch initialises bounds and scales
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    maps = daq_layer_maps(weight_bit_width, act_bit_width, per_channel, weight_quant, act_quant, signed_act_quant,
                          quantizer=quantizer, family_options=family_options)
    compute_layer_map, quant_act_map, quant_identity_map, unsigned_act_tuple = maps

    zero_gamma = check_zero_bn_gamma(model)
    if zero_gamma:
        warnings.warn(f"{len(zero_gamma)} BatchNorm layers have all-zero γ (e.g. '{zero_gamma[0]}'): timm's "
                      f"zero_init_last without pretrained weights. Those blocks output constants; load pretrained "
                      f"weights or create the model with zero_init_last=False.", stacklevel=2)

    training = model.training
    model = replace_batchnorm_act(model)
    graph_model = preprocess_for_quantize(model, merge_bn=merge_bn, relu6_to_relu=True)
    graph_model = _remove_identities(graph_model)
    float_layers = _weight_layer_names(graph_model)
    if align_residuals:
        qmodel = bq.quantize(graph_model, quant_identity_map=quant_identity_map, compute_layer_map=compute_layer_map,
                             quant_act_map=quant_act_map, unsigned_act_tuple=unsigned_act_tuple)
    else:
        ignore_missing_keys = config.IGNORE_MISSING_KEYS
        config.IGNORE_MISSING_KEYS = True  # the float checkpoint has no quantizer state
        try:
            graph_model.eval()
            if not keep_first_last_float:
                graph_model = qi.inp_placeholder_handler(graph_model, quant_identity_map["signed"])
            graph_model = qi.act_handler(graph_model, layer_map=quant_act_map)
            graph_model = qi.layer_handler(graph_model, layer_map=compute_layer_map, requantize_output=False,
                                           quant_identity_map=quant_identity_map, quant_act_map=quant_act_map,
                                           unsigned_act_tuple=unsigned_act_tuple)
            qmodel = _plain_tensor_outputs(graph_model)
        finally:
            config.IGNORE_MISSING_KEYS = ignore_missing_keys
    if keep_first_last_float and float_layers:
        _keep_float(qmodel, {float_layers[0], float_layers[-1]})
        for node in qmodel.graph.nodes:  # the network input stays float too
            if node.op == "placeholder":
                for user in list(node.users):
                    if user.op == "call_module" and isinstance(qmodel.get_submodule(user.target), qnn.QuantIdentity):
                        _set_submodule(qmodel, user.target, nn.Identity())
    qmodel.train(training)
    return qmodel


def quantizer_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Split parameters into quantizer state and the rest.

    Quantizer state: DAQ's bounds ``l, u`` and output scales ``s``, N2UQ's activation start ``s``,
    widths ``a`` and output scale (:class:`N2UQActScaling`; N2UQ weights have no learned state), and
    the state of every :class:`daq_brevitas.FamilyScaling` (CPQ: steps, noise scales, bit gates).

    The paper trains the quantizer parameters with Adam (lr 1e-4, no weight decay) and the weights
    with SGD (DAQ-SPEC §6). ``load_state_dict`` on a Brevitas model rebuilds the quantizers (new
    Parameter objects): build the optimizers *after* loading a checkpoint.

    Returns:
        ``(quantizer_params, other_params)``, disjoint, covering every parameter once.

    Example:
        >>> q, w = quantizer_parameters(qmodel)                      # doctest: +SKIP
        >>> opt_q = torch.optim.Adam(q, lr=1e-4)
        >>> opt_w = torch.optim.SGD(w, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    """
    return daq_core.split_parameters(model, (DAQWeightScaling, DAQActScaling, N2UQActScaling, FamilyScaling))
