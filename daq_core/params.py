"""Optimizer grouping shared by both plugins (DAQ-SPEC §6: Adam for l, u, s; SGD for weights)."""

from __future__ import annotations

from typing import List, Tuple, Type, Union

from torch import nn

__all__ = ["split_parameters"]


def split_parameters(model: nn.Module, module_types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]
                     ) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """``(quantizer_params, other_params)``: the direct parameters of ``module_types`` modules, and the rest.

    Each parameter appears once, even when a quantizer module is shared.
    """
    quant_ids = set()
    quant: List[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, module_types):
            for p in module.parameters(recurse=False):
                if id(p) not in quant_ids:
                    quant_ids.add(id(p))
                    quant.append(p)
    rest = [p for p in model.parameters() if id(p) not in quant_ids]
    return quant, rest
