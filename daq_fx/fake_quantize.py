"""One torch.ao ``FakeQuantizeBase`` for every quantizer family (DAQ, N2UQ, CPQ).

:class:`FamilyFakeQuantize` hosts the state of a :class:`daq_core.family.QuantizerFamily` and adds
what torch.ao needs around it: the ``enable_fake_quant`` / ``disable_observer`` switches, the
first-batch initialisation, ``dtype`` / ``qscheme`` / ``quant_min`` / ``quant_max``, an
``activation_post_process`` record for the backend-constraint checks, and a ``calculate_qparams``
that describes *exactly* the integer grid the forward pass fake-quantizes to. The numerics live in
:mod:`daq_core` (:mod:`daq_core.daq`, :mod:`daq_core.n2uq`, :mod:`daq_core.cpq`).

:class:`DAQFakeQuantize` (this module), :class:`daq_fx.N2UQFakeQuantize` and
:class:`daq_fx.CPQFakeQuantize` are its thin named forms with each family's keyword arguments.
See :mod:`daq_core.daq` for DAQ's weight and activation grids.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch.ao.quantization import FakeQuantizeBase

from daq_core import DEFAULT_GAMMA
from daq_core.daq import DAQ, INT_EPS
from daq_core.family import ACTIVATION, SIGNED, SIGNED_AUTO, UNSIGNED, WEIGHT, FamilyStateMixin, QuantizerFamily

__all__ = ["FamilyFakeQuantize", "DAQFakeQuantize", "AveragedActivation", "WEIGHT", "ACTIVATION"]

#: Smallest quantization step reported to torch.ao (``eps`` of its observers).
_EPS = INT_EPS

# value of the ``signed`` buffer before the first batch decided it
_SIGNED_AUTO, _UNSIGNED, _SIGNED = SIGNED_AUTO, UNSIGNED, SIGNED


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


class FamilyFakeQuantize(FamilyStateMixin, FakeQuantizeBase):
    """The torch.ao fake-quant of any :class:`daq_core.family.QuantizerFamily`.

    Args:
        family: the family (``daq_core.daq.DAQ``, ``daq_core.n2uq.N2UQ``, ``daq_core.cpq.CPQ``);
            the named subclasses set it.
        role: ``"weight"`` or ``"activation"``.
        bits: the bit-width (weights at most the family's ``max_weight_bits``, activations 1..8).
        ch_axis: weights only: the output-channel axis for per-channel state, or ``None``.
        signed: activations only: ``False`` for never-negative inputs, ``True`` for signed ones,
            ``None`` to decide on the first batch.
        factory_kwargs: torch.ao passes ``{"device": ..., "dtype": ...}``; the device is used.
        **options: the family's own options (e.g. DAQ's ``gamma``, CPQ's ``learn_bits``).

    Weights are ``qint8`` (per channel with ``ch_axis``), activations ``quint8`` per tensor;
    ``quant_min`` / ``quant_max`` follow the family's grid at its current bit-width (learned for CPQ).
    The learned parameters are the family's (see :func:`daq_fx.quantizer_parameters`).

    Example:
        >>> from daq_core.cpq import CPQ
        >>> fq = FamilyFakeQuantize(CPQ, role="weight", bits=4, ch_axis=0)
        >>> wq = fq(torch.randn(8, 4))
        >>> scale, zero_point = fq.calculate_qparams()
        >>> k = torch.round(wq / scale[:, None])
        >>> bool(torch.allclose(k * scale[:, None], wq) and k.min() >= fq.quant_min and k.max() <= fq.quant_max)
        True
    """

    family: QuantizerFamily = None
    #: the named subclass of each family (``DAQFakeQuantize``, ...), by family name
    named: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family is not None and cls.family.name not in FamilyFakeQuantize.named:
            FamilyFakeQuantize.named[cls.family.name] = cls

    @classmethod
    def for_family(cls, family: QuantizerFamily, **kwargs):
        """``with_args`` of the family's named class (or of this class with ``family=``)."""
        named = FamilyFakeQuantize.named.get(family.name)
        return named.with_args(**kwargs) if named is not None else cls.with_args(family=family, **kwargs)

    def __init__(self, family: Optional[QuantizerFamily] = None, role: str = ACTIVATION, bits: int = 4,
                 ch_axis: Optional[int] = None, signed: Optional[bool] = None,
                 factory_kwargs: Optional[dict] = None, **options) -> None:
        super().__init__()
        family = family if family is not None else type(self).family
        if not isinstance(family, QuantizerFamily):
            raise TypeError(f"family must be a daq_core.family.QuantizerFamily, got {family!r}")
        device = (factory_kwargs or {}).get("device")
        place_switches(self, device)
        self.init_family_state(family, role, bits, ch_axis, signed, device, **options)
        self.is_dynamic = False
        if self.is_weight:
            self.dtype = torch.qint8
            self.qscheme = torch.per_channel_symmetric if ch_axis is not None else torch.per_tensor_symmetric
        else:
            self.dtype = torch.quint8
            self.qscheme = torch.per_tensor_affine
        # torch.ao reads quant_min / quant_max / eps of a fake-quant's observer for its
        # backend-constraint checks; there is no observer, this records the same numbers.
        self.activation_post_process = SimpleNamespace(
            quant_min=self.quant_min, quant_max=self.quant_max, eps=_EPS, dtype=self.dtype, qscheme=self.qscheme)

    # ------------------------------------------------------------------ grid
    @property
    def quant_min(self) -> int:
        return self.family.int_range(self)[0]

    @property
    def quant_max(self) -> int:
        return self.family.int_range(self)[1]

    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the integer grid of the forward pass (the family's ``qparams``)."""
        return self.family.qparams(self)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``forward(x)``: ``round(forward(x) / scale) + zero_point``."""
        with torch.no_grad():
            y = self(x)
            scale, zero_point = self.calculate_qparams()
            if self.is_weight and scale.numel() > 1:
                shape = [1] * y.dim()
                shape[self.ch_axis] = -1
                scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
            return (torch.round(y / scale) + zero_point).to(torch.int32)

    # ------------------------------------------------------------------ initialisation and forward
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """First-batch initialisation of the family's state (see the family's ``initialize``)."""
        self.family.initialize(self, x.detach())
        self.initialized.fill_(1)

    def _set_param(self, name: str, value: torch.Tensor) -> None:
        self.set_state_tensor(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1 and self.initialized[0] == 0:
            self.initialize(x)
        if self.fake_quant_enabled[0] == 0:
            return x
        return self.family.forward(self, x)

    def extra_repr(self) -> str:
        text = f"role={self.role}, bits={self.bits}"
        more = self.family.extra_repr(self)
        if more:
            text += ", " + more
        return text + f", dtype={self.dtype}, quant_min={self.quant_min}, quant_max={self.quant_max}"


class DAQFakeQuantize(FamilyFakeQuantize):
    """Distance-aware fake quantization (DAQ, ICCV 2021) for torch.ao QAT: :class:`FamilyFakeQuantize` of
    :data:`daq_core.daq.DAQ`.

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

    family = DAQ

    def __init__(self, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, gamma: float = DEFAULT_GAMMA, sigma: Optional[float] = None,
                 num_std: float = 3.0, center: Optional[bool] = None, init: str = "mse",
                 rounding: str = "dasr", beta: Optional[float] = None,
                 factory_kwargs: Optional[dict] = None) -> None:
        super().__init__(DAQ, role, bits, ch_axis, signed, factory_kwargs, gamma=gamma, sigma=sigma, num_std=num_std,
                         center=center, init=init, rounding=rounding, beta=beta)

    def activation_grid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bounds ``(l', u')`` the activation forward uses (integer-aligned zero point, see
        :meth:`daq_core.daq.DAQFamily.activation_grid`)."""
        return DAQ.activation_grid(self)

    def weight_output_scale(self) -> torch.Tensor:
        """The output scale ``s`` the weight forward uses, ``|s| / n ≥ eps`` (docs/fx.md, "Dead channels")."""
        return DAQ.weight_output_scale(self)


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

    def __init__(self, source: FamilyFakeQuantize) -> None:
        super().__init__()
        if not isinstance(source, FamilyFakeQuantize) or source.is_weight or not source.family.convertible_activations:
            raise TypeError(f"source must be an activation DAQFakeQuantize or CPQFakeQuantize, got {source!r}")
        place_switches(self, next(iter(source.buffers())).device)   # beside its source (prepare on a GPU model)
        object.__setattr__(self, "source", source)   # shared, not a child: no duplicate state
        for name in ("dtype", "qscheme", "ch_axis", "is_dynamic", "activation_post_process"):
            setattr(self, name, getattr(source, name))

    @property
    def quant_min(self) -> int:
        return self.source.quant_min

    @property
    def quant_max(self) -> int:
        return self.source.quant_max

    def calculate_qparams(self):
        return self.source.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.source
        if source.fake_quant_enabled[0] == 0 or self.fake_quant_enabled[0] == 0:
            return x
        if source.initialized[0] == 0:
            return source(x)
        with torch.no_grad():
            if isinstance(source, DAQFakeQuantize):
                lower, upper = source.activation_grid()
                n = source.num_levels
                step = (upper - lower) / n
            else:   # any uniform grid: scale, zero point and codes 0 … quant_max
                step, zp = source.calculate_qparams()
                n = source.quant_max
                lower = -zp.to(step.dtype) * step
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
