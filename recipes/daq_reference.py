"""The DAQ authors' released CIFAR-10 ResNet-20 checkpoints, loaded into this project's quantizers.

The authors released three models (``../shared/data/daq-reference/``: ``cifar10_fp.pth``,
``cifar10_W1A1.pth``, ``cifar10_W1A32.pth``; their layout and eval forward are restated in
``../shared/docs/DAQ-REFERENCE.md``). This module puts them into

* :func:`load_reference_float` — the float model ``resnet20_daq_reference`` (timm-registered);
* :func:`to_brevitas` — ``daq_brevitas`` layers: each quantized conv becomes a Brevitas
  ``QuantConv2d`` with a DAQ input quantizer and a per-tensor DAQ weight quantizer (BN, residual
  adds, stem and head stay float: the authors' quantization points exactly);
* :func:`to_daq_fx` — a torch.ao FX QAT model prepared by :func:`daq_fx.prepare_qat_fx` with the
  same quantization points, which :func:`convert_reference_fx` lowers to an x86 int8 model.

The reference quantizer state per conv is ``lW, uW`` (weight interval on the standardised
weight), ``uA`` (activation upper bound, lower bound 0) and ``beta`` (output scale); the model
computes ``|beta|·conv2d(A_q, W_q)`` with ``W_q ∈ [-1, 1]``, ``A_q ∈ [0, 1]``. Our quantizers
standardise the weight the same way (``daq_core.standardize``: mean and unbiased std, the same
float operations), keep activations in natural units (``uA·A_q``) and fold the scale into the
weight (``s·W_q``), so the exact re-parametrisation is::

    weight lower, upper    = lW, uW
    activation upper bound = uA        (A1);  none (A32: float activations)
    weight output scale  s = |beta| / uA   (A1);  |beta|  (A32)

so that ``s·W_q * uA·A_q = |beta|·W_q*A_q`` term by term.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .models import DAQReferenceResNet, ModelError

__all__ = ["ReferenceCheckpointError", "read_reference_checkpoint", "reference_bits", "load_reference_float",
           "reference_quantizer_state", "to_brevitas", "to_daq_fx", "convert_reference_fx",
           "reference_no_fusion_backend_config", "calibrate_output_grids", "normalize_images",
           "prepare_reference_fx", "set_output_grids"]

#: per quantized conv, the authors' quantizer state (``lA`` too in their A32 checkpoints)
QUANTIZER_KEYS = ("lW", "uW", "uA", "beta")
#: the authors' input normalisation (``DAQ-REFERENCE.md``: ImageNet statistics, not CIFAR's)
from .data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


class ReferenceCheckpointError(ModelError):
    """A file that is not one of the authors' checkpoints, or lacks a key; the message names it."""


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``N x 3 x 32 x 32`` → the authors' input: ``(x/255 - mean) / std`` with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def read_reference_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of one of the authors' checkpoint files (checked to be their ResNet-20)."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceCheckpointError(f"reference checkpoint {p} does not exist (the authors' files are"
                                       f" cifar10_fp.pth, cifar10_W1A1.pth, cifar10_W1A32.pth)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ReferenceCheckpointError(f"cannot read reference checkpoint {p}: {type(e).__name__}: {e}") from e
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
        raise ReferenceCheckpointError(f"{p} has no 'state_dict' entry: it is not one of the DAQ authors'"
                                       f" checkpoints (a dict with 'state_dict', 'optimizer_dict', 'epoch')")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj["state_dict"].items()}
    if "layer1.block_0.0.conv1.weight" not in sd:
        example = next(iter(sd), "<empty>")
        raise ReferenceCheckpointError(
            f"{p} lacks 'layer1.block_0.0.conv1.weight' (its first key is {example!r}): not the DAQ authors'"
            f" ResNet-20 layout. A checkpoint of this project's resnet20_cifar (keys 'layer1.0.conv1.weight')"
            f" loads with recipes.models.create_model('resnet20_cifar', ..., initial_checkpoint=PATH) instead")
    return sd


