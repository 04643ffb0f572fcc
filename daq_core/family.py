"""Quantizer families: declared once here, hosted by one adapter per framework.

A *family* (DAQ, N2UQ, CPQ) is everything a framework plugin needs to know about a quantizer,
without any torch.ao or Brevitas import:

* its learned parameters and buffers for a role (``create_state``) and their first-batch
  initialisation (``initialize``);
* the forward pass with its backward (``forward``: differentiable in the input and the state);
* the integer grid the forward lands on, for convert/export (``qparams`` → ``(scale, zero_point)``,
  ``int_range`` → ``(quant_min, quant_max)``);
* the bit-width (``bit_width``: fixed for DAQ and N2UQ, learned for CPQ).

The state lives on a module of the framework adapter (``daq_fx.FamilyFakeQuantize``,
``daq_brevitas.FamilyScaling``) that mixes in :class:`FamilyStateMixin`; the family's methods
take that module as ``state`` and read and write its attributes. DAQ, N2UQ and CPQ therefore
differ only in their ``daq_core`` module (:mod:`daq_core.daq`, :mod:`daq_core.n2uq`,
:mod:`daq_core.cpq`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .checks import MAX_BITS, check_bits

__all__ = ["QuantizerFamily", "FamilyStateMixin", "FamilyQuantizer", "family_by_name", "WEIGHT", "ACTIVATION", "SIGNED_AUTO", "UNSIGNED", "SIGNED",
           "family_modules"]

WEIGHT = "weight"
ACTIVATION = "activation"

#: values of the ``signed`` buffer: not decided yet (first batch decides), unsigned, signed
SIGNED_AUTO, UNSIGNED, SIGNED = -1, 0, 1


_FAMILIES: Dict[str, "QuantizerFamily"] = {}


def family_by_name(name: str) -> "QuantizerFamily":
    """The family instance registered under ``name`` (``"daq"``, ``"n2uq"``, ``"cpq"``)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown quantizer family {name!r}: choose one of {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


class QuantizerFamily:
    """The declaration of a quantizer family (subclass it; one instance per family).

    Class attributes:
        name: the short name used in configs (``"daq"``, ``"n2uq"``, ``"cpq"``).
        title: how messages name it (``"DAQ"``).
        max_weight_bits: the largest weight bit-width whose integer grid an int8 backend holds.
        symmetric_weights: the message when ``signed`` is given to a weight quantizer.
        per_tensor_activations: the message when ``ch_axis`` is given to an activation quantizer.
        learns_bits: whether :meth:`bit_width` can differ from the configured bit-width.
        convertible_activations: whether the activation grid is a uniform integer grid
            (``round(x / scale) + zero_point``) that an int8 kernel reproduces.

    Every method takes the hosting module as ``state``.
    """

    name = "family"
    title = "quantizer"
    max_weight_bits = MAX_BITS
    symmetric_weights = "weights are always symmetric"
    per_tensor_activations = "integer backends quantize activations per tensor"
    learns_bits = False
    convertible_activations = True
    #: activation quantizers hold a ``signed`` buffer; weights too where this is True
    weight_signed_buffer = False

    def __init__(self) -> None:
        _FAMILIES[self.name] = self

    # one instance per family: copies (deepcopy of qconfigs, pickling of checkpoints) are that instance
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (family_by_name, (self.name,))

    def __repr__(self) -> str:
        return f"<quantizer family {self.name!r}>"

    # ------------------------------------------------------------------ declaration
    def configure(self, state, **options) -> None:
        """Validate the family's own options and set them as attributes of ``state``."""
        if options:
            raise TypeError(f"{self.title} quantizers take no option(s) {', '.join(sorted(options))}")

    def create_state(self, state, device=None) -> None:
        """Register the learned parameters and buffers of ``state.role`` on ``state``."""
        raise NotImplementedError

    def initialize(self, state, x: torch.Tensor) -> None:
        """First-batch initialisation of the state from ``x`` (under ``no_grad``)."""
        raise NotImplementedError

    def forward(self, state, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``x`` (differentiable in ``x`` and the state)."""
        raise NotImplementedError

    def qparams(self, state) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the forward's integer grid (per channel for per-channel weights)."""
        raise NotImplementedError

    def int_range(self, state) -> Tuple[int, int]:
        """``(quant_min, quant_max)`` of the forward's integer codes at the current bit-width."""
        raise NotImplementedError

    def bit_width(self, state) -> int:
        """The bit-width the forward uses in eval mode."""
        return int(state.bits)

    def extra_repr(self, state) -> str:
        return ""

    def resizable(self, state) -> Tuple[str, ...]:
        """Names of parameters/buffers whose shape follows the tensor (per channel): loading resizes them."""
        return ()

    def check_state_dict(self, state, state_dict, prefix: str) -> None:
        """Refuse a checkpoint entry that cannot belong to this quantizer (before loading)."""


class FamilyStateMixin:
    """The state of one quantizer of a family, on an ``nn.Module`` (mix in before ``nn.Module``).

    Holds the role, the configured bit-width, the channel axis, the ``initialized`` (and
    ``signed``) buffers and whatever the family registers; validates the common arguments with
    messages that name the family; resizes per-channel state on first initialisation and on load.
    """

    family: QuantizerFamily

    def init_family_state(self, family: QuantizerFamily, role: str, bits: int, ch_axis: Optional[int] = None,
                          signed: Optional[bool] = None, device=None, **options) -> None:
        if role not in (WEIGHT, ACTIVATION):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        self.family = family
        self.role = role
        if role == WEIGHT:
            self.bits = check_bits(bits, "weight bits", family.max_weight_bits)
            if signed is not None:
                raise ValueError(f"signed applies to activations only: {family.title} {family.symmetric_weights}")
        else:
            self.bits = check_bits(bits, "activation bits")
            if ch_axis is not None:
                raise ValueError(f"ch_axis applies to weights only: {family.per_tensor_activations};"
                                 " pass ch_axis=None for activations")
        if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
            raise TypeError(f"ch_axis must be an int or None, got {ch_axis!r}")
        if signed is not None and not isinstance(signed, bool):
            raise TypeError(f"signed must be True, False or None (decide on the first batch), got {signed!r}")
        self.ch_axis = ch_axis
        self.upper_limit: Optional[float] = None
        #: where the quantizer sits, for messages (set by the prepare functions; not part of the state)
        self.name = ""
        family.configure(self, **options)
        if role == ACTIVATION or family.weight_signed_buffer:
            state = SIGNED_AUTO if signed is None else (SIGNED if signed else UNSIGNED)
            self.register_buffer("signed", torch.tensor([state], dtype=torch.int8, device=device))
            #: the ``signed`` value at construction, readable without touching the device (``create_state``)
            self.signed_at_construction = state
        family.create_state(self, device)
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8, device=device))

    # ------------------------------------------------------------------ properties
    @property
    def is_weight(self) -> bool:
        return self.role == WEIGHT

    @property
    def is_unsigned(self) -> bool:
        """Activations whose grid starts at 0 (decided on the first batch when ``signed=None``)."""
        return (not self.is_weight) and int(self.signed.item()) == UNSIGNED

    @property
    def num_levels(self) -> int:
        """``n = 2^b - 1`` at the configured bit-width."""
        return (1 << self.bits) - 1

    @property
    def bit_width(self) -> int:
        """The bit-width of the eval forward (learned for CPQ with learned bit-widths)."""
        return self.family.bit_width(self)

    def label(self) -> str:
        """How messages name this quantizer: ``name`` (set by the prepare functions)."""
        kind = "weight" if self.is_weight else "activation"
        title = self.family.title
        return f"{title} {kind} quantizer {self.name!r}" if self.name else f"a {title} {kind} quantizer"

    def decide_signed(self, x: torch.Tensor) -> bool:
        """Fix ``signed`` from the first batch if not given (``min >= 0`` means unsigned); return it."""
        if int(self.signed.item()) == SIGNED_AUTO:
            self.signed.fill_(SIGNED if bool((x < 0).any()) else UNSIGNED)
        return int(self.signed.item()) != UNSIGNED

    def set_upper_limit(self, limit: Optional[float]) -> None:
        """Cap the activation range at ``limit`` (e.g. 6 after a ReLU6 turned into a ReLU)."""
        from .checks import check_positive

        if self.is_weight:
            raise ValueError("set_upper_limit applies to activation quantizers only")
        self.upper_limit = None if limit is None else check_positive(limit, "limit")

    # ------------------------------------------------------------------ state
    def set_state_tensor(self, name: str, value: torch.Tensor) -> None:
        """Copy ``value`` into the parameter/buffer ``name``, taking its shape if it differs."""
        current = getattr(self, name)
        if current.shape == value.shape:
            current.data.copy_(value.to(current.dtype))
        elif isinstance(current, nn.Parameter):   # first per-channel initialisation, or a per-channel checkpoint
            setattr(self, name, nn.Parameter(value.detach().clone().to(current.device, current.dtype),
                                             requires_grad=current.requires_grad))
        else:
            setattr(self, name, value.detach().clone().to(current.device, current.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.family.check_state_dict(self, state_dict, prefix)
        for name in self.family.resizable(self):
            key = prefix + name
            if key in state_dict and hasattr(self, name) and getattr(self, name).shape != state_dict[key].shape:
                self.set_state_tensor(name, state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def family_modules(model: nn.Module, family: Optional[QuantizerFamily] = None) -> Dict[str, FamilyStateMixin]:
    """``{name: module}`` of every family state in ``model`` (of ``family`` only, if given), each once."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, FamilyStateMixin) and id(module) not in seen:
            if family is None or module.family is family or module.family.name == getattr(family, "name", family):
                seen.add(id(module))
                out[name] = module
    return out


class FamilyQuantizer(FamilyStateMixin, nn.Module):
    """A framework-free module hosting one quantizer of any family: first call initialises, then quantizes.

    The plain form of what the framework adapters do (``daq_fx.FamilyFakeQuantize``,
    ``daq_brevitas.FamilyScaling``); useful on its own in custom layers and in tests.

    Example:
        >>> from daq_core.cpq import CPQ
        >>> q = FamilyQuantizer(CPQ, "weight", bits=4, ch_axis=0).eval()
        >>> y = q(torch.randn(8, 3))             # the first call initialises the per-channel step
        >>> scale, zero_point = q.qparams()
        >>> codes = torch.round(y / scale[:, None])
        >>> bool(torch.allclose(codes * scale[:, None], y) and codes.abs().max() <= 8)
        True
    """

    def __init__(self, family: QuantizerFamily, role: str = ACTIVATION, bits: int = 4, ch_axis: Optional[int] = None,
                 signed: Optional[bool] = None, device=None, **options) -> None:
        super().__init__()
        self.init_family_state(family, role, bits, ch_axis, signed, device, **options)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self.family.initialize(self, x.detach())
        self.initialized.fill_(1)

    def qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.family.qparams(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.initialized[0] == 0:
            self.initialize(x)
        return self.family.forward(self, x)

    def extra_repr(self) -> str:
        text = f"family={self.family.name}, role={self.role}, bits={self.bits}"
        more = self.family.extra_repr(self)
        return text + (", " + more if more else "")
