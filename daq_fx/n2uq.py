"""N2UQ (Nonuniform-to-Uniform Quantization, CVPR 2022) as a torch.ao ``FakeQuantizeBase``.

A second quantizer family beside DAQ (DAQ-SPEC §8), a thin adapter over :mod:`daq_core.n2uq`
(the numerics — thresholds, the G-STE backward, the weight grid — live there and are shared with
``daq_brevitas``).

Activations (per tensor): learned start ``s``, positive segment widths ``a_1..a_n``
(``n = 2^b - 1``) and output scale; the input thresholds are the segment midpoints (non-uniform),
the output levels are uniform::

    A_q = Δ (round(g(A)) - zp),   Δ = |scale| 2/n,   g the piecewise-linear normalisation

i.e. ``quint8`` codes ``round(g(A))`` in ``0 … n`` with scale ``Δ`` and zero point ``zp``
(``zp = 0`` for ReLU-like inputs, the paper's non-negative levels; for signed inputs an integer
chosen on the first batch so the levels cover the negative range too).

Weights (per output channel or per tensor): ``α = (n / 2^(b-1)) mean|W|`` (a constant, recomputed
from the weight on every forward), levels ``α (2k - n)/n``: the odd integers ``-n … n`` times
``α / n``, zero point 0 — the same grid as DAQ's weights, so ``daq_fx.convert_fx`` bakes them the
same way (``qint8``, up to 7 bits).

Conversion: torch.ao's int8 kernels requantize every output with uniform thresholds
``round(x / Δ)``, which cannot represent N2UQ's learned thresholds; ``daq_fx.convert_fx`` therefore
refuses models with enabled N2UQ activation quantizers (:class:`N2UQConvertError`) instead of
silently converting them with uniform thresholds.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, QConfig, QConfigMapping, get_default_qat_qconfig_mapping

from daq_core import MAX_INT8_WEIGHT_BITS, check_bits, check_finite, check_init_method, check_positive, num_levels
from daq_core import n2uq as core

from .fake_quantize import ACTIVATION, WEIGHT, place_switches
from .qconfig import _check_backend

__all__ = ["N2UQFakeQuantize", "N2UQConvertError", "get_n2uq_qconfig", "get_n2uq_qat_qconfig_mapping",
           "n2uq_activation_quantizers"]

_EPS = float(torch.finfo(torch.float32).eps)
_SIGNED_AUTO, _UNSIGNED, _SIGNED = -1, 0, 1


class N2UQConvertError(ValueError):
    """An N2UQ activation quantizer cannot be lowered to torch.ao's uniform int8 kernels."""


