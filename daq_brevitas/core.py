"""Brevitas core modules for DAQ: one small module per responsibility.

A DAQ ``tensor_quant`` composes, like Brevitas's ``RescalingIntQuant``:

* ``scaling_impl``: the learned quantization state — bounds ``l, u`` of Eq. 1 (and for
  weights the output scale ``s`` of Eq. 3), initialised on the first real batch
  (DAQ-SPEC §3-5);
* ``int_quant``: normalisation + DASR rounding (Eqs. 1, 4-11), delegated to ``daq_core``
  (the same numerics as ``daq_fx``);
* ``msb_clamp_bit_width_impl``: the constant bit-width (Brevitas's ``BitWidthConst``);
* ``int_scaling_impl``: Brevitas's ``IntScaling``, kept for the parts of Brevitas that read it.

``forward`` returns Brevitas's tuple ``(dequantized, scale, zero_point, bit_width)``:

* weights, ``b >= 2``: the ``2^b`` symmetric no-zero levels ``|s| (2Q - n)/n`` (Eq. 2) are
  signed ``b``-bit integers ``k`` in ``[-2^(b-1), 2^(b-1) - 1]`` with ``zero_point = -0.5``
  and ``scale = 2|s|/n``: ``(k + 0.5) scale``;
* weights, ``b = 1``: Brevitas's binary convention ``(±|s|, |s|, 0, 1)`` (QONNX ``BipolarQuant``);
* activations: ``l + Δ Q`` are unsigned integers ``Q`` in ``[0, n]`` with ``scale = Δ`` and
  ``zero_point = -l/Δ`` (signed quantizers shift both by ``2^(b-1)``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from brevitas import config
from brevitas.core.bit_width import BitWidthConst
from brevitas.core.function_wrapper import Identity
from brevitas.core.scaling import IntScaling

import daq_core
from daq_core import check_bits, check_positive, num_levels

__all__ = [
    "snap_to_grid",
    "no_zero_grid",
    "WeightTensorQuant",
    "ActTensorQuant",
    "DAQWeightScaling",
    "DAQActScaling",
    "DASRWeightIntQuant",
    "DASRActIntQuant",
    "DAQWeightTensorQuant",
    "DAQActTensorQuant",
]

#: Weight bounds ``l, u`` are initialised to ``-3, 3`` on the standardised weight (DAQ-SPEC §3).
WEIGHT_BOUND_INIT = 3.0


#: Candidate weight bounds (on the normalised weight) tried by the "mse" initialisation (shared with daq_fx).
MSE_WEIGHT_BOUNDS = daq_core.WEIGHT_BOUND_CANDIDATES
_check_init = daq_core.check_init_method


def _check_center(center, num_channels: int) -> bool:
    if center is None:
        return num_channels <= 1
    if not isinstance(center, bool):
        raise TypeError(f"center must be True, False or None, got {center!r}")
    return center


def snap_to_grid(y: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Represent DAQ's levels exactly as Brevitas dequantizes them: ``(int - zero_point) * scale``.

    ``y`` is already on the grid up to float rounding (``-s + (2s/n) Q`` vs ``(k + 0.5) 2s/n``);
    the correction is applied straight-through (value changes by ~1 ulp, gradient unchanged), so the
    exported graph, which computes ``(int - zero_point) * scale``, reproduces PyTorch bit for bit.
    """
    with torch.no_grad():
        exact = (torch.round(y / scale + zero_point) - zero_point) * scale
    return y + (exact - y).detach()