def reference_bits(path, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                   weight_bits: Optional[int] = None, act_bits: Optional[int] = None
                   ) -> Tuple[Optional[int], Optional[int]]:
    """``(weight_bits, act_bits)`` of a reference checkpoint; ``None`` means float.

    The files do not store their bit-widths: they are read from the name (``..._W1A1.pth``,
    ``A32`` = float activations) unless given. A checkpoint without quantizer keys is the float model.
    """
    sd = state_dict if state_dict is not None else read_reference_checkpoint(path)
    if not any(k.endswith(".uW") for k in sd):
        if weight_bits is not None:
            raise ReferenceCheckpointError(f"{path} holds no quantizer state ('*.uW', '*.beta'): it is the float"
                                           f" model; load it with load_reference_float, without weight_bits")
        return None, None
    if weight_bits is None:
        m = re.search(r"W(\d+)A(\d+)", Path(str(path)).name)
        if m is None:
            raise ReferenceCheckpointError(f"cannot tell the bit-widths of {path} from its name (expected"
                                           f" ..._W<b>A<b>.pth): pass weight_bits= and act_bits= (None = float)")
        weight_bits = int(m.group(1))
        act_bits = None if int(m.group(2)) >= 32 else int(m.group(2))
    return weight_bits, act_bits


def load_reference_float(path, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> DAQReferenceResNet:
    """``resnet20_daq_reference`` with the checkpoint's float weights and BN statistics, in eval mode.

    For a quantized checkpoint the quantizer state is left out (see :func:`to_brevitas`, :func:`to_daq_fx`).
    """
    sd = state_dict if state_dict is not None else read_reference_checkpoint(path)
    model = DAQReferenceResNet(20, num_classes=10)
    own = model.state_dict()
    quant = {k for k in sd if k.rsplit(".", 1)[-1] in QUANTIZER_KEYS + ("lA", "init")}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and k not in quant]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected
                else f"shape of {bad[0]!r}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
        raise ReferenceCheckpointError(f"{path} does not fit resnet20_daq_reference ({what}; {len(missing)} missing,"
                                       f" {len(unexpected)} unexpected, {len(bad)} mis-shaped keys)")
    model.load_state_dict({k: sd[k] for k in own})
    return model.eval()


def reference_quantizer_state(state_dict: Dict[str, torch.Tensor], conv: str, weight_bits: int,
                              act_bits: Optional[int], path="checkpoint") -> Dict[str, torch.Tensor]:
    """Our quantizers' state for the reference conv ``conv`` (see the module docstring).

    Returns ``{"lower", "upper", "scale"}`` (weight quantizer, on the standardised weight) and ``"act_upper"`` (``None`` for float activations).
    """
    needed = ("lW", "uW", "beta") + (("uA",) if act_bits is not None else ())
    for key in needed:
        if f"{conv}.{key}" not in state_dict:
            raise ReferenceCheckpointError(
                f"{path} lacks {conv}.{key!s}: {'not a quantized DAQ checkpoint (load it with load_reference_float)' if key != 'uA' else 'no activation bound: a float-activation (A32) checkpoint; pass act_bits=None'}")
    lw, uw = float(state_dict[f"{conv}.lW"]), float(state_dict[f"{conv}.uW"])
    if not lw < uw:
        raise ReferenceCheckpointError(f"{path}: {conv}.lW = {lw} is not below {conv}.uW = {uw}")
    beta = abs(float(state_dict[f"{conv}.beta"]))
    act_upper = None
    if act_bits is not None:
        act_upper = float(state_dict[f"{conv}.uA"])
        if not (0 < act_upper < 1e6):
            raise ReferenceCheckpointError(f"{path}: {conv}.uA = {act_upper} is not a usable activation bound"
                                           f" (the A32 checkpoints hold 2^31 there): pass act_bits=None")
    scale = beta / act_upper if act_upper is not None else beta
    return {"lower": torch.tensor(lw), "upper": torch.tensor(uw), "scale": torch.tensor(scale),
            "act_upper": None if act_upper is None else torch.tensor(act_upper)}


def _load(path, weight_bits, act_bits):
    sd = read_reference_checkpoint(path)
    weight_bits, act_bits = reference_bits(path, sd, weight_bits, act_bits)
    if weight_bits is None:
        raise ReferenceCheckpointError(f"{path} is the float model (no quantizer state): use load_reference_float")
    return sd, weight_bits, act_bits, load_reference_float(path, sd)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --------------------------------------------------------------------------------------
