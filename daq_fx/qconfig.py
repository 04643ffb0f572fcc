"""QConfigs and QConfigMappings that put DAQ into the stock torch.ao FX flow.

``get_daq_qat_qconfig_mapping`` starts from torch's own default QAT mapping for the
backend and only replaces the global qconfig, so that fixed-qparam ops (sigmoid,
hardsigmoid, softmax, tanh) keep their ``FixedQParamsFakeQuantize`` and the QAT and
converted models agree there (INTEGRATION-NOTES, torch.ao FX).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    ObservationType,
    get_fbgemm_backend_config,
    get_qnnpack_backend_config,
)
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

from daq_core import DEFAULT_GAMMA, MAX_INT8_WEIGHT_BITS, check_bits, check_positive, check_rounding

from daq_core.family import QuantizerFamily

from .fake_quantize import ACTIVATION, WEIGHT, DAQFakeQuantize, FamilyFakeQuantize

__all__ = [
    "BACKENDS",
    "family_qconfig",
    "family_qat_qconfig_mapping",
    "get_daq_qconfig",
    "get_daq_qat_qconfig_mapping",
    "get_daq_backend_config",
    "first_and_last_layer_names",
]

#: Backends with lowered int8 kernels that daq_fx supports (x86/fbgemm exact, qnnpack ±1 code).
BACKENDS = ("x86", "fbgemm", "qnnpack")

_BACKEND_CONFIGS = {"x86": get_x86_backend_config, "fbgemm": get_fbgemm_backend_config,
                    "qnnpack": get_qnnpack_backend_config}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported: use one of {BACKENDS}")
    return backend


def get_daq_qconfig(weight_bits: int = 4, act_bits: int = 4, per_channel: bool = True,
                    gamma: float = DEFAULT_GAMMA, weight_sigma: Optional[float] = None,
                    act_sigma: Optional[float] = None, act_signed: Optional[bool] = None,
                    init: str = "mse", rounding: str = "dasr", beta: Optional[float] = None) -> QConfig:
    """A ``QConfig`` with DAQ weight and activation fake-quants (DAQ-SPEC §3-4).

    Args:
        weight_bits: 1..7 (DAQ's odd-integer weight grid ±(2^b - 1) must fit int8, so 8 bits
            is rejected).
        act_bits: 1..8.
        per_channel: one set of ``l, u, s`` and per-channel standardisation per output channel
            (recommended: it is what makes BN-folded depthwise convs quantize well); ``False``
            gives the paper's per-layer form.
        gamma, weight_sigma, act_sigma: DASR hyperparameters (paper: 2, 1, 2).
        act_signed: ``None`` decides ``l = 0`` per activation on the first batch.
        init: ``"mse"`` (default) or ``"std"`` (the paper's ±3 std bounds), see :class:`DAQFakeQuantize`.
        rounding, beta: ``"dasr"`` (default); the paper's ablations ``"ste"`` and ``"soft"`` with a
            fixed temperature ``beta``, see :class:`DAQFakeQuantize`.

    Example:
        >>> qconfig = get_daq_qconfig(weight_bits=2, act_bits=2)
        >>> qconfig.weight().qscheme
        torch.per_channel_symmetric
    """
    check_bits(weight_bits, "weight_bits", MAX_INT8_WEIGHT_BITS)
    check_bits(act_bits, "act_bits")
    check_positive(gamma, "gamma")
    check_rounding(rounding, beta)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be True or False, got {per_channel!r}")
    weight = DAQFakeQuantize.with_args(role=WEIGHT, bits=weight_bits, ch_axis=0 if per_channel else None,
                                       gamma=gamma, sigma=weight_sigma, init=init, rounding=rounding, beta=beta)
    activation = DAQFakeQuantize.with_args(role=ACTIVATION, bits=act_bits, gamma=gamma, sigma=act_sigma,
                                           signed=act_signed, init=init, rounding=rounding, beta=beta)
    return QConfig(activation=activation, weight=weight)


def get_daq_qat_qconfig_mapping(backend: str = "x86", weight_bits: int = 4, act_bits: int = 4,
                                per_channel: bool = True, float_module_names: Iterable[str] = (),
                                float_module_types: Iterable[type] = (), gamma: float = DEFAULT_GAMMA,
                                weight_sigma: Optional[float] = None, act_sigma: Optional[float] = None,
                                init: str = "mse", rounding: str = "dasr",
                                beta: Optional[float] = None,
                                intermediate_act_bits: Optional[int] = None) -> QConfigMapping:
    """torch's default QAT ``QConfigMapping`` for ``backend`` with DAQ as the global qconfig.

    The default is *fully quantized* (every conv/linear and activation, as the paper does for
    MobileNet-V2). To keep chosen layers in float (the paper's ResNets keep the first and last
    layer), list them in ``float_module_names`` (see :func:`first_and_last_layer_names`) or
    ``float_module_types``.

    Transposed convolutions get DAQ per-tensor weights (their output channels are on axis 1).
    ``rounding``/``beta`` select the paper's ablations (see :func:`get_daq_qconfig`).

    ``intermediate_act_bits`` (e.g. 8): activations that are *not* the input of a quantized
    conv/linear — residual-add operands, float layers' inputs — get that many bits instead of
    ``act_bits`` (:func:`daq_fx.prepare_qat_fx` applies it, see
    :func:`daq_fx.widen_intermediate_activations`). The paper quantizes layer inputs only and keeps
    residual adds in float; an int backend needs them quantized, and at 2 bits the default (all
    activations at ``act_bits``) leaves a residual branch 4 signed levels.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> mapping = get_daq_qat_qconfig_mapping("x86", 4, 4,
        ...                                       float_module_names=first_and_last_layer_names(model))
    """
    mapping = family_qat_qconfig_mapping(
        DAQFakeQuantize.family, backend, per_channel=per_channel, float_module_names=float_module_names,
        float_module_types=float_module_types,
        qconfig=lambda channel_wise: get_daq_qconfig(weight_bits, act_bits, channel_wise, gamma, weight_sigma,
                                                     act_sigma, init=init, rounding=rounding, beta=beta))
    if intermediate_act_bits is not None:
        check_bits(intermediate_act_bits, "intermediate_act_bits")
    mapping.daq_intermediate_act_bits = intermediate_act_bits   # read by daq_fx.prepare_qat_fx
    return mapping


def family_qconfig(family: QuantizerFamily, weight_bits: int = 4, act_bits: int = 4, per_channel: bool = True,
                   act_signed: Optional[bool] = None, weight_options: Optional[dict] = None,
                   act_options: Optional[dict] = None, **options) -> QConfig:
    """A ``QConfig`` with :class:`daq_fx.FamilyFakeQuantize` weight and activation fake-quants of ``family``.

    ``options`` go to both, ``weight_options`` / ``act_options`` to one. Each family's named
    ``get_*_qconfig`` (DAQ, N2UQ, CPQ) is this with its own keyword arguments.

    Example:
        >>> from daq_core.cpq import CPQ
        >>> family_qconfig(CPQ, 4, 4, learn_bits=True).weight().qscheme
        torch.per_channel_symmetric
    """
    if not isinstance(family, QuantizerFamily):
        raise TypeError(f"family must be a daq_core.family.QuantizerFamily, got {family!r}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be True or False, got {per_channel!r}")
    check_bits(weight_bits, "weight_bits", family.max_weight_bits)
    check_bits(act_bits, "act_bits")
    weight = FamilyFakeQuantize.for_family(family, role=WEIGHT, bits=weight_bits, ch_axis=0 if per_channel else None,
                                           **options, **(weight_options or {}))
    activation = FamilyFakeQuantize.for_family(family, role=ACTIVATION, bits=act_bits, signed=act_signed,
                                               **options, **(act_options or {}))
    return QConfig(activation=activation, weight=weight)


def family_qat_qconfig_mapping(family: QuantizerFamily, backend: str = "x86", weight_bits: int = 4,
                               act_bits: int = 4, per_channel: bool = True, float_module_names: Iterable[str] = (),
                               float_module_types: Iterable[type] = (),
                               qconfig: Optional[Callable[[bool], QConfig]] = None, **options) -> QConfigMapping:
    """torch's default QAT ``QConfigMapping`` for ``backend`` with ``family`` as the global qconfig.

    Shared by every family (:func:`get_daq_qat_qconfig_mapping`, :func:`daq_fx.get_n2uq_qat_qconfig_mapping`,
    :func:`daq_fx.get_cpq_qat_qconfig_mapping`): fixed-qparam ops keep torch's own fake-quants,
    transposed convolutions get per-tensor weights (their output channels are on axis 1),
    ``float_module_names`` / ``float_module_types`` stay float.

    Args:
        family: the quantizer family.
        qconfig: ``per_channel -> QConfig``; default :func:`family_qconfig` with ``weight_bits``,
            ``act_bits`` and ``options``.

    Example:
        >>> from daq_core.cpq import CPQ
        >>> mapping = family_qat_qconfig_mapping(CPQ, "x86", 8, 8, learn_bits=True)
    """
    backend = _check_backend(backend)
    if qconfig is None:
        def qconfig(channel_wise: bool) -> QConfig:
            return family_qconfig(family, weight_bits, act_bits, channel_wise, **options)
    mapping = get_default_qat_qconfig_mapping(backend).set_global(qconfig(per_channel))
    if per_channel:
        per_tensor = qconfig(False)
        for transposed in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            mapping.set_object_type(transposed, per_tensor)
    if isinstance(float_module_names, str):
        raise TypeError("float_module_names must be a list of module names, not a single string;"
                        f" write [{float_module_names!r}]")
    for name in float_module_names:
        mapping.set_module_name(name, None)
    if isinstance(float_module_types, type):
        float_module_types = (float_module_types,)
    for module_type in float_module_types:
        if not isinstance(module_type, type):
            raise TypeError(f"float_module_types must hold module classes, got {module_type!r}")
        mapping.set_object_type(module_type, None)
    mapping.daq_backend = backend   # read by daq_fx.prepare_qat_fx / convert_fx
    mapping.daq_family = family.name
    return mapping


def _stochastic_depth_classes() -> tuple:
    """timm's ``DropPath`` / ``DropBlock2d``: identity in eval (``daq_fx.prepare_qat_fx`` keeps active
    ones as leaf modules, see ``daq_fx.prepare.stochastic_depth_modules``)."""
    try:
        from timm.layers import DropBlock2d, DropPath
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return (DropPath, DropBlock2d)


def get_daq_backend_config(backend: str = "x86") -> BackendConfig:
    """torch's ``BackendConfig`` for ``backend`` with dropout (also timm's ``DropPath`` / ``DropBlock2d``),
    flatten and zero padding sharing their input's qparams.

    The lowered dropout does not requantize, so a separate output fake-quant would make the
    QAT and converted models diverge (INTEGRATION-NOTES); sharing the observer keeps them equal.
    ``nn.ZeroPad2d`` (static "same" padding, :func:`daq_fx.static_same_padding`) adds the value 0,
    which lies on every DAQ activation grid (integer-aligned zero point); the quantized pad writes
    the zero point, so sharing is exact and avoids a second quantizer before the conv.
    """
    config = _BACKEND_CONFIGS[_check_backend(backend)]()
    dtype_configs = None
    for pattern_config in config.configs:
        if pattern_config.pattern is nn.Dropout:
            dtype_configs = pattern_config.dtype_configs
    # dropout: the lowered op does not requantize; flatten (method / nn.Flatten, e.g. timm's
    # SelectAdaptivePool2d head) only reshapes; zero padding adds 0, a grid value: all keep their input's grid
    for op in (nn.Dropout, torch.nn.functional.dropout, nn.Flatten, "flatten", nn.ZeroPad2d) + _stochastic_depth_classes():
        config.set_backend_pattern_config(
            BackendPatternConfig(op)
            .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
            .set_dtype_configs(dtype_configs or []))
    return config


def first_and_last_layer_names(model: nn.Module) -> Tuple[str, str]:
    """Names of the first and the last conv/linear module (for ``float_module_names``).

    The paper keeps these in full precision for ResNets (DAQ-SPEC §6).
    """
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv or Linear module: nothing to keep in float")
    return names[0], names[-1]