class N2UQFakeQuantize(FakeQuantizeBase):
    """N2UQ fake quantization (CVPR 2022) for torch.ao QAT: learned thresholds, uniform output levels.

    Args:
        role: ``"weight"`` or ``"activation"``.
        bits: bit-width ``b`` (weights 1..7: the odd-integer grid ±(2^b - 1) must fit int8;
            activations 1..8).
        ch_axis: weights only: the output-channel axis of the per-channel ``α`` (``0`` for
            conv/linear), or ``None`` for one ``α`` per tensor.
        signed: activations only: ``False``: zero point 0 (inputs after ReLU, the paper's
            non-negative levels); ``True``: a zero point chosen on the first batch so that the
            levels also cover negative inputs; ``None`` (default): decided on the first batch.
        init: activations: first-batch bounds ``(l, u)`` of the uniform quantizer N2UQ starts
            from: ``"mse"`` (default) or ``"std"`` (``num_std`` standard deviations), both from
            :func:`daq_core.init_activation_quantizer`; then ``s = l`` (integer-aligned), all
            widths ``(u - l)/n`` and ``scale = (u - l)/2`` (:func:`daq_core.n2uq.n2uq_init_activation`).
        num_std: see ``init``.
        factory_kwargs: torch.ao passes ``{"device": ..., "dtype": ...}``; the device is used.

    Learned parameters (activations only; give them their own optimizer group, see
    :func:`daq_fx.quantizer_parameters`): ``start`` (``s``), ``widths`` (``a_j``, floored at 1e-6)
    and ``output_scale``. Weights have no learned quantizer parameters (``α`` is a statistic of
    the weight; the buffer ``alpha`` records the last one for ``calculate_qparams``).

    Example:
        >>> fq = N2UQFakeQuantize(role="activation", bits=2)
        >>> y = fq(torch.rand(64) * 3)                     # first batch initialises s, a, scale
        >>> scale, zero_point = fq.calculate_qparams()
        >>> codes = torch.round(y / scale) + zero_point
        >>> bool(((codes >= 0) & (codes <= 3)).all())
        True
    """

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, init: str = "mse", num_std: float = 3.0,
                 factory_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        device = (factory_kwargs or {}).get("device")
        place_switches(self, device)
        if role not in (WEIGHT, ACTIVATION):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        self.role = role
        if role == WEIGHT:
            self.bits = check_bits(bits, "weight bits", MAX_INT8_WEIGHT_BITS)
            if signed is not None:
                raise ValueError("signed applies to activations only: N2UQ weights are always symmetric")
        else:
            self.bits = check_bits(bits, "activation bits")
            if ch_axis is not None:
                raise ValueError("ch_axis applies to weights only: N2UQ activations are per tensor;"
                                 " pass ch_axis=None for activations")
        if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
            raise TypeError(f"ch_axis must be an int or None, got {ch_axis!r}")
        if signed is not None and not isinstance(signed, bool):
            raise TypeError(f"signed must be True, False or None (decide on the first batch), got {signed!r}")
        self.ch_axis = ch_axis
        self.init = check_init_method(init)
        self.num_std = check_positive(num_std, "num_std")
        self.upper_limit: Optional[float] = None
        self.is_dynamic = False
        n = num_levels(self.bits)
        if role == WEIGHT:
            self.dtype = torch.qint8
            self.qscheme = torch.per_channel_symmetric if ch_axis is not None else torch.per_tensor_symmetric
            self.quant_min, self.quant_max = -n, n
            self.register_buffer("alpha", torch.ones(1, device=device))
        else:
            self.dtype = torch.quint8
            self.qscheme = torch.per_tensor_affine
            self.quant_min, self.quant_max = 0, n
            self.start = nn.Parameter(torch.zeros(1, device=device))
            self.widths = nn.Parameter(core.n2uq_init_widths(self.bits).to(device))
            self.output_scale = nn.Parameter(torch.ones(1, device=device))
            self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int64, device=device))
            state = _SIGNED_AUTO if signed is None else (_SIGNED if signed else _UNSIGNED)
            self.register_buffer("signed", torch.tensor([state], dtype=torch.int8, device=device))
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8, device=device))
        # read by torch.ao's backend-constraint checks (there is no observer)
        self.activation_post_process = SimpleNamespace(
            quant_min=self.quant_min, quant_max=self.quant_max, eps=_EPS, dtype=self.dtype, qscheme=self.qscheme)

    # ------------------------------------------------------------------ properties
    @property
    def num_levels(self) -> int:
        """``n = 2^b - 1``."""
        return num_levels(self.bits)

    @property
    def is_weight(self) -> bool:
        return self.role == WEIGHT

    @property
    def is_unsigned(self) -> bool:
        return (not self.is_weight) and int(self.signed.item()) == _UNSIGNED

    def thresholds(self) -> torch.Tensor:
        """The ``n`` input thresholds (segment midpoints, monotone) of an activation quantizer."""
        if self.is_weight:
            raise ValueError("thresholds() applies to activation quantizers only (weights use the uniform grid)")
        return core.n2uq_thresholds(self.start.detach().reshape(()), self.widths.detach())

    def set_upper_limit(self, limit: Optional[float]) -> None:
        """Clip the input at ``limit`` first (a ReLU6 turned into a ReLU by ``daq_fx.prepare_qat_fx``)."""
        if self.is_weight:
            raise ValueError("set_upper_limit applies to activation quantizers only")
        self.upper_limit = None if limit is None else check_positive(limit, "limit")

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """First batch: weights record ``α``; activations start as DAQ's first-batch uniform quantizer."""
        x = x.detach()
        if self.is_weight:
            self._set_alpha(x)
        else:
            check_finite(x, "the first batch of a N2UQ activation quantizer")   # before any state changes
            if self.upper_limit is not None:
                x = x.clamp(max=self.upper_limit)
            if int(self.signed.item()) == _SIGNED_AUTO:
                self.signed.fill_(_SIGNED if bool((x < 0).any()) else _UNSIGNED)
            start, widths, scale, zero_point = core.n2uq_init_activation(
                x, self.bits, signed=not self.is_unsigned, method=self.init, num_std=self.num_std)
            self.start.data.copy_(start.reshape(1))
            self.widths.data.copy_(widths)
            self.output_scale.data.copy_(scale.reshape(1))
            self.zero_point.copy_(zero_point.reshape(1))
        self.initialized.fill_(1)

    def _weight_axis(self, w: torch.Tensor) -> Optional[int]:
        return self.ch_axis if self.ch_axis is not None and w.dim() >= 2 else None

    @torch.no_grad()
    def _set_alpha(self, w: torch.Tensor) -> None:
        alpha = core.n2uq_weight_alpha(w, self.bits, self._weight_axis(w), _EPS).reshape(-1).float()
        if self.alpha.shape != alpha.shape:
            self.alpha = alpha.to(self.alpha.device)
        else:
            self.alpha.copy_(alpha)

    # ------------------------------------------------------------------ qparams
    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the forward's integer grid.

        Weights: ``α / n`` (per channel with ``ch_axis``; ``α ≥ n · eps`` in the forward too, so a
        channel with BN γ ≈ 0 stays on the odd grid, docs/fx.md "Dead channels"), zero point 0;
        codes odd in ``[-n, n]``.
        Activations: ``Δ = |scale| 2/n`` and ``zp``; codes ``round(g(x))`` in ``[0, n]``.
        """
        if self.is_weight:
            scale = (self.alpha / self.num_levels).float()
            return scale, torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
        step = core.n2uq_step(self.output_scale, self.bits).float().clamp_min(_EPS)
        return step.reshape(1), self.zero_point.clone()

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``forward(x)``: odd integers in ``[-n, n]`` (weights), ``0 … n`` (activations)."""
        with torch.no_grad():
            y = self(x)
            scale, zero_point = self.calculate_qparams()
            if self.is_weight and scale.numel() > 1:
                shape = [1] * y.dim()
                shape[self.ch_axis] = -1
                scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
            return (torch.round(y / scale) + zero_point).to(torch.int32)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1 and self.initialized[0] == 0:
            self.initialize(x)
        if self.fake_quant_enabled[0] == 0:
            return x
        if self.is_weight:
            axis = self._weight_axis(x)
            self._set_alpha(x)
            return core.n2uq_weight(x, self.bits, axis, _EPS)   # step α/n ≥ eps, as calculate_qparams
        if self.upper_limit is not None:
            x = torch.clamp(x, max=self.upper_limit)
        return core.n2uq_fake_quantize_activation(x, self.start.reshape(()), self.widths,
                                                  self.output_scale.reshape(()), self.zero_point.reshape(()))

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "alpha"
        if self.is_weight and key in state_dict and state_dict[key].shape != self.alpha.shape:
            self.alpha = torch.empty_like(state_dict[key], device=self.alpha.device)
        key = prefix + "widths"
        if not self.is_weight and key in state_dict and state_dict[key].shape != self.widths.shape:
            raise ValueError(f"checkpoint entry '{key}' holds {state_dict[key].numel()} widths, this N2UQ activation"
                             f" quantizer has bits={self.bits} ({self.num_levels} widths): build the model with the"
                             " bit-width the checkpoint was trained with")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = f"role={self.role}, bits={self.bits}"
        if self.is_weight:
            text += f", ch_axis={self.ch_axis}"
        else:
            text += f", signed={ {-1: 'auto', 0: False, 1: True}[int(self.signed.item())] }, init={self.init!r}"
            if self.upper_limit is not None:
                text += f", upper_limit={self.upper_limit}"
        return text + f", dtype={self.dtype}, quant_min={self.quant_min}, quant_max={self.quant_max}"