# Brevitas
# --------------------------------------------------------------------------------------

def to_brevitas(path, weight_bits: Optional[int] = None, act_bits: Optional[int] = None) -> nn.Module:
    """The reference checkpoint as a Brevitas model with DAQ quantizers (eval mode).

    Every quantized conv becomes ``brevitas.nn.QuantConv2d`` with ``weight_quant`` a per-tensor
    :class:`daq_brevitas.DAQWeightPerTensor` (centred standardisation, the paper's form) and, for
    quantized activations, ``input_quant`` an unsigned :class:`daq_brevitas.DAQActPerTensor`
    (``l = 0``): the conv's input is quantized, the shortcut keeps the float tensor, as in the
    authors' model.
    """
    import brevitas.nn as qnn

    import daq_brevitas

    sd, weight_bits, act_bits, model = _load(path, weight_bits, act_bits)
    wq = type(f"RefDAQWeight{weight_bits}b", (daq_brevitas.DAQWeightPerTensor,),
              {"bit_width": weight_bits, "center": True, "init": "std"})
    aq = None if act_bits is None else type(f"RefDAQAct{act_bits}b", (daq_brevitas.DAQActPerTensor,),
                                            {"bit_width": act_bits, "init": "std"})
    for name in model.quantized_conv_names():
        conv = model.get_submodule(name)
        q = qnn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            bias=False, weight_quant=wq, input_quant=aq, return_quant_tensor=False)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
        state = reference_quantizer_state(sd, name, weight_bits, act_bits, path)
        scaling = q.weight_quant.tensor_quant.scaling_impl
        with torch.no_grad():
            scaling.lower.copy_(state["lower"])
            scaling.upper.copy_(state["upper"])
            scaling.scale.copy_(state["scale"])
            scaling.initialized.fill_(True)
            if aq is not None:
                act_scaling = q.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
                act_scaling.upper.copy_(state["act_upper"])
                act_scaling.initialized.fill_(True)
        _set_module(model, name, q)
    return model.eval()


# --------------------------------------------------------------------------------------
# torch.ao FX
# --------------------------------------------------------------------------------------

def reference_no_fusion_backend_config(backend: str = "x86"):
    """``daq_fx.get_daq_backend_config(backend)`` without the fusion patterns.

    The authors' BN follows the quantized conv unfolded (per-tensor weight standardisation of the
    raw conv weight); Conv-BN fusion would quantize the BN-folded weight instead.
    """
    from torch.ao.quantization.backend_config import BackendConfig

    import daq_fx

    config = BackendConfig(f"daq_reference_{backend}")
    for pattern_config in daq_fx.get_daq_backend_config(backend).configs:
        if pattern_config.fuser_method is None:
            config.set_backend_pattern_config(pattern_config)
    return config


