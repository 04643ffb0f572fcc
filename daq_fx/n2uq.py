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

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping

from daq_core import MAX_INT8_WEIGHT_BITS, check_bits, check_init_method
from daq_core import n2uq as core
from daq_core.n2uq import N2UQ

from .fake_quantize import ACTIVATION, WEIGHT, FamilyFakeQuantize

__all__ = ["N2UQFakeQuantize", "N2UQConvertError", "get_n2uq_qconfig", "get_n2uq_qat_qconfig_mapping",
           "n2uq_activation_quantizers"]


class N2UQConvertError(ValueError):
    """An N2UQ activation quantizer cannot be lowered to torch.ao's uniform int8 kernels."""


class N2UQFakeQuantize(FamilyFakeQuantize):
    """N2UQ fake quantization (CVPR 2022) for torch.ao QAT: :class:`daq_fx.FamilyFakeQuantize` of
    :data:`daq_core.n2uq.N2UQ` (learned thresholds, uniform output levels).

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

    family = N2UQ

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, init: str = "mse", num_std: float = 3.0,
                 factory_kwargs: Optional[dict] = None) -> None:
        super().__init__(N2UQ, role, bits, ch_axis, signed, factory_kwargs, init=init, num_std=num_std)

    def thresholds(self) -> torch.Tensor:
        """The ``n`` input thresholds (segment midpoints, monotone) of an activation quantizer."""
        if self.is_weight:
            raise ValueError("thresholds() applies to activation quantizers only (weights use the uniform grid)")
        return core.n2uq_thresholds(self.start.detach().reshape(()), self.widths.detach())


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
    from .qconfig import family_qat_qconfig_mapping

    return family_qat_qconfig_mapping(
        N2UQ, backend, per_channel=per_channel, float_module_names=float_module_names,
        float_module_types=float_module_types,
        qconfig=lambda channel_wise: get_n2uq_qconfig(weight_bits, act_bits, channel_wise, act_signed, init))


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