# --------------------------------------------------------------------------------------
# qconfigs
# --------------------------------------------------------------------------------------

def get_n2uq_qconfig(weight_bits: int = 4, act_bits: int = 4, per_channel: bool = True,
                     act_signed: Optional[bool] = None, init: str = "mse") -> QConfig:
    """A ``QConfig`` with N2UQ weight and activation fake-quants (DAQ-SPEC §8).

    Example:
        >>> get_n2uq_qconfig(2, 2).weight().qscheme
        torch.per_channel_symmetric
    """
    check_bits(weight_bits, "weight_bits", MAX_INT8_WEIGHT_BITS)
    check_bits(act_bits, "act_bits")
    check_init_method(init)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be True or False, got {per_channel!r}")
    weight = N2UQFakeQuantize.with_args(role=WEIGHT, bits=weight_bits, ch_axis=0 if per_channel else None)
    activation = N2UQFakeQuantize.with_args(role=ACTIVATION, bits=act_bits, signed=act_signed, init=init)
    return QConfig(activation=activation, weight=weight)


def get_n2uq_qat_qconfig_mapping(backend: str = "x86", weight_bits: int = 4, act_bits: int = 4,
                                 per_channel: bool = True, float_module_names: Iterable[str] = (),
                                 float_module_types: Iterable[type] = (), act_signed: Optional[bool] = None,
                                 init: str = "mse") -> QConfigMapping:
    """torch's default QAT ``QConfigMapping`` for ``backend`` with N2UQ as the global qconfig.

    The same layout as :func:`daq_fx.get_daq_qat_qconfig_mapping` (fixed-qparam ops keep their own
    fake-quants, transposed convolutions get per-tensor weights, ``float_module_names`` /
    ``float_module_types`` stay float); use it with :func:`daq_fx.prepare_qat_fx`. Models with N2UQ
    activations train and evaluate as QAT models; ``daq_fx.convert_fx`` refuses them
    (:class:`N2UQConvertError`).

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> mapping = get_n2uq_qat_qconfig_mapping("x86", 4, 4)
    """
    backend = _check_backend(backend)
    qconfig = get_n2uq_qconfig(weight_bits, act_bits, per_channel, act_signed, init)
    mapping = get_default_qat_qconfig_mapping(backend).set_global(qconfig)
    if isinstance(float_module_types, type):
        float_module_types = (float_module_types,)
    float_module_types = tuple(float_module_types)
    if per_channel:
        per_tensor = get_n2uq_qconfig(weight_bits, act_bits, False, act_signed, init)
        for transposed in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            mapping.set_object_type(transposed, per_tensor)
    if isinstance(float_module_names, str):
        raise TypeError("float_module_names must be a list of module names, not a single string;"
                        f" write [{float_module_names!r}]")
    for name in float_module_names:
        mapping.set_module_name(name, None)
    for module_type in float_module_types:
        if not isinstance(module_type, type):
            raise TypeError(f"float_module_types must hold module classes, got {module_type!r}")
        mapping.set_object_type(module_type, None)
    mapping.daq_backend = backend   # read by daq_fx.prepare_qat_fx / convert_fx
    return mapping


