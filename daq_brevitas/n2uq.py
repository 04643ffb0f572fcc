"""N2UQ (Nonuniform-to-Uniform Quantization, CVPR 2022) as Brevitas quantizers (DAQ-SPEC §8).

The same composition as the DAQ quantizers (:mod:`daq_brevitas.core`), one small module per
responsibility, the numerics delegated to :mod:`daq_core.n2uq` (shared with ``daq_fx``):

* activations: ``scaling_impl`` = :class:`N2UQActScaling` (learned start ``s``, widths ``a_j`` and
  output scale, a first-batch zero point), ``int_quant`` = :class:`N2UQActIntQuant` (thresholds and
  G-STE); the tensor quant returns ``(Δ (round(g(x)) - zp), Δ, zero_point, b)`` with
  ``Δ = |scale| 2/n`` — uniform levels, non-uniform input thresholds;
* weights: ``scaling_impl`` = :class:`N2UQWeightScaling` (``α = (n/2^(b-1)) mean|W|``, a statistic,
  no learned state), ``int_quant`` = :class:`N2UQWeightIntQuant`; the ``2^b`` symmetric levels
  ``α (2k - n)/n`` without zero are, as for DAQ, signed ``b``-bit integers with ``zero_point = -0.5``
  and ``scale = 2α/n`` (binary ``(±α, α, 0, 1)`` at 1 bit).

Export: N2UQ weights use DAQ's weight proxy (QONNX exact, other formats refused); N2UQ activations
refuse every export format — a QONNX ``Quant`` node rounds with uniform thresholds, which would
silently replace the learned ones.

Example:
    >>> import brevitas.nn as qnn
    >>> from brevitas.quant import Int32Bias
    >>> conv = qnn.QuantConv2d(3, 8, 3, weight_quant=N2UQWeightPerChannel, weight_bit_width=4,
    ...                        bias_quant=Int32Bias, return_quant_tensor=False)
    >>> relu = qnn.QuantReLU(act_quant=N2UQActPerTensor, bit_width=4, return_quant_tensor=True)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from brevitas.common import ExportMixin
from brevitas.core.function_wrapper import Identity
from brevitas.core.scaling import ScalingPerOutputType
from brevitas.proxy import ActQuantProxyFromInjector

from daq_core import check_bits, check_init_method, check_positive
from daq_core import n2uq as core

from .core import ActTensorQuant, WeightTensorQuant, _IgnoreMissingKeysMixin, no_zero_grid
from .proxy import DAQExportError
from .quantizers import FamilyActQuant, FamilyWeightQuant, is_family_quantizer, per_output_channel

__all__ = [
    "N2UQActScaling",
    "N2UQActIntQuant",
    "N2UQActTensorQuant",
    "N2UQWeightScaling",
    "N2UQWeightIntQuant",
    "N2UQWeightTensorQuant",
    "N2UQActQuantProxy",
    "N2UQWeightPerTensor",
    "N2UQWeightPerChannel",
    "N2UQActPerTensor",
    "N2UQSignedActPerTensor",
    "is_n2uq_quantizer",
]


# --------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------

class N2UQActScaling(_IgnoreMissingKeysMixin, nn.Module):
    """Learned N2UQ activation state: start ``s``, widths ``a_j``, output scale; first-batch zero point.

    Initialised on the first real batch (:func:`daq_core.n2uq.n2uq_init_activation`, shared with
    ``daq_fx``): the uniform quantizer of DAQ's first-batch bounds ``(l, u)`` — ``s = l``
    (integer-aligned), ``a_j = (u - l)/n``, ``scale = (u - l)/2``, ``zp = round(-l/Δ)`` (0 unsigned).

    Args:
        signed: whether the inputs may be negative (zero point chosen on the first batch) or not (``zp = 0``).
        bit_width: ``b`` (``n = 2^b - 1`` widths).
        init: ``"mse"`` (default) or ``"std"``, see :func:`daq_core.init_activation_quantizer`.
        init_num_std: standard deviations of the ``"std"`` bounds (3).

    Returns:
        ``(start, widths, scale, zero_point)``: 0-d, ``(n,)``, 0-d, 0-d (int64).

    Example:
        >>> scaling = N2UQActScaling(signed=False, bit_width=2)
        >>> start, widths, scale, zero_point = scaling(torch.rand(64))
        >>> tuple(widths.shape), int(zero_point), bool(scaling.initialized)
        ((3,), 0, True)
    """

    def __init__(self, signed: bool, bit_width: int = 4, init: str = "mse", init_num_std: float = 3.0,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.bits = check_bits(bit_width, "bit_width")
        self.init_method = check_init_method(init)
        self.init_num_std = check_positive(init_num_std, "init_num_std")
        self.signed = bool(signed)
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.start = nn.Parameter(torch.zeros((), **kw))
        self.widths = nn.Parameter(core.n2uq_init_widths(self.bits, kw["dtype"]).to(device))
        self.output_scale = nn.Parameter(torch.ones((), **kw))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        start, widths, scale, zero_point = core.n2uq_init_activation(x, self.bits, self.signed, self.init_method,
                                                                     self.init_num_std)
        self.start.copy_(start)
        self.widths.copy_(widths)
        self.output_scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if not bool(self.initialized) and x.numel() > 1:   # Brevitas's scalar sentinel calls do not initialise
            self.initialize(x)
        return self.start, self.widths, self.output_scale, self.zero_point

    def thresholds(self) -> Tensor:
        """The ``n`` input thresholds (segment midpoints, monotone)."""
        return core.n2uq_thresholds(self.start.detach(), self.widths.detach())

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits}, init={self.init_method!r}"


class N2UQActIntQuant(nn.Module):
    """N2UQ activation rounding ``Δ (round(g(x)) - zp)`` with the G-STE backward (:mod:`daq_core.n2uq`).

    Example:
        >>> iq = N2UQActIntQuant(bit_width=2)
        >>> iq(torch.tensor([0.05, 0.15, 0.5, 9.0]), torch.tensor(0.), torch.tensor([0.2, 0.4, 1.0]),
        ...    torch.tensor(1.5), torch.tensor(0)).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """

    def __init__(self, bit_width: int):
        super().__init__()
        self.bits = check_bits(bit_width, "bit_width")
        self.input_view_impl = Identity()

    def forward(self, x: Tensor, start: Tensor, widths: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return core.n2uq_fake_quantize_activation(x, start, widths, scale, zero_point)

    def brevitas_grid(self, x: Tensor, start: Tensor, widths: Tensor, scale: Tensor,
                      zero_point: Tensor) -> Tuple[Tensor, Tensor]:
        """``(Δ, zp)``, ``Δ = |scale| 2/n``: the codes ``round(g(x))`` in ``[0, n]``."""
        step = core.n2uq_step(scale, self.bits)
        return step, zero_point.to(step.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class N2UQActTensorQuant(ActTensorQuant):
    """N2UQ activation ``tensor_quant``: returns ``(Δ (round(g(x)) - zp), Δ, zero_point, bit_width)``.

    Unsigned: integers ``round(g(x))`` in ``[0, n]`` with Brevitas zero point ``zp``; signed: integers
    shifted by ``-2^(b-1)`` and zero point ``zp - 2^(b-1)``, so ``(int - zero_point) Δ`` is the output
    in both cases.

    Example:
        >>> from brevitas.core.bit_width import BitWidthConst
        >>> tq = N2UQActTensorQuant(N2UQActScaling(False, 4), N2UQActIntQuant(4), BitWidthConst(4), signed=False)
        >>> y, scale, zero_point, bit_width = tq(torch.rand(64))
        >>> bool(((y / scale).round() - y / scale).abs().max() < 1e-4), float(zero_point)
        (True, 0.0)
    """

    _snap = False


def _refusing_export_mode_setter(self, value):
    if value and self.is_quant_enabled:
        raise DAQExportError(
            "N2UQ activation quantizers cannot be exported: their learned input thresholds are non-uniform, and"
            " every Brevitas export format (QONNX Quant, QCDQ, QOp) rounds with uniform thresholds round(x/scale),"
            " so the exported model would silently compute different codes. Evaluate the PyTorch model, or use"
            " DAQ activations (daq_brevitas.DAQActPerTensor) for an exportable model.")
    ExportMixin.export_mode.fset(self, value)


class N2UQActQuantProxy(ActQuantProxyFromInjector):
    """``ActQuantProxyFromInjector`` that refuses every export (non-uniform thresholds, see module docstring)."""

    export_mode = property(ExportMixin.export_mode.fget, _refusing_export_mode_setter)


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------

class N2UQWeightScaling(nn.Module):
    """``α = (n / 2^(b-1)) mean|W|`` per output channel or per tensor (a constant; no learned state).

    Args:
        bit_width: ``b``.
        num_channels: 1 (per tensor) or the number of output channels.
        ch_axis: the output-channel axis (per channel only).

    Returns:
        ``α`` of shape ``()`` or ``(num_channels,)``.

    Example:
        >>> N2UQWeightScaling(bit_width=2)(torch.ones(4, 3)).item()
        1.5
    """

    def __init__(self, bit_width: int, num_channels: int = 1, ch_axis: Optional[int] = None):
        super().__init__()
        self.bits = check_bits(bit_width, "weight_bit_width")
        self.ch_axis = ch_axis if num_channels > 1 else None

    def forward(self, weight: Tensor) -> Tensor:
        alpha = core.n2uq_weight_alpha(weight, self.bits, self.ch_axis if weight.dim() >= 2 else None)
        return alpha.reshape(-1) if self.ch_axis is not None else alpha.reshape(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ch_axis={self.ch_axis}"


class N2UQWeightIntQuant(nn.Module):
    """N2UQ weight rounding ``α (2k - n)/n``, ``k = round((w/α + 1) n/2)``, clipped STE (:mod:`daq_core.n2uq`).

    Example:
        >>> N2UQWeightIntQuant(bit_width=1)(torch.tensor([-2.0, -0.5, 0.5, 2.0])).tolist()   # α = mean|w| = 1.25
        [-1.25, -1.25, 1.25, 1.25]
    """

    def __init__(self, bit_width: int, num_channels: int = 1, ch_axis: Optional[int] = None):
        super().__init__()
        self.bits = check_bits(bit_width, "weight_bit_width")
        self.ch_axis = ch_axis if num_channels > 1 else None
        self.input_view_impl = Identity()

    def forward(self, w: Tensor, alpha: Optional[Tensor] = None) -> Tensor:
        """``α`` is recomputed from ``w`` (the same statistic :class:`N2UQWeightScaling` returns)."""
        return core.n2uq_weight(w, self.bits, self.ch_axis if w.dim() >= 2 else None)

    def brevitas_grid(self, w: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
        """DAQ's no-zero grid with half range ``α``: ``(2α/n, -0.5)``; ``(α, 0)`` at 1 bit."""
        return no_zero_grid(alpha, self.bits, w, self.ch_axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ch_axis={self.ch_axis}"


class N2UQWeightTensorQuant(WeightTensorQuant):
    """N2UQ weight ``tensor_quant``: ``(α (2k - n)/n, 2α/n, -0.5, b)``; ``(±α, α, 0, 1)`` at 1 bit.

    Example:
        >>> from brevitas.core.bit_width import BitWidthConst
        >>> tq = N2UQWeightTensorQuant(N2UQWeightScaling(2), N2UQWeightIntQuant(2), BitWidthConst(2))
        >>> y, scale, zero_point, bit_width = tq(torch.randn(16, 8))
        >>> sorted(set(((y / scale) + zero_point).round().int().flatten().tolist()))
        [-2, -1, 0, 1]
    """

    _snap = False


# --------------------------------------------------------------------------------------
# injectors (declaration style, as daq_brevitas.quantizers)
# --------------------------------------------------------------------------------------

class N2UQWeightPerTensor(FamilyWeightQuant):
    """N2UQ weights (DAQ-SPEC §8) with one ``α = (n/2^(b-1)) mean|W|`` per tensor, the ``2^b``
    symmetric levels without zero, clipped STE. Brevitas view: signed ``b``-bit ints, zero point -0.5.
    """

    tensor_quant = N2UQWeightTensorQuant
    scaling_impl = N2UQWeightScaling
    int_quant = N2UQWeightIntQuant


class N2UQWeightPerChannel(N2UQWeightPerTensor):
    """:class:`N2UQWeightPerTensor` with one ``α`` per output channel (the paper's form)."""

    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    num_channels = per_output_channel


class N2UQActPerTensor(FamilyActQuant):
    """Unsigned N2UQ activations for ReLU-like inputs (the paper's levels ``Δ k``, ``k = 0..n``): learned
    start ``s``, widths ``a_j`` (non-uniform input thresholds) and output scale, G-STE.
    """

    proxy_class = N2UQActQuantProxy
    tensor_quant = N2UQActTensorQuant
    scaling_impl = N2UQActScaling
    int_quant = N2UQActIntQuant
    init = "mse"        # first-batch bounds of the uniform quantizer N2UQ starts from ("std": 3 std)
    init_num_std = 3.0


class N2UQSignedActPerTensor(N2UQActPerTensor):
    """N2UQ activations for signed inputs: levels ``Δ (k - zp)`` with ``zp`` chosen on the first batch."""

    signed = True


def is_n2uq_quantizer(quant) -> bool:
    """Whether ``quant`` (an injector class) is one of the N2UQ quantizers or a subclass."""
    return is_family_quantizer(quant, (N2UQWeightPerTensor, N2UQActPerTensor))
