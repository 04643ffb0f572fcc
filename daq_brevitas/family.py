"""Brevitas modules that host any :class:`daq_core.family.QuantizerFamily` (CPQ through them).

* :class:`FamilyScaling`: the family's state (parameters, buffers, first-batch initialisation) as a
  Brevitas ``scaling_impl``; its ``bit_width`` is the family's (learned for CPQ), which
  :class:`daq_brevitas.core.WeightTensorQuant` / ``ActTensorQuant`` report to Brevitas and QONNX;
* :class:`FamilyIntQuant`: the family's forward and its integer grid as Brevitas integers.

Example:
    >>> from brevitas.core.bit_width import BitWidthConst
    >>> from daq_core.cpq import CPQ
    >>> from daq_brevitas.core import WeightTensorQuant
    >>> tq = WeightTensorQuant(FamilyScaling(CPQ, "weight", 3), FamilyIntQuant(3), BitWidthConst(3))
    >>> y, scale, zero_point, bit_width = tq.eval()(torch.randn(16, 8))
    >>> codes = torch.round(y / scale)
    >>> bool(torch.allclose(codes * scale, y)), int(codes.min()) >= -4, int(codes.max()) <= 3
    (True, True, True)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from brevitas.core.function_wrapper import Identity

from daq_core import check_bits
from daq_core.family import FamilyStateMixin, QuantizerFamily

from .core import _IgnoreMissingKeysMixin

__all__ = ["FamilyScaling", "FamilyIntQuant"]


class FamilyScaling(_IgnoreMissingKeysMixin, FamilyStateMixin, nn.Module):
    """A family's quantizer state as a Brevitas ``scaling_impl`` (one small module: the state).

    Args:
        family: the quantizer family (e.g. :data:`daq_core.cpq.CPQ`).
        role: ``"weight"`` or ``"activation"``.
        bit_width: the configured bit-width (the largest one where the family learns it).
        num_channels: 1 for per-tensor state, the number of output channels for per-channel.
        ch_axis: the output-channel axis (per-channel weights).
        signed: activations: whether the inputs may be negative (``None``: decided on the first batch).
        family_options: the family's own options, e.g. ``{"learn_bits": True}`` for CPQ.

    Returns:
        ``(self,)``: the state, read by :class:`FamilyIntQuant`. The first real input (more than
        one element: Brevitas's scalar sentinel calls do not count) initialises it.
    """

    def __init__(self, family: QuantizerFamily, role: str, bit_width: int, num_channels: int = 1,
                 ch_axis: Optional[int] = None, signed: Optional[bool] = None,
                 family_options: Optional[dict] = None, device: Optional[torch.device] = None):
        super().__init__()
        axis = ch_axis if role == "weight" and num_channels > 1 else None
        self.init_family_state(family, role, check_bits(bit_width, "bit_width"), axis,
                               None if role == "weight" else signed, device, **(family_options or {}))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.family.initialize(self, x.detach())
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tuple["FamilyScaling"]:
        if not bool(self.initialized[0]) and x.numel() > 1:
            self.initialize(x)
        return (self,)

    def extra_repr(self) -> str:
        text = f"family={self.family.name}, role={self.role}, bits={self.bits}"
        more = self.family.extra_repr(self)
        return text + (", " + more if more else "")


class FamilyIntQuant(nn.Module):
    """A family's forward (``family.forward``) and its integer grid as Brevitas integers.

    ``brevitas_grid``: the family's ``(scale, zero_point)`` channel-shaped like the input; activation
    zero points are those of unsigned integers ``0 … 2^b - 1`` (``ActTensorQuant`` shifts signed ones).
    """

    def __init__(self, bit_width: int):
        super().__init__()
        self.bits = check_bits(bit_width, "bit_width")
        self.input_view_impl = Identity()

    def forward(self, x: Tensor, scaling: FamilyScaling) -> Tensor:
        return scaling.family.forward(scaling, x)

    def brevitas_grid(self, x: Tensor, scaling: FamilyScaling) -> Tuple[Tensor, Tensor]:
        scale, zero_point = scaling.family.qparams(scaling)
        scale, zero_point = scale.to(x.dtype), zero_point.to(x.dtype)
        if scaling.is_weight and scale.numel() > 1:
            shape = [1] * x.dim()
            shape[scaling.ch_axis % x.dim()] = -1
            return scale.reshape(shape), zero_point.reshape(shape)
        return scale.reshape(()), zero_point.reshape(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