def _conv_quantizers(prepared: torch.fx.GraphModule, conv_names: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """``conv name -> (input quantizer name, output quantizer name)`` in the prepared graph."""
    modules = dict(prepared.named_modules())
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target in conv_names:
            src = node.args[0]
            users = list(node.users)
            if not (src.op == "call_module" and "activation_post_process" in src.target and len(users) == 1
                    and users[0].op == "call_module" and "activation_post_process" in users[0].target):
                raise RuntimeError(f"unexpected prepared graph around {node.target}: {src.format_node()}")
            out[node.target] = (src.target, users[0].target)
    missing = [n for n in conv_names if n not in out]
    if missing:
        raise RuntimeError(f"quantized convs not found in the prepared graph: {missing}")
    del modules
    return out


#: the 8-bit grid of a quantized conv's output in the FX model: the accumulator lattice ``|beta|·k``
OUTPUT_BITS = 8


def prepare_reference_fx(model: DAQReferenceResNet, weight_bits: int, act_bits: Optional[int],
                         rounding: str = "dasr", beta: Optional[float] = None,
                         backend: str = "x86") -> torch.fx.GraphModule:
    """``model`` prepared by :func:`daq_fx.prepare_qat_fx` with the authors' quantization points.

    A qconfig on the quantized convs only (:meth:`DAQReferenceResNet.quantized_conv_names`) and no
    Conv-BN fusion (:func:`reference_no_fusion_backend_config`): each conv's input gets an unsigned
    DAQ activation quantizer (``l = 0``; float activations when ``act_bits`` is None) and its weight
    a per-tensor DAQ weight quantizer (centred standardisation, the paper's ``init="std"``: ``l, u
    = ∓3``); stem, BN (unfolded, as the paper trains), residual adds and head stay float. Each
    conv's *output* gets an 8-bit quantizer for the int backend (see :func:`to_daq_fx`), disabled
    here: set its grid with :func:`set_output_grids` before converting. ``rounding``/``beta``
    select DASR or the paper's ablations (``"ste"``, ``"soft"`` with a fixed ``beta``).

    ``qat.meta["daq_reference_quantizers"]`` maps each conv to its (input, output) quantizer names.
    """
    import daq_fx
    from daq_fx.fake_quantize import _UNSIGNED, ACTIVATION, DAQFakeQuantize
    from torch.ao.quantization import QConfigMapping

    conv_names = model.quantized_conv_names()
    qconfig = daq_fx.get_daq_qconfig(weight_bits, act_bits or 8, per_channel=False, init="std",
                                     rounding=rounding, beta=beta)
    mapping = QConfigMapping()
    for name in conv_names:
        mapping.set_module_name(name, qconfig)
    mapping.daq_backend = backend
    qat = daq_fx.prepare_qat_fx(model.train(), mapping, (torch.zeros(1, 3, 32, 32),),
                                backend_config=reference_no_fusion_backend_config(backend), prepare_timm=False)
    quantizers = _conv_quantizers(qat, conv_names)
    qat.meta["daq_reference_quantizers"] = quantizers
    qat.meta["daq_reference_bits"] = (weight_bits, act_bits)
    for name in conv_names:
        in_name, out_name = quantizers[name]
        in_fq = qat.get_submodule(in_name)
        out_fq = DAQFakeQuantize(ACTIVATION, OUTPUT_BITS, signed=True, init="std")
        out_fq.disable_fake_quant()
        out_fq.disable_observer()
        _set_module(qat, out_name, out_fq)
        if act_bits is None:
            in_fq.disable_fake_quant()
            in_fq.disable_observer()
        else:
            in_fq.signed.fill_(_UNSIGNED)      # the conv inputs follow a ReLU: l = 0 (DAQ-SPEC §4)
    return qat


def set_output_grids(qat: torch.fx.GraphModule, calibration: Optional[torch.Tensor] = None) -> None:
    """Give every conv-output quantizer of :func:`prepare_reference_fx` its grid and enable it.

    The step is the accumulator lattice (weight step × activation step, read from the trained
    quantizers); the zero point is centred, or placed on ``calibration`` images by
    :func:`calibrate_output_grids`. Float-activation (A32) models have no int grid: nothing to do.
    """
    weight_bits, act_bits = qat.meta["daq_reference_bits"]
    if act_bits is None:
        return
    for name, (in_name, out_name) in qat.meta["daq_reference_quantizers"].items():
        w_step, _ = qat.get_submodule(name).weight_fake_quant.calculate_qparams()
        a_step, _ = qat.get_submodule(in_name).calculate_qparams()
        out_fq = qat.get_submodule(out_name)
        _set_output_grid(out_fq, float(w_step) * float(a_step), zero_point=1 << (OUTPUT_BITS - 1))
        out_fq.enable_fake_quant()
    if calibration is not None:
        calibrate_output_grids(qat, calibration)


def to_daq_fx(path, weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
              calibration: Optional[torch.Tensor] = None, backend: str = "x86") -> torch.fx.GraphModule:
    """The reference checkpoint as a ``daq_fx`` QAT model (eval mode), convertible to x86 int8.

    Prepared by :func:`prepare_reference_fx` (the authors' quantization points: each conv's input
    and weight; stem, BN, residual adds and head float), with the checkpoint's quantizer state.

    An int backend must also quantize each conv's *output*. Its values are ``k·|beta|/(n_w n_a)``
    with an integer ``k`` (the int8 kernel's accumulator: weight codes times activation codes), so
    the output quantizer is an 8-bit DAQ grid of step ``|beta|/(n_w n_a)`` — the accumulator
    lattice itself: lossless for the 256 consecutive ``k`` it covers, and its zero point is placed
    on ``calibration`` images (ImageNet-normalised, e.g. training images; default: centred) by
    :func:`calibrate_output_grids`. Accumulators outside those 256 values are clipped, in the QAT
    model and the int model alike. With float activations (A32) there is no int model: the
    input and output quantizers stay disabled (weights only).
    """
    sd, weight_bits, act_bits, model = _load(path, weight_bits, act_bits)
    states = {name: reference_quantizer_state(sd, name, weight_bits, act_bits, path)
              for name in model.quantized_conv_names()}
    qat = prepare_reference_fx(model, weight_bits, act_bits, backend=backend)
    for name, state in states.items():
        wfq = qat.get_submodule(name).weight_fake_quant
        with torch.no_grad():
            wfq.lower_bound.copy_(state["lower"].reshape(1))
            wfq.upper_bound.copy_(state["upper"].reshape(1))
            wfq.output_scale.copy_(state["scale"].reshape(1))
            wfq.initialized.fill_(1)
            if act_bits is not None:
                in_fq = qat.get_submodule(qat.meta["daq_reference_quantizers"][name][0])
                in_fq.lower_bound.zero_()
                in_fq.upper_bound.copy_(state["act_upper"].reshape(1))
                in_fq.initialized.fill_(1)
    qat.eval()
    set_output_grids(qat, calibration)
    return qat


def _set_output_grid(fq, step: float, zero_point: int) -> None:
    """Output grid ``{(q - zero_point)·step: q = 0 … 2^OUTPUT_BITS - 1}``."""
    n = (1 << OUTPUT_BITS) - 1
    with torch.no_grad():
        fq.lower_bound.fill_(-zero_point * step)
        fq.upper_bound.fill_((n - zero_point) * step)
        fq.initialized.fill_(1)


@torch.no_grad()
def calibrate_output_grids(qat: torch.fx.GraphModule, images: torch.Tensor, batch_size: int = 500) -> Dict[str, Tuple[int, int]]:
    """Place each conv output grid's 256 values over the accumulator range seen on ``images``.

    Runs ``images`` (ImageNet-normalised) with the output quantizers bypassed, records each conv's
    accumulator range ``k = y / step`` and sets the zero point to centre it (``k ∈ [-zp, 255 - zp]``).
    Calibrate on training images; never on the images you report.

    Returns:
        ``conv name -> (min k, max k)`` seen.
    """
    quantizers = qat.meta["daq_reference_quantizers"]
    ranges: Dict[str, List[float]] = {}
    hooks = []
    for conv, (_, out_name) in quantizers.items():
        fq = qat.get_submodule(out_name)
        fq.disable_fake_quant()

        def record(module, args, conv=conv, fq=fq):
            step = float((fq.upper_bound - fq.lower_bound) / fq.num_levels)
            k = args[0] / step
            lo, hi = ranges.get(conv, [math.inf, -math.inf])
            ranges[conv] = [min(lo, float(k.min())), max(hi, float(k.max()))]
        hooks.append(fq.register_forward_pre_hook(record))
    try:
        qat.eval()
        for xb in images.split(batch_size):
            qat(xb)
    finally:
        for h in hooks:
            h.remove()
    n = (1 << OUTPUT_BITS) - 1
    out = {}
    for conv, (_, out_name) in quantizers.items():
        fq = qat.get_submodule(out_name)
        lo, hi = (round(v) for v in ranges[conv])
        zero_point = int(min(max(round((n - (lo + hi)) / 2), 0), n))
        step = float((fq.upper_bound - fq.lower_bound) / n)
        _set_output_grid(fq, step, zero_point)
        fq.enable_fake_quant()
        out[conv] = (lo, hi)
    return out


def convert_reference_fx(qat: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The x86 int8 model of :func:`to_daq_fx` (W1A1): int8 convs, float BN / adds / stem / head."""
    import daq_fx

    return daq_fx.convert_fx(qat.eval())