class _IgnoreMissingKeysMixin:
    """Drop this module's own keys from ``missing_keys`` while Brevitas loads float checkpoints.

    Brevitas's graph quantization loads the float layer's ``state_dict`` into the new quant layer
    with ``brevitas.config.IGNORE_MISSING_KEYS`` set; quantizer state is then legitimately missing.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if config.IGNORE_MISSING_KEYS:
            own = [prefix + name for name, _ in self.named_parameters(recurse=False)]
            own += [prefix + name for name, _ in self.named_buffers(recurse=False)]
            for key in own:
                if key in missing_keys:
                    missing_keys.remove(key)


class DAQWeightScaling(_IgnoreMissingKeysMixin, nn.Module):
    """Learned weight bounds ``l, u`` (Eq. 1) and output scale ``s`` (Eq. 3) of a DAQ weight quantizer.

    ``l, u`` start at ``-3, 3`` (on the standardised weight, DAQ-SPEC §3). ``s`` is set on the
    first forward to the least-squares scale of ``daq_core.init_weight_scale`` (the weight-only
    form of the layer-output matching of DAQ-SPEC §5); the ``initialized`` buffer records it so a
    loaded checkpoint is never re-initialised.

    Args:
        bit_width: weight bit-width ``b`` (needed for the initial scale).
        num_channels: 1 for per-tensor state, the number of output channels for per-channel.
        ch_axis: the output-channel axis of the weight (per-channel only).
        init_bound: initial ``u = -l`` on the normalised weight (3, DAQ-SPEC §3).
        init: ``"std"``: ``±init_bound`` (the paper); ``"mse"`` (default, as ``daq_fx``): the bound among
            ``init_bound`` and ``MSE_WEIGHT_BOUNDS`` with the least squared weight error (per channel).
        center: ``True``: ``(W - mean)/std`` (the paper; default per tensor); ``False`` (default per
            channel, as ``daq_fx``): ``W / rms``. The no-zero grid has no offset, so a per-channel
            mean would be lost from the layer (it multiplies the sum of the inputs: large after a ReLU).

    Returns:
        ``(lower, upper, scale)``, each of shape ``()`` or ``(num_channels,)``.

    Example:
        >>> scaling = DAQWeightScaling(bit_width=2, init="std")
        >>> lower, upper, scale = scaling(torch.randn(8, 4))
        >>> float(lower), float(upper), bool(scaling.initialized)
        (-3.0, 3.0, True)
    """

    def __init__(self, bit_width: int, num_channels: int = 1, ch_axis: Optional[int] = None,
                 init_bound: float = WEIGHT_BOUND_INIT, init: str = "mse", center: Optional[bool] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.bits = check_bits(bit_width, "weight_bit_width")
        init_bound = check_positive(init_bound, "init_bound")
        self.init_method = _check_init(init)
        self.center = _check_center(center, num_channels)
        self.ch_axis = ch_axis if num_channels > 1 else None
        shape = (num_channels,) if num_channels > 1 else ()
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.lower = nn.Parameter(torch.full(shape, -init_bound, **kw))
        self.upper = nn.Parameter(torch.full(shape, init_bound, **kw))
        self.scale = nn.Parameter(torch.ones(shape, **kw))
        self.register_buffer("initialized", torch.tensor(False, device=device))

    def normalize(self, weight: Tensor) -> Tensor:
        """The input of Eq. 1: ``(W - mean)/std`` if ``center`` (the paper), else ``W / rms`` (constants for autograd)."""
        return daq_core.normalize_weight(weight, self.ch_axis, self.center)

    @torch.no_grad()
    def initialize(self, weight: Tensor) -> None:
        """Bounds ``±3`` (``"std"``, DAQ-SPEC §3) or, with ``"mse"``, the candidate bound in
        {1.5, ..., 6} with the least squared error (per channel), and the least-squares output scale
        (``daq_core.init_weight_quantizer``, shared with ``daq_fx``)."""
        init_bound = float(self.upper.detach().reshape(-1)[0])
        lower, upper, scale = daq_core.init_weight_quantizer(weight, self.bits, self.ch_axis, self.center,
                                                             self.init_method, init_bound=init_bound)
        self.lower.copy_(lower.reshape(self.lower.shape))
        self.upper.copy_(upper.reshape(self.upper.shape))
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.initialized.fill_(True)

    def forward(self, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if not bool(self.initialized):
            self.initialize(weight)
        return self.lower, self.upper, self.scale

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, shape={tuple(self.lower.shape)}, ch_axis={self.ch_axis}, "
                f"init={self.init_method!r}, center={self.center}")


class DAQActScaling(_IgnoreMissingKeysMixin, nn.Module):
    """Learned activation bounds ``l, u`` (Eq. 1), initialised on the first real batch (DAQ-SPEC §4).

    Unsigned (inputs that follow a ReLU): ``l = 0`` is a fixed buffer and ``u = 3 std``.
    Signed: both bounds are parameters, ``(-3 std, 3 std)``. Brevitas's scalar "sentinel"
    calls (``proxy.scale()`` before any data) do not initialise.

    Args:
        signed: whether ``l`` is learned (signed inputs) or fixed at 0.
        learn_lower_bound: the quantizer's declared kind; must agree with ``signed``.
        init_num_std: the first-batch bounds are ``init_num_std`` standard deviations (3, DAQ-SPEC §4).
        init: ``"std"``: those bounds (the paper); ``"mse"`` (default, as ``daq_fx``): the candidate among
            them and the batch range scaled by 0.1 … 1 with the least quantization error.
        bit_width: ``b`` (the "mse" search evaluates the actual grid).

    Returns:
        ``(lower, upper)`` as 0-d tensors.

    Example:
        >>> scaling = DAQActScaling(signed=False)
        >>> lower, upper = scaling(torch.rand(4, 8))
        >>> float(lower), float(upper) > 0
        (0.0, True)
    """

    #: a DAQ activation state may be shared by quantizers of other bit-widths (aligned residual inputs)
    bits_must_match = False

    def __init__(self, signed: bool, learn_lower_bound: Optional[bool] = None, quantizer: str = "",
                 init_num_std: float = 3.0, init: str = "mse", bit_width: int = 8,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.init_num_std = check_positive(init_num_std, "init_num_std")
        self.init_method = _check_init(init)
        self.bits = check_bits(bit_width, "bit_width")
        if learn_lower_bound is not None and bool(learn_lower_bound) != bool(signed):
            name = quantizer or "this activation quantizer"
            if signed:
                raise ValueError(
                    f"signed=True contradicts {name}, whose lower bound is fixed at 0 (unsigned levels for "
                    f"ReLU-like inputs, DAQ-SPEC §4); use DAQSignedActPerTensor for signed inputs")
            raise ValueError(
                f"signed=False contradicts {name}, which learns both bounds (signed inputs); for a ReLU "
                f"output use the unsigned DAQActPerTensor (lower bound fixed at 0)")
        self.signed = bool(signed)
        kw = dict(dtype=dtype or torch.float32, device=device)
        if self.signed:
            self.lower = nn.Parameter(torch.tensor(-1.0, **kw))
        else:
            self.register_buffer("lower", torch.tensor(0.0, **kw))
        self.upper = nn.Parameter(torch.tensor(1.0, **kw))
        self.register_buffer("initialized", torch.tensor(False, device=device))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """First-batch bounds of ``daq_core.init_activation_quantizer`` (DAQ-SPEC §4; shared with ``daq_fx``)."""
        lower, upper = daq_core.init_activation_quantizer(x, self.bits, self.signed, self.init_method,
                                                          self.init_num_std)
        self.lower.copy_(lower)
        self.upper.copy_(upper)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not bool(self.initialized) and x.numel() > 1:
            self.initialize(x)
        return self.lower, self.upper

    def extra_repr(self) -> str:
        return f"signed={self.signed}"


class DASRWeightIntQuant(nn.Module):
    """DAQ weight rounding: ``|s| (2 DASR(t) - n)/n`` on the standardised weight (Eqs. 1-3).

    A thin wrapper over ``daq_core.fake_quantize_weight`` (fused normalisation + DASR with
    the closed-form backward).

    Args:
        bit_width: ``b``; gamma, sigma: DASR hyperparameters (Eq. 7 and the Gaussian kernel).

    Example:
        >>> iq = DASRWeightIntQuant(bit_width=1)
        >>> iq(torch.tensor([-2.0, -0.1, 0.1, 2.0]), torch.tensor(-3.), torch.tensor(3.), torch.tensor(1.)).tolist()
        [-1.0, -1.0, 1.0, 1.0]
    """

    def __init__(self, bit_width: int, gamma: float = daq_core.DEFAULT_GAMMA,
                 sigma: float = daq_core.DEFAULT_WEIGHT_SIGMA, ch_axis: Optional[int] = None):
        super().__init__()
        self.bits = check_bits(bit_width, "weight_bit_width")
        self.gamma = check_positive(gamma, "gamma")
        self.sigma = check_positive(sigma, "sigma")
        self.ch_axis = ch_axis
        self.input_view_impl = Identity()

    def forward(self, w: Tensor, lower: Tensor, upper: Tensor, scale: Tensor) -> Tensor:
        """``w`` is the normalised weight (see :meth:`DAQWeightScaling.normalize`)."""
        ch_axis = self.ch_axis if lower.numel() > 1 else None
        return daq_core.fake_quantize_weight(w, lower, upper, scale.abs(), self.bits, self.gamma, self.sigma,
                                             ch_axis=ch_axis, standardize_input=False)

    def brevitas_grid(self, w: Tensor, lower: Tensor, upper: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
        """The no-zero grid ``|s| (2Q - n)/n`` as Brevitas integers: ``(2|s|/n, -0.5)``; ``(|s|, 0)`` at 1 bit."""
        return no_zero_grid(scale.abs(), self.bits, w, self.ch_axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, gamma={self.gamma}, sigma={self.sigma}"


class DASRActIntQuant(nn.Module):
    """DAQ activation rounding in natural units: ``l + Δ DASR(t)`` (Eqs. 1-2, DAQ-SPEC §4).

    A thin wrapper over ``daq_core.fake_quantize_activation``.

    Example:
        >>> iq = DASRActIntQuant(bit_width=2)
        >>> iq(torch.tensor([-1.0, 0.4, 0.6, 9.0]), torch.tensor(0.), torch.tensor(3.)).tolist()
        [0.0, 0.0, 1.0, 3.0]
    """

    def __init__(self, bit_width: int, gamma: float = daq_core.DEFAULT_GAMMA,
                 sigma: float = daq_core.DEFAULT_ACT_SIGMA):
        super().__init__()
        self.bits = check_bits(bit_width, "bit_width")
        self.gamma = check_positive(gamma, "gamma")
        self.sigma = check_positive(sigma, "sigma")
        self.input_view_impl = Identity()

    def forward(self, x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        return daq_core.fake_quantize_activation(x, lower, upper, self.bits, self.gamma, self.sigma)

    def brevitas_grid(self, x: Tensor, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
        """``(Δ, -l/Δ)``: the unsigned integers ``Q`` in ``[0, n]`` of ``l + Δ Q``."""
        step = (upper - lower) / num_levels(self.bits)
        return step, -lower / step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, gamma={self.gamma}, sigma={self.sigma}"


class _BitWidthRecordMixin(_IgnoreMissingKeysMixin):
    """A persistent ``bits`` buffer: loading a checkpoint of another bit-width fails clearly."""

    _bit_width_arg = "bit_width"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "bits"
        if key in state_dict:
            saved = int(torch.as_tensor(state_dict[key]).item())
            if saved != self.int_quant.bits:
                raise ValueError(
                    f"checkpoint entry '{key}' was saved with {self._bit_width_arg}={saved}, but this "
                    f"{type(self).__name__} is built with {self._bit_width_arg}={int(self.bits.item())}; "
                    f"DAQ bounds and scales depend on the bit-width: build the model with "
                    f"{self._bit_width_arg}={saved} to load this checkpoint")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _TensorQuant(_BitWidthRecordMixin, nn.Module):
    """What every ``tensor_quant`` holds (Brevitas reads these names): ``scaling_impl``, ``int_quant``,
    ``msb_clamp_bit_width_impl``, ``int_scaling_impl``, ``observer_only`` and the ``bits`` record.

    ``scaling_impl(x)`` returns the quantizer's state as a tuple, ``int_quant(x, *state)`` the
    fake-quantized ``x`` and ``int_quant.brevitas_grid(x, *state)`` its ``(scale, zero_point)`` as
    Brevitas integers; a ``scaling_impl`` with a ``normalize`` method (DAQ weights) maps ``x`` first.
    A ``scaling_impl`` hosting a family state (:class:`daq_brevitas.FamilyScaling`) reports the
    family's ``bit_width`` (learned for CPQ) instead of the constant one.
    """

    _snap = True

    def __init__(self, scaling_impl: nn.Module, int_quant: nn.Module, bit_width_impl: nn.Module,
                 int_scaling_impl: Optional[nn.Module] = None, signed: bool = True, check_bits: bool = True):
        super().__init__()
        self.scaling_impl = scaling_impl
        self.int_quant = int_quant
        self.msb_clamp_bit_width_impl = bit_width_impl
        self.int_scaling_impl = int_scaling_impl if int_scaling_impl is not None else IntScaling(False, signed)
        self.observer_only = False
        bits = int_quant.bits
        if check_bits and bits != scaling_impl.bits:
            raise ValueError(f"inconsistent {self._bit_width_arg}: {bits} (int_quant) and {scaling_impl.bits}"
                             f" (scaling_impl)")
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        self.n = num_levels(bits)

    def bit_width(self) -> Tensor:
        learned = getattr(self.scaling_impl, "family", None)
        if learned is not None and learned.learns_bits:
            return torch.tensor(float(self.scaling_impl.bit_width))
        return self.msb_clamp_bit_width_impl()

    def quantize(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tuple]:
        state = self.scaling_impl(x)
        if not isinstance(state, tuple):
            state = (state,)
        bit_width = self.bit_width()
        scale, zero_point = self.int_quant.brevitas_grid(x, *state)
        return state, bit_width, scale, zero_point

    def fake_quantize(self, x: Tensor, state: Tuple, scale: Tensor, zero_point: Tensor) -> Tensor:
        normalize = getattr(self.scaling_impl, "normalize", None)
        y = self.int_quant(normalize(x) if normalize is not None else x, *state)
        return snap_to_grid(y, scale, zero_point) if self._snap else y


class WeightTensorQuant(_TensorQuant):
    """The weight ``tensor_quant`` of every family: ``(w_q, scale, zero_point, bit_width)``.

    Args:
        scaling_impl: the family's state (:class:`DAQWeightScaling`, ``N2UQWeightScaling``,
            :class:`daq_brevitas.FamilyScaling`).
        int_quant: the family's rounding (:class:`DASRWeightIntQuant`, ...).
        bit_width_impl: Brevitas ``BitWidthConst``.
        int_scaling_impl: Brevitas ``IntScaling`` (kept for Brevitas parts that read it).
    """

    _bit_width_arg = "weight_bit_width"

    def __init__(self, scaling_impl: nn.Module, int_quant: nn.Module, bit_width_impl: nn.Module,
                 int_scaling_impl: Optional[nn.Module] = None):
        super().__init__(scaling_impl, int_quant, bit_width_impl, int_scaling_impl, signed=True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        state, bit_width, scale, zero_point = self.quantize(x)
        if self.observer_only:
            return x, scale, zero_point, bit_width
        return self.fake_quantize(x, state, scale, zero_point), scale, zero_point, bit_width


class ActTensorQuant(_TensorQuant):
    """The activation ``tensor_quant`` of every family: ``(a_q, scale, zero_point, bit_width)``.

    ``int_quant.brevitas_grid`` describes unsigned integers ``0 … 2^b - 1``; signed quantizers shift
    the integers and the zero point by ``-2^(b-1)``, so that Brevitas's ``(int - zero_point) * scale``
    is the output in both cases.
    """

    def __init__(self, scaling_impl: nn.Module, int_quant: nn.Module, bit_width_impl: nn.Module,
                 signed: bool, int_scaling_impl: Optional[nn.Module] = None):
        # ``scaling_impl`` may be shared with a quantizer of the other sign (Brevitas aligns the inputs of
        # residual adds by sharing ``scaling_impl``): the levels are then those of the shared state.
        super().__init__(scaling_impl, int_quant, bit_width_impl, int_scaling_impl, signed=signed,
                         check_bits=getattr(scaling_impl, "bits_must_match", True))
        self.signed = bool(signed)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        state, bit_width, step, zero_point = self.quantize(x)
        if self.signed:
            zero_point = zero_point - 2.0 ** (bit_width - 1)
        if self.observer_only:
            return x, step, zero_point, bit_width
        return self.fake_quantize(x, state, step, zero_point), step, zero_point, bit_width


class DAQWeightTensorQuant(WeightTensorQuant):
    """DAQ weight ``tensor_quant``: returns ``(w_q, scale, zero_point, bit_width)`` (Eqs. 1-3).

    Args:
        scaling_impl: :class:`DAQWeightScaling` (bounds and output scale).
        int_quant: :class:`DASRWeightIntQuant` (normalisation + DASR).
        bit_width_impl: Brevitas ``BitWidthConst``.
        int_scaling_impl: Brevitas ``IntScaling`` (kept for Brevitas parts that read it).

    Returns:
        ``b >= 2``: ``(|s|(2Q-n)/n, 2|s|/n, -0.5, b)``; ``b = 1``: ``(±|s|, |s|, 0, 1)``.

    Example:
        >>> tq = DAQWeightTensorQuant(DAQWeightScaling(2), DASRWeightIntQuant(2), BitWidthConst(2))
        >>> y, scale, zero_point, bit_width = tq(torch.randn(16, 8))
        >>> sorted(set(((y / scale) + zero_point).round().int().flatten().tolist()))
        [-2, -1, 0, 1]
    """

    def brevitas_scale(self, scale: Tensor, w: Tensor) -> Tensor:
        """Brevitas's scale of the integer grid: ``2|s|/n`` (``|s|`` at 1 bit), channel-shaped like ``w``."""
        return no_zero_grid(scale.abs(), self.int_quant.bits, w, self.int_quant.ch_axis)[0]


