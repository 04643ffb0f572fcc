"""Parameter groups: DAQ's quantizer parameters apart from the network's own (DAQ-SPEC §6)."""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

import daq_core

from .fake_quantize import FamilyFakeQuantize

__all__ = ["quantizer_parameters"]


def quantizer_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Split ``model.parameters()`` into DAQ quantizer parameters and the rest.

    The quantizer parameters are the bounds ``l, u`` (Eq. 1) and weight output scales ``s``
    (Eq. 3) of every :class:`DAQFakeQuantize`, and the start ``s``, widths ``a`` and output scale of
    every N2UQ activation quantizer (:class:`N2UQFakeQuantize`; N2UQ weights have none), and the steps,
    noise scales and bit gates of every CPQ quantizer (:class:`daq_fx.CPQFakeQuantize`; any
    :class:`daq_fx.FamilyFakeQuantize`); the paper trains them with Adam, lr 1e-4 and no weight decay,
    the network with SGD (DAQ-SPEC §6).

    Returns:
        ``(quantizer_params, other_params)``, each without duplicates.

    Example:
        >>> quant, rest = quantizer_parameters(prepared)            # doctest: +SKIP
        >>> optimizer = torch.optim.SGD([{"params": rest, "lr": 5e-3, "momentum": 0.9},
        ...                              {"params": quant, "lr": 1e-4, "weight_decay": 0}])  # doctest: +SKIP
    """
    return daq_core.split_parameters(model, FamilyFakeQuantize)