# --------------------------------------------------------------------------------------
# conversion guard
# --------------------------------------------------------------------------------------

def n2uq_activation_quantizers(model: nn.Module) -> List[Tuple[str, Optional[str]]]:
    """``(quantizer name, name of the node it quantizes)`` of every enabled N2UQ activation quantizer."""
    found = []
    graph = getattr(model, "graph", None)
    for name, module in model.named_modules():
        if isinstance(module, N2UQFakeQuantize) and not module.is_weight and module.fake_quant_enabled[0] == 1:
            source = None
            if graph is not None:
                for node in graph.nodes:
                    if node.op == "call_module" and node.target == name and node.args:
                        source = getattr(node.args[0], "name", None)
                        break
            found.append((name, source))
    return found


def check_convertible(model: nn.Module) -> None:
    """Raise :class:`N2UQConvertError` naming the N2UQ activation quantizers of ``model``, if any."""
    found = n2uq_activation_quantizers(model)
    if not found:
        return
    shown = ", ".join(f"{name!r}" + (f" (on the output of {source!r})" if source else "") for name, source in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    raise N2UQConvertError(
        f"daq_fx.convert_fx: N2UQ activation quantizer {shown}{more} has learned non-uniform input thresholds."
        " torch.ao's int8 kernels requantize every output with uniform thresholds round(x / scale), so the"
        " converted model would compute different activation codes than the QAT model; refusing to convert."
        " What to do: evaluate or deploy the QAT model itself (qat.eval() computes the N2UQ codes exactly;"
        " its outputs lie on the uniform int grid), or prepare with DAQ activations"
        " (daq_fx.get_daq_qat_qconfig_mapping) if an int8 torch.ao model is needed. N2UQ weights alone"
        " (e.g. QConfig(activation=DAQ, weight=N2UQ)) do convert exactly.")