class DAQActTensorQuant(ActTensorQuant):
    """DAQ activation ``tensor_quant``: returns ``(l + ΔQ, Δ, zero_point, bit_width)`` (Eqs. 1-2).

    Unsigned: integers ``Q`` in ``[0, n]``, ``zero_point = -l/Δ`` (0 with ``l = 0``).
    Signed: integers ``Q - 2^(b-1)``, ``zero_point = -l/Δ - 2^(b-1)``, so that Brevitas's
    ``(int - zero_point) * scale`` reproduces ``l + ΔQ`` in both cases.

    Example:
        >>> tq = DAQActTensorQuant(DAQActScaling(False), DASRActIntQuant(4), BitWidthConst(4), signed=False)
        >>> y, scale, zero_point, bit_width = tq(torch.rand(64))
        >>> bool(((y / scale).round() - y / scale).abs().max() < 1e-4), float(zero_point)
        (True, 0.0)
    """


def no_zero_grid(half_range: Tensor, bits: int, w: Tensor, ch_axis: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The ``2^b`` symmetric levels ``r (2k - n)/n`` without zero as Brevitas integers (DAQ's and N2UQ's weights).

    Signed ``b``-bit integers with ``scale = 2r/n`` and ``zero_point = -0.5``; at 1 bit Brevitas's
    binary convention ``scale = r``, ``zero_point = 0``. ``scale`` is channel-shaped like ``w``.
    """
    n = num_levels(bits)
    scale = half_range if n == 1 else half_range * (2.0 / n)
    if scale.dim() > 0 and scale.numel() > 1:
        shape = [1] * w.dim()
        shape[ch_axis % w.dim()] = -1
        scale = scale.reshape(shape)
    zero_point = torch.tensor(0.0 if n == 1 else -0.5, dtype=w.dtype, device=w.device)
    return scale, zero_point
