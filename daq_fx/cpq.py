"""CPQ (Cluster-Promoting Quantization with DropBits, ICCV 2021; reconstructed from the abstract) for torch.ao FX.

:class:`CPQFakeQuantize` is :class:`daq_fx.FamilyFakeQuantize` of :data:`daq_core.cpq.CPQ` (numerics:
:mod:`daq_core.cpq`, CPQ-SPEC). Weights are signed ``b``-bit codes ``k`` times the learned step
``α`` (per output channel by default; ``qint8``, zero point 0, up to 8 bits); activations after
ReLU unsigned codes ``0 … 2^b - 1`` (``quint8``, zero point 0; signed inputs get zero point
``2^(b-1)``). With ``learn_bits=True`` every quantizer learns its bit-width (hard-concrete gates
on DropBits's drop rates); ``daq_fx.convert_fx`` then lowers each layer at its own learned
bit-width: the weights are baked on the layer's coarser grid (step ``2^d α``) and the
activations clamped at ``2^b' - 1``.

Example:
    >>> import torch, daq_fx
    >>> from daq_core.cpq import BitBudget
    >>> mapping = daq_fx.get_cpq_qat_qconfig_mapping("x86", 8, 8, learn_bits=True)
    >>> # qat = daq_fx.prepare_qat_fx(model, mapping, example); budget = BitBudget(0.0, 4.0, 4.0)
    >>> # each step: loss = task + budget.penalty(qat); ...; budget.update(qat)
    >>> # daq_fx.layer_bit_widths(qat) -> {"layer1.0.conv1": {"weight": 3, "activation": 4}, ...}
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import fx, nn
from torch.ao.quantization import QConfig, QConfigMapping

from daq_core import cpq as core
from daq_core.cpq import CPQ, DEFAULT_DROP_RATE, DEFAULT_RELATIVE_SIGMA, DEFAULT_WINDOW

from .fake_quantize import ACTIVATION, FamilyFakeQuantize
from .qconfig import family_qat_qconfig_mapping, family_qconfig

__all__ = ["CPQFakeQuantize", "get_cpq_qconfig", "get_cpq_qat_qconfig_mapping", "layer_bit_widths",
           "CPQBackendError"]


class CPQBackendError(ValueError):
    """A backend or flow that cannot hold a CPQ learned (per-layer, post-training) bit-width."""


class CPQFakeQuantize(FamilyFakeQuantize):
    """CPQ fake quantization for torch.ao QAT: :class:`daq_fx.FamilyFakeQuantize` of :data:`daq_core.cpq.CPQ`.

    Args:
        role: ``"weight"`` or ``"activation"``.
        bits: the bit-width ``b`` (1..8), the largest one with ``learn_bits``.
        ch_axis: weights only: the output-channel axis of per-channel steps, or ``None``.
        signed: activations only: ``False`` for ReLU outputs (the unsigned grid of CPQ-SPEC §1),
            ``True`` for signed inputs, ``None``: decided on the first batch.
        learn_bits: learn the bit-width with hard-concrete keep gates (CPQ-SPEC §6).
        drop_rate: DropBits's per-bit drop probability ``p_j`` (fixed-bit mode; 0: no DropBits) and
            the gates' initial drop probability.
        window: ``m`` of the windowed multi-class STE.
        init_sigma: ``σ/α`` at initialisation.
        min_bits: with ``learn_bits``, the fewest bits a layer may learn (default 2 for weights: the
            signed 1-bit grid ``{-1, 0}`` has no positive weight; 1 for activations).
        factory_kwargs: torch.ao passes ``{"device": ..., "dtype": ...}``; the device is used.

    Learned parameters (see :func:`daq_fx.quantizer_parameters`): ``step`` (``α``), ``log_sigma``
    (``log σ/α``) and, with ``learn_bits``, ``gate_logits`` (train them faster than the rest, e.g.
    Adam lr 1e-2). ``bit_width`` is the learned bit-width (the configured one in fixed-bit mode).

    Example:
        >>> fq = CPQFakeQuantize(role="activation", bits=4)
        >>> y = fq.eval()(torch.rand(64) * 3)          # first batch initialises α
        >>> scale, zero_point = fq.calculate_qparams()
        >>> codes = torch.round(y / scale)
        >>> bool(torch.allclose(codes * scale, y) and codes.max() <= 15)
        True
    """

    family = CPQ

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, learn_bits: bool = False, drop_rate: float = DEFAULT_DROP_RATE,
                 window: int = DEFAULT_WINDOW, init_sigma: float = DEFAULT_RELATIVE_SIGMA,
                 min_bits: Optional[int] = None, factory_kwargs: Optional[dict] = None) -> None:
        super().__init__(CPQ, role, bits, ch_axis, signed, factory_kwargs, learn_bits=learn_bits,
                         drop_rate=drop_rate, window=window, init_sigma=init_sigma, min_bits=min_bits)


def get_cpq_qconfig(weight_bits: int = 4, act_bits: int = 4, per_channel: bool = True, learn_bits: bool = False,
                    drop_rate: float = DEFAULT_DROP_RATE, window: int = DEFAULT_WINDOW,
                    act_signed: Optional[bool] = None) -> QConfig:
    """A ``QConfig`` with CPQ weight and activation fake-quants (CPQ-SPEC §1-6).

    Example:
        >>> get_cpq_qconfig(4, 4).weight().qscheme
        torch.per_channel_symmetric
    """
    return family_qconfig(CPQ, weight_bits, act_bits, per_channel, act_signed, learn_bits=learn_bits,
                          drop_rate=drop_rate, window=window)


def get_cpq_qat_qconfig_mapping(backend: str = "x86", weight_bits: int = 4, act_bits: int = 4,
                                per_channel: bool = True, float_module_names: Iterable[str] = (),
                                float_module_types: Iterable[type] = (), learn_bits: bool = False,
                                drop_rate: float = DEFAULT_DROP_RATE, window: int = DEFAULT_WINDOW,
                                act_signed: Optional[bool] = None) -> QConfigMapping:
    """torch's default QAT ``QConfigMapping`` for ``backend`` with CPQ as the global qconfig.

    The layout of :func:`daq_fx.get_daq_qat_qconfig_mapping` (:func:`daq_fx.family_qat_qconfig_mapping`).
    With ``learn_bits=True`` ``weight_bits`` / ``act_bits`` are the largest bit-widths (8 lets every
    layer choose among 1..8) and each quantizer learns its own; add the regulariser of
    :class:`daq_core.cpq.BitBudget` to the loss. Every supported backend (x86, fbgemm, qnnpack) holds
    8-bit codes, so any learned bit-width converts.

    Example:
        >>> mapping = get_cpq_qat_qconfig_mapping("x86", 8, 8, learn_bits=True)
    """
    return family_qat_qconfig_mapping(
        CPQ, backend, per_channel=per_channel, float_module_names=float_module_names,
        float_module_types=float_module_types,
        qconfig=lambda channel_wise: get_cpq_qconfig(weight_bits, act_bits, channel_wise, learn_bits, drop_rate,
                                                     window, act_signed))


def _input_quantizer(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[FamilyFakeQuantize]:
    """The activation fake-quant whose output feeds ``node`` (through shape-only ops), if any."""
    source = node.args[0] if node.args else None
    for _ in range(4):
        if not isinstance(source, fx.Node):
            return None
        if source.op == "call_module":
            module = modules.get(source.target)
            if isinstance(module, FamilyFakeQuantize):
                return module if not module.is_weight else None
            if hasattr(module, "source") and isinstance(getattr(module, "source"), FamilyFakeQuantize):
                return module.source          # an AveragedActivation
        if source.op in ("call_method", "call_function", "call_module") and source.args:
            source = source.args[0]
        else:
            return None
    return None


def layer_bit_widths(model: nn.Module) -> Dict[str, Dict[str, Optional[int]]]:
    """``{layer: {"weight": b, "activation": b}}`` of every layer with a CPQ weight quantizer.

    ``"activation"`` is the bit-width of the quantizer of the layer's input (``None`` where the
    input is not CPQ-quantized). Works on FX-prepared models (``daq_fx.prepare_qat_fx``).
    """
    out: Dict[str, Dict[str, Optional[int]]] = {}
    graph = getattr(model, "graph", None)
    modules = dict(model.named_modules())
    if graph is None:
        for name, module in modules.items():
            fq = getattr(module, "weight_fake_quant", None)
            if isinstance(fq, CPQFakeQuantize) or isinstance(fq, FamilyFakeQuantize) and fq.family is CPQ:
                out[name] = {"weight": fq.bit_width, "activation": None}
        return out
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        fq = getattr(modules.get(node.target), "weight_fake_quant", None)
        if not (isinstance(fq, FamilyFakeQuantize) and fq.family is CPQ):
            continue
        act = _input_quantizer(node, modules)
        out[node.target] = {"weight": fq.bit_width,
                            "activation": act.bit_width if act is not None and act.family is CPQ else None}
    return out


def check_learned_bits_backend(flow: str) -> None:
    """Refuse a flow whose quantization specs are fixed before training (pt2e): learned bit-widths need
    per-layer grids decided after training."""
    raise CPQBackendError(
        f"CPQ with learned bit-widths cannot be held by {flow}: its quantization specs (quant_min/quant_max per"
        " annotated op) are fixed before training, while each layer's bit-width is decided after. Use the"
        " torch.ao FX flow (daq_fx.get_cpq_qat_qconfig_mapping + daq_fx.convert_fx: per-layer grids, x86"
        " int8 kernels) or Brevitas (daq_brevitas.quantize_model(..., quantizer='cpq'): per-layer QONNX"
        " bit-widths), or fixed bit-widths (learn_bits=False).")


__all__ += ["check_learned_bits_backend"]
_ = core  # the numerics (documentation cross-reference)
