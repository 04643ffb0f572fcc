"""The quantizers users would pick instead of DAQ, wired like DAQ for side-by-side runs.

* ``stock``: torch.ao's default QAT fake-quant (``FakeQuantize`` with moving-average min/max
  observers, straight-through estimator), narrowed to ``b`` bits;
* ``lsq``: torch.ao's learnable fake-quant (``_LearnableFakeQuantize``, LSQ: learned scale with
  the LSQ gradient scaling ``1/sqrt(numel · Q_p)``), initialised as in the LSQ paper
  (``s = 2 mean|x| / sqrt(Q_p)``) on the first batch, per-channel for weights;
* ``brevitas-stock``: Brevitas's own STE quantizers of the same bit-width (``Int8WeightPerChannelFloat``,
  ``Uint8ActPerTensorFloat``, ``Int8ActPerTensorFloat`` with ``bit_width`` overridden).

Weights are signed integers in ``[-2^(b-1), 2^(b-1) - 1]`` (two's-complement ranges, as torch.ao
and Brevitas define them); at ``b = 1`` that is ``{-1, 0}``, not a binary grid, so the benchmark
runs these baselines at 2 bits and above only.
"""

from __future__ import annotations

import torch
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.nn import Parameter

__all__ = ["LSQFakeQuantize", "stock_qconfig_mapping", "lsq_qconfig_mapping", "brevitas_stock_quantizers"]


def _weight_range(bits: int):
    q = 2 ** (bits - 1)
    return -q, q - 1


def stock_qconfig_mapping(weight_bits: int, act_bits: int, backend: str = "x86"):
    """torch.ao's default QAT mapping with its ``FakeQuantize`` narrowed to ``weight_bits``/``act_bits``."""
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** act_bits - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    lo, hi = _weight_range(weight_bits)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=lo, quant_max=hi,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return get_default_qat_qconfig_mapping(backend).set_global(QConfig(activation=act, weight=weight))


class LSQFakeQuantize(_LearnableFakeQuantize):
    """torch.ao's ``_LearnableFakeQuantize`` (LSQ) with the LSQ paper's first-batch initialisation.

    torch's module needs the channel count at construction and starts from its min/max
    observer; a ``QConfig`` cannot know the channel count. This subclass sizes per-channel
    scales on the first batch, sets ``s = 2 mean|x| / sqrt(Q_p)`` (LSQ, Esser et al. 2020), and
    then learns ``s`` (and the activation zero point) by gradient, with LSQ's gradient scaling.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_grad_scaling", True)
        super().__init__(*args, **kwargs)
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8))
        self.toggle_observer_update(False)   # the min/max observer is not used: LSQ's own init below
        self.toggle_qparam_learning(True)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor):
        positive = max(self.quant_max, 1)
        per_channel = self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        if per_channel:
            dims = [d for d in range(x.dim()) if d != self.ch_axis]
            scale = 2.0 * x.abs().mean(dim=dims) / positive ** 0.5
        else:
            scale = (2.0 * x.abs().mean() / positive ** 0.5).reshape(1)
        scale = scale.clamp_min(float(self.eps))
        # symmetric weights: zero point 0; unsigned activations (after ReLU): 0; signed: mid-range
        signed_input = self.quant_min == 0 and bool((x < 0).any())
        zero_point = torch.full_like(scale, float((self.quant_max + 1) // 2) if signed_input else 0.0)
        self.scale = Parameter(scale.float(), requires_grad=True)
        self.zero_point = Parameter(zero_point.float(), requires_grad=True)
        self.initialized.fill_(1)

    def forward(self, x):
        if self.initialized[0] == 0:
            self._initialize(x.detach())
        return super().forward(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                setattr(self, name, Parameter(state_dict[key].detach().clone().float()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def lsq_qconfig_mapping(weight_bits: int, act_bits: int, backend: str = "x86"):
    """torch's default QAT mapping with LSQ fake-quants (per-channel weights, per-tensor activations)."""
    act = LSQFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** act_bits - 1,
                                    dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    lo, hi = _weight_range(weight_bits)
    weight = LSQFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=lo, quant_max=hi,
                                       dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return get_default_qat_qconfig_mapping(backend).set_global(QConfig(activation=act, weight=weight))


def brevitas_stock_quantizers():
    """``(weight_quant, act_quant, signed_act_quant)``: Brevitas's default STE quantizers."""
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    return Int8WeightPerChannelFloat, Uint8ActPerTensorFloat, Int8ActPerTensorFloat
