"""CPQ (Cluster-Promoting Quantization with DropBits, ICCV 2021; reconstructed from the abstract) as Brevitas quantizers.

The same declarations as DAQ's and N2UQ's injectors, with the family-generic
:class:`daq_brevitas.FamilyScaling` (state: step ``α``, ``log σ/α``, bit gates) and
:class:`daq_brevitas.FamilyIntQuant` over :data:`daq_core.cpq.CPQ` (numerics: CPQ-SPEC). Brevitas
view: weights are signed ``b``-bit integers ``k`` with ``scale = 2^d α`` and zero point 0;
activations unsigned ``0 … 2^b - 1`` (signed inputs: signed integers). With ``learn_bits = True``
the reported ``bit_width`` is the learned one, so QONNX ``Quant`` nodes carry each layer's own
bit-width.

Example:
    >>> import brevitas.nn as qnn
    >>> class CPQWeight(CPQWeightPerChannel):   # declaration style
    ...     bit_width = 8
    ...     learn_bits = True
    >>> conv = qnn.QuantConv2d(3, 8, 3, weight_quant=CPQWeight, return_quant_tensor=False)
    >>> relu = qnn.QuantReLU(act_quant=CPQActPerTensor, bit_width=4, return_quant_tensor=True)
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from brevitas.core.scaling import ScalingPerOutputType
from brevitas.inject import ExtendedInjector, value

from daq_core.cpq import CPQ, DEFAULT_DROP_RATE, DEFAULT_RELATIVE_SIGMA, DEFAULT_WINDOW

from .family import FamilyIntQuant, FamilyScaling
from .quantizers import FamilyActQuant, FamilyWeightQuant, is_family_quantizer, per_output_channel

__all__ = ["CPQQuant", "CPQWeightPerTensor", "CPQWeightPerChannel", "CPQActPerTensor", "CPQSignedActPerTensor",
           "is_cpq_quantizer", "layer_bit_widths"]


@value
def _cpq_options(learn_bits, drop_rate, window, init_sigma):
    return {"learn_bits": bool(learn_bits), "drop_rate": drop_rate, "window": window, "init_sigma": init_sigma}


class CPQQuant(ExtendedInjector):
    """What CPQ's weight and activation injectors declare: the family, its options, the family-generic
    :class:`daq_brevitas.FamilyScaling` / :class:`daq_brevitas.FamilyIntQuant`."""

    family = CPQ
    scaling_impl = FamilyScaling
    int_quant = FamilyIntQuant
    learn_bits = False
    drop_rate = DEFAULT_DROP_RATE
    window = DEFAULT_WINDOW
    init_sigma = DEFAULT_RELATIVE_SIGMA
    family_options = _cpq_options


class CPQWeightPerTensor(CPQQuant, FamilyWeightQuant):
    """CPQ weights (CPQ-SPEC §1-6): signed grid ``α k`` with one learned step, windowed multi-class STE,
    DropBits; ``learn_bits = True`` learns the bit-width (``bit_width`` is then the largest one)."""

    role = "weight"


class CPQWeightPerChannel(CPQWeightPerTensor):
    """:class:`CPQWeightPerTensor` with one step per output channel."""

    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    num_channels = per_output_channel


class CPQActPerTensor(CPQQuant, FamilyActQuant):
    """Unsigned CPQ activations for ReLU-like inputs (CPQ-SPEC §1): levels ``α k``, ``k = 0 … 2^b - 1``."""

    role = "activation"


class CPQSignedActPerTensor(CPQActPerTensor):
    """CPQ activations for signed inputs (network inputs, residual sums): the signed grid ``α k``."""

    signed = True


def is_cpq_quantizer(quant) -> bool:
    """Whether ``quant`` (an injector class) is one of the CPQ quantizers or a subclass."""
    return is_family_quantizer(quant, (CPQWeightPerTensor, CPQActPerTensor))


def _family_state(module: Optional[nn.Module]) -> Optional[FamilyScaling]:
    if module is None:
        return None
    for sub in module.modules():
        if isinstance(sub, FamilyScaling) and sub.family.name == CPQ.name:
            return sub
    return None


def _input_state(node, modules) -> Optional[FamilyScaling]:
    """The CPQ state quantizing ``node``'s input: its producer's, through up to 4 quantizer-free ops (pooling ...)."""
    source = node.args[0] if node.args else None
    for _ in range(4):
        if getattr(source, "op", None) is None:
            return None
        if source.op == "call_module":
            state = _family_state(modules.get(source.target))
            if state is not None:
                return state
        if source.op not in ("call_module", "call_function", "call_method") or not source.args:
            return None
        source = source.args[0]
    return None


def layer_bit_widths(model: nn.Module) -> Dict[str, Dict[str, Optional[int]]]:
    """``{layer: {"weight": b, "activation": b}}`` of every layer with a CPQ weight quantizer.

    ``"activation"`` is the bit-width of the CPQ quantizer of the layer's input (a ``QuantReLU`` /
    ``QuantIdentity`` before it in the graph of :func:`daq_brevitas.quantize_model`), ``None`` if none.
    """
    modules = dict(model.named_modules())
    out: Dict[str, Dict[str, Optional[int]]] = {}
    graph = getattr(model, "graph", None)     # torch.fx or Brevitas's backport of it
    producers = {}
    for node in getattr(graph, "nodes", ()):
        if node.op == "call_module":
            producers[node.target] = _input_state(node, modules)
    for name, module in modules.items():
        state = _family_state(getattr(module, "weight_quant", None))
        if state is None:
            continue
        act = producers.get(name)
        if act is None:
            act = _family_state(getattr(module, "input_quant", None))
        out[name] = {"weight": state.bit_width, "activation": act.bit_width if act is not None else None}
    return out
