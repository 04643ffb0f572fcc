"""DAQ as a torch.ao ``FakeQuantizeBase``: one module for weights and activations.

A thin adapter over :mod:`daq_core`; the numerics (normalisation of Eq. 1, DASR of
Eqs. 4-11, the weight grid of Eq. 2 with the layer scale of Eq. 3) live there.
What this module adds is what torch.ao needs around them: learned parameters with
fixed shapes once initialised, first-batch initialisation, the standard
``enable_fake_quant`` / ``disable_observer`` switches, and a ``calculate_qparams``
that describes *exactly* the integer grid the forward pass fake-quantizes to.

Weights (DAQ-SPEC §3, §5)::

    ŵ = (W - mean W) / std W                       (constants; per tensor or per output channel)
    t = clamp((ŵ - l) / Δ, 0, n),   Δ = (u - l) / n,   n = 2^b - 1               (Eq. 1)
    W_q = s · (2 DASR(t) - n) / n                                                (Eqs. 2-3)

  i.e. the odd integers ``k ∈ {-n, -n+2, …, n}`` times the step ``|s| / n``, zero point 0
  (``qint8``, ``quant_min = -n``, ``quant_max = n``; int8 holds them up to 7 bits).

Activations (DAQ-SPEC §4), natural units, integer-aligned zero point::

    A_q = l' + Δ · DASR(clamp((A - l') / Δ, 0, n)),   l' = -zp · Δ,   zp = clamp(round(-l / Δ), 0, n)

  i.e. ``quint8`` codes ``0 … n`` with scale ``Δ`` and zero point ``zp``; ``l = 0`` is fixed
  for inputs that are never negative (ReLU-like), decided on the first batch unless
  ``signed`` is given.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

import daq_core
from daq_core import (
    DEFAULT_ACT_SIGMA,
    DEFAULT_GAMMA,
    DEFAULT_WEIGHT_SIGMA,
    MAX_INT8_WEIGHT_BITS,
    check_bits,
    check_positive,
    num_levels,
)

__all__ = ["DAQFakeQuantize", "AveragedActivation", "WEIGHT", "ACTIVATION"]

WEIGHT = "weight"
ACTIVATION = "activation"

#: Smallest quantization step reported to torch.ao (``eps`` of its observers).
_EPS = float(torch.finfo(torch.float32).eps)

# value of the ``signed`` buffer before the first batch decided it
_SIGNED_AUTO, _UNSIGNED, _SIGNED = -1, 0, 1


def place_switches(module: FakeQuantizeBase, device) -> None:
    """Put ``FakeQuantizeBase``'s ``fake_quant_enabled`` / ``observer_enabled`` buffers on ``device``.

    torch.ao's base class creates them on the default device whatever ``factory_kwargs`` says; a
    quantizer made for a model on the GPU (``factory_kwargs={"device": "cuda"}``, or one added next
    to a GPU quantizer after prepare) must not keep CPU state: DDP broadcasts buffers with nccl,
    which refuses CPU tensors, and ``state_dict`` round-trips would mix devices.
    """
    if device is None:
        return
    for name in ("fake_quant_enabled", "observer_enabled"):
        setattr(module, name, getattr(module, name).to(device))


class DAQFakeQuantize(FakeQuantizeBase):
    """Distance-aware fake quantization (DAQ, ICCV 2021) for torch.ao QAT.

    Args:
        role: ``"weight"`` or ``"activation"``.
        bits: bit-width ``b`` (weights 1..7: the odd-integer grid ±(2^b - 1) must fit int8;
            activations 1..8).
        ch_axis: weights only: the output-channel axis for per-channel bounds, output scale
            and standardisation (``0`` for conv/linear), or ``None`` for one set per tensor
            (the paper's per-layer form).
        signed: activations only: ``False`` fixes ``l = 0`` (inputs after ReLU), ``True``
            learns both bounds, ``None`` (default) decides on the first batch (``min >= 0``
            means unsigned).
        init: first-batch initialisation of the bounds: ``"std"`` is the paper's (weights ±3 on the
            standardised weight, activations ``num_std`` standard deviations); ``"mse"`` (default)
            picks, among those and clipping points at fractions of the batch's range, the bounds
            with the smallest quantization error (per channel for weights). At 4 bits the paper's
            3 std clips ReLU outputs so much that a trained CIFAR ResNet-20 falls from 85% to 27%
            right after prepare; the MSE choice keeps it close to float (see docs/fx.md).
        center: weights only: subtract the mean before dividing by the standard deviation (the
            paper's ``ŵ = (W - mean W) / std W``; default for per-tensor). ``False`` (default for
            per-channel) divides by the root mean square only: the grid has no offset, so a
            per-channel mean would simply be lost from the layer (a filter's mean multiplies the
            sum of its inputs, a large error after ReLU); per layer it is about zero.
        factory_kwargs: torch.ao passes ``{"device": ..., "dtype": ...}``; the device is used.
        gamma: ``γ`` of the adaptive temperature (Eq. 7); paper: 2.
        sigma: ``σ`` of the Gaussian kernel; paper: 1 for weights, 2 for activations (default
            by role).
        num_std: activations: first-batch bounds at ``num_std`` standard deviations (DAQ-SPEC §4: 3).
        rounding: ``"dasr"`` (DAQ, default) or one of the paper's ablations (Tables 6-7, see
            :func:`daq_core.daq_fake_quantize`): ``"ste"`` (rounding with a straight-through
            gradient) or ``"soft"`` (fixed-temperature soft argmax while training, rounding in
            eval mode — what the converted model computes).
        beta: the fixed temperature of ``rounding="soft"`` (paper: 4 and 24).

    Learned parameters (``nn.Parameter``, give them their own optimizer group, e.g. Adam
    lr 1e-4 without weight decay, DAQ-SPEC §6): ``lower_bound`` and ``upper_bound``
    (``l, u`` of Eq. 1) and, for weights, ``output_scale`` (``s`` of Eq. 3). Per-channel
    parameters take their final shape at initialisation (``daq_fx.prepare_qat_fx`` does
    that before returning, so an optimizer may be built right away) and
    ``load_state_dict`` resizes them to the saved shape.

    Example:
        >>> fq = DAQFakeQuantize(role="weight", bits=2, ch_axis=0)
        >>> w = torch.randn(8, 4)
        >>> wq = fq(w)
        >>> scale, zero_point = fq.calculate_qparams()
        >>> k = torch.round(wq / scale[:, None])  # odd integers in [-3, 3]
        >>> bool(((k.abs() <= 3) & (k.remainder(2) == 1)).all())
        True
    """

    lower_bound: nn.Parameter
    upper_bound: nn.Parameter
    initialized: torch.Tensor
    signed: torch.Tensor

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, gamma: float = DEFAULT_GAMMA, sigma: Optional[float] = None,
                 num_std: float = 3.0, center: Optional[bool] = None, init: str = "mse",
                 rounding: str = "dasr", beta: Optional[float] = None,
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
                raise ValueError("signed applies to activations only: DAQ weights are always symmetric (Eq. 2)")
        else:
            self.bits = check_bits(bits, "activation bits")
            if ch_axis is not None:
                raise ValueError("ch_axis applies to weights only: integer backends quantize activations per tensor;"
                                 " pass ch_axis=None for activations")
        if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
            raise TypeError(f"ch_axis must be an int or None, got {ch_axis!r}")
        if signed is not None and not isinstance(signed, bool):
            raise TypeError(f"signed must be True, False or None (decide on the first batch), got {signed!r}")
        self.ch_axis = ch_axis
        self.gamma = check_positive(gamma, "gamma")
        default_sigma = DEFAULT_WEIGHT_SIGMA if role == WEIGHT else DEFAULT_ACT_SIGMA
        self.sigma = check_positive(default_sigma if sigma is None else sigma, "sigma")
        self.num_std = check_positive(num_std, "num_std")
        self.upper_limit: Optional[float] = None
        if init not in ("mse", "std"):
            raise ValueError(f"init must be 'mse' or 'std', got {init!r}")
        self.init = init
        self.rounding = daq_core.check_rounding(rounding, beta)
        self.beta = None if beta is None else float(beta)
        if center is not None and not isinstance(center, bool):
            raise TypeError(f"center must be True, False or None, got {center!r}")
        self.center = (ch_axis is None) if center is None else center
        n = num_levels(self.bits)
        self.is_dynamic = False
        #: where the quantizer sits, for messages (set by the prepare functions; not part of the state)
        self.name = ""
        if role == WEIGHT:
            self.dtype = torch.qint8
            self.qscheme = torch.per_channel_symmetric if ch_axis is not None else torch.per_tensor_symmetric
            self.quant_min, self.quant_max = -n, n
            lower, upper = -3.0, 3.0                       # DAQ-SPEC §3: l = -3, u = 3 on ŵ
        else:
            self.dtype = torch.quint8
            self.qscheme = torch.per_tensor_affine
            self.quant_min, self.quant_max = 0, n
            lower, upper = (0.0 if not signed else -1.0), 1.0   # replaced on the first batch
        self.lower_bound = nn.Parameter(torch.tensor([lower], device=device))
        self.upper_bound = nn.Parameter(torch.tensor([upper], device=device))
        if role == WEIGHT:
            self.output_scale = nn.Parameter(torch.tensor([1.0], device=device))
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8, device=device))
        state = _SIGNED_AUTO if signed is None else (_SIGNED if signed else _UNSIGNED)
        self.register_buffer("signed", torch.tensor([state], dtype=torch.int8, device=device))
        # torch.ao reads quant_min / quant_max / eps of a fake-quant's observer for its
        # backend-constraint checks; DAQ has no observer, this records the same numbers.
        self.activation_post_process = SimpleNamespace(
            quant_min=self.quant_min, quant_max=self.quant_max, eps=_EPS, dtype=self.dtype, qscheme=self.qscheme)

    # ------------------------------------------------------------------ properties
    @property
    def num_levels(self) -> int:
        """``n = 2^b - 1`` (Eq. 1)."""
        return num_levels(self.bits)

    @property
    def is_weight(self) -> bool:
        return self.role == WEIGHT

    @property
    def is_unsigned(self) -> bool:
        """Activations with ``l = 0`` fixed (decided on the first batch when ``signed=None``)."""
        return (not self.is_weight) and int(self.signed.item()) == _UNSIGNED

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """First-batch initialisation (DAQ-SPEC §3-5).

        Shared with ``daq_brevitas`` through :mod:`daq_core.init`. Weights
        (:func:`daq_core.init_weight_quantizer`): bounds ``∓3`` on the normalised weight
        (``init="std"``, the paper) or the least-error candidate per channel (``"mse"``), and the
        least-squares output scale ``s``. Activations (:func:`daq_core.init_activation_quantizer`):
        ``l = 0, u = 3 std`` when the batch is never negative (or ``signed=False``), else
        ``±3 std``; with ``"mse"`` the least-error bounds among those and fractions of the range.
        """
        x = x.detach()
        label = self.label()
        if self.is_weight:
            channels = 1 if self.ch_axis is None else x.shape[self.ch_axis]
            lower, upper, scale = daq_core.init_weight_quantizer(
                x, self.bits, self.ch_axis if channels > 1 else None, center=self.center, method=self.init,
                name=label)
            self._set_param("lower_bound", lower)
            self._set_param("upper_bound", upper)
            self._set_param("output_scale", scale.reshape(channels).float())
        else:
            # refused before any state changes (the signed decision below included): a NaN / Inf first
            # batch would otherwise leave NaN bounds that fail every later call
            daq_core.check_finite(x, f"the first batch of {label}")
            signed = int(self.signed.item())
            if signed == _SIGNED_AUTO:
                signed = _SIGNED if bool((x < 0).any()) else _UNSIGNED
            lower, upper = daq_core.init_activation_quantizer(x, self.bits, signed=signed != _UNSIGNED,
                                                              method=self.init, num_std=self.num_std, name=label)
            if self.upper_limit is not None:
                upper = torch.clamp(upper, max=self.upper_limit)
            self.signed.fill_(signed)
            self._set_param("lower_bound", lower.reshape(1).float())
            self._set_param("upper_bound", upper.reshape(1).float())
        self.initialized.fill_(1)

    def label(self) -> str:
        """How messages name this quantizer: ``name`` (set by ``daq_fx.prepare_qat_fx`` / ``prepare_qat_pt2e``)."""
        kind = "weight" if self.is_weight else "activation"
        return f"DAQ {kind} quantizer {self.name!r}" if self.name else f"a DAQ {kind} quantizer"

    def _set_param(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        if current.shape == value.shape:
            current.data.copy_(value.to(current.dtype))
        else:  # first per-channel initialisation or loading a per-channel state: take the new shape
            setattr(self, name, nn.Parameter(value.detach().clone().to(current.device, current.dtype),
                                             requires_grad=current.requires_grad))

    # ------------------------------------------------------------------ grid
    def _capped(self, upper: torch.Tensor) -> torch.Tensor:
        cap = self.upper_limit
        if cap is None:
            return upper
        return torch.clamp(upper, max=cap)

    def set_upper_limit(self, limit: Optional[float]) -> None:
        """Cap the learned upper bound ``u`` (e.g. at 6 after a ReLU6 turned into ReLU).

        The quantizer's clip at ``min(u, limit)`` then reproduces the activation's own clip,
        so ``ReLU → quantizer`` equals ``ReLU6 → quantizer`` exactly while Conv-BN-ReLU fuses.
        """
        if self.is_weight:
            raise ValueError("set_upper_limit applies to activation quantizers only")
        self.upper_limit = None if limit is None else check_positive(limit, "limit")

    def activation_grid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bounds ``(l', u')`` the activation forward uses: integer-aligned zero point.

        ``Δ = (u - l)/n``; ``zp = clamp(round(-l/Δ), 0, n)``; ``l' = -zp Δ`` (straight-through
        to ``l``) and ``u' = l' + (u - l)``. Unsigned: ``l' = 0``, ``u' = u``.
        """
        n = self.num_levels
        if self.is_unsigned:
            upper = self._capped(self.upper_bound)
            # 0 · u rather than a constant: the same tensor properties (requires_grad) as in the
            # signed case, so torch.compile'd kernels are not recompiled per quantizer kind
            return upper * 0.0, upper
        lower, upper = self.lower_bound, self._capped(self.upper_bound)
        step = (upper - lower) / n
        zero_point = torch.clamp(torch.round(-lower.detach() / step.detach()), 0, n)
        aligned = lower + (-zero_point * step.detach() - lower).detach()
        return aligned, aligned + (upper - lower)

    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the integer grid of the forward pass.

        Weights: ``scale = |s| / n`` (per channel if ``ch_axis``; ``s`` floored as in
        :meth:`weight_output_scale`, the same value the forward uses), ``zero_point = 0``; the
        fake-quantized weight equals ``scale · k`` with ``k`` odd in ``[-n, n]``.
        Activations: ``scale = Δ = (u' - l')/n``, ``zero_point = -l'/Δ`` (an integer in ``[0, n]``).
        """
        if self.is_weight:
            scale = (self.weight_output_scale().detach().abs() / self.num_levels).float()
            if self.ch_axis is None:
                scale = scale.reshape(1)
            return scale, torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
        lower, upper = self.activation_grid()
        step = ((upper - lower) / self.num_levels).float().clamp_min(_EPS)
        zero_point = torch.clamp(torch.round(-lower / step), 0, self.num_levels).to(torch.int64)
        return step.reshape(1), zero_point.reshape(1)

    def weight_output_scale(self) -> torch.Tensor:
        """The output scale ``s`` the weight forward uses: ``output_scale`` with ``|s| / n ≥ eps``.

        int8 backends get the weight step ``|s| / n`` as the quantization scale, which torch.ao
        keeps at or above its observers' ``eps`` (float32 eps, ~1.2e-7). A channel with BN γ ≈ 0
        (dead in a trained network) folds to a far smaller ``s``; the forward therefore uses
        the floored ``s`` (:func:`daq_core.floor_weight_scale`, straight-through gradient), so that
        :meth:`calculate_qparams` describes the forward's grid and the int weights stay odd
        (docs/fx.md, "Dead channels").
        """
        return daq_core.floor_weight_scale(self.output_scale, self.bits, _EPS)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``forward(x)``: ``round(forward(x) / scale) + zero_point``.

        Weights: odd integers in ``[-n, n]``; activations: ``0 … n``.
        """
        with torch.no_grad():
            y = self(x)
            scale, zero_point = self.calculate_qparams()
            if self.is_weight and self.ch_axis is not None:
                shape = [1] * y.dim()
                shape[self.ch_axis] = -1
                scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
            return (torch.round(y / scale) + zero_point).to(torch.int32)

    def _normalized(self, w: torch.Tensor) -> torch.Tensor:
        """``W / rms(W)`` (per channel if ``ch_axis``), the rms a constant for autograd."""
        return daq_core.normalize_weight(w, self.ch_axis, center=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1 and self.initialized[0] == 0:
            self.initialize(x)
        if self.fake_quant_enabled[0] == 0:
            return x
        # the soft ablation's forward is not rounding; in eval mode it rounds like the int model
        rounding, beta = (self.rounding, self.beta) if self.training or self.rounding != "soft" else ("ste", None)
        if self.is_weight:
            w = x if self.center else self._normalized(x)
            return daq_core.fake_quantize_weight(w, self.lower_bound, self.upper_bound, self.weight_output_scale(),
                                                 self.bits,
                                                 self.gamma, self.sigma, ch_axis=self._param_axis(),
                                                 standardize_input=self.center, rounding=rounding, beta=beta)
        lower, upper = self.activation_grid()
        return daq_core.daq_fake_quantize(x, lower, upper, self.bits, lower, (upper - lower) / self.num_levels,
                                          self.gamma, self.sigma, rounding=rounding, beta=beta)

    def _param_axis(self) -> Optional[int]:
        return self.ch_axis if self.lower_bound.numel() > 1 or self.ch_axis is not None else None

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("lower_bound", "upper_bound", "output_scale"):
            key = prefix + name
            if key in state_dict and hasattr(self, name) and getattr(self, name).shape != state_dict[key].shape:
                self._set_param(name, state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = f"role={self.role}, bits={self.bits}, gamma={self.gamma}, sigma={self.sigma}"
        if self.rounding != "dasr":
            text += f", rounding={self.rounding}" + (f", beta={self.beta}" if self.beta is not None else "")
        if self.is_weight:
            text += f", ch_axis={self.ch_axis}, center={self.center}"
        else:
            text += f", signed={ {-1: 'auto', 0: False, 1: True}[int(self.signed.item())] }"
            if self.upper_limit is not None:
                text += f", upper_limit={self.upper_limit}"
        return text + f", dtype={self.dtype}, quant_min={self.quant_min}, quant_max={self.quant_max}"


class AveragedActivation(FakeQuantizeBase):
    """The shared activation quantizer applied to a mean / adaptive average pool of its own grid.

    torch.ao lowers ``mean`` and ``adaptive_avg_pool`` to kernels that average the integer
    codes and round *exact* ties (``k + 1/2``, frequent when averaging) half to even. The
    float QAT graph computes the same average from dequantized values, where float error
    decides ties at random, so the two models would diverge (seen in every SE block).
    This module rounds like the kernel: the normalised value ``t`` within ``1e-4`` of a
    half-integer is treated as a tie and ``t - zero_point`` rounded half to even (what the
    kernels do), anything else is rounded as
    usual; the result lies on the source quantizer's grid. The gradient is passed straight
    through (the source quantizer's bounds are learned where it quantizes its own input).
    Exact for averages of fewer than 10^4 codes.
    """

    _TIE_TOLERANCE = 1e-4

    def __init__(self, source: DAQFakeQuantize) -> None:
        super().__init__()
        if not isinstance(source, DAQFakeQuantize) or source.is_weight:
            raise TypeError(f"source must be an activation DAQFakeQuantize, got {source!r}")
        place_switches(self, source.lower_bound.device)   # beside its source (prepare on a GPU model)
        object.__setattr__(self, "source", source)   # shared, not a child: no duplicate state
        for name in ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "is_dynamic", "activation_post_process"):
            setattr(self, name, getattr(source, name))

    def calculate_qparams(self):
        return self.source.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.source
        if source.fake_quant_enabled[0] == 0 or self.fake_quant_enabled[0] == 0:
            return x
        if source.initialized[0] == 0:
            return source(x)
        with torch.no_grad():
            lower, upper = source.activation_grid()
            n = source.num_levels
            step = (upper - lower) / n
            t = ((x - lower) / step).clamp(0, n)
            floor = torch.floor(t)
            tie = (t - floor - 0.5).abs() < self._TIE_TOLERANCE
            # the kernels average ``code - zero_point`` and round that half to even
            zero_point = torch.round(-lower / step)
            q = torch.where(tie, torch.round(floor + 0.5 - zero_point) + zero_point, torch.round(t))
            y = lower + step * q
        return x + (y - x).detach()

    def extra_repr(self) -> str:
        return "rounds exact ties half to even, like the int8 average kernels"
