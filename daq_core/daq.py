"""DAQ as a :class:`daq_core.family.QuantizerFamily`: what an integer-backend adapter hosts.

The numerics are :mod:`daq_core.quantizers` (normalisation of Eq. 1, DASR of Eqs. 4-11, the weight
grid of Eq. 2 with the layer scale of Eq. 3) and :mod:`daq_core.init`; this module declares the
state (learned ``lower_bound``, ``upper_bound`` and, for weights, ``output_scale``), the first-batch
initialisation, the forward and the integer grid an int8 backend holds:

Weights (DAQ-SPEC §3, §5)::

    ŵ = (W - mean W) / std W                       (constants; per tensor or per output channel)
    t = clamp((ŵ - l) / Δ, 0, n),   Δ = (u - l) / n,   n = 2^b - 1               (Eq. 1)
    W_q = s · (2 DASR(t) - n) / n                                                (Eqs. 2-3)

  i.e. the odd integers ``k ∈ {-n, -n+2, …, n}`` times the step ``|s| / n``, zero point 0
  (``quant_min = -n``, ``quant_max = n``; int8 holds them up to 7 bits).

Activations (DAQ-SPEC §4), natural units, integer-aligned zero point::

    A_q = l' + Δ · DASR(clamp((A - l') / Δ, 0, n)),   l' = -zp · Δ,   zp = clamp(round(-l / Δ), 0, n)

  i.e. codes ``0 … n`` with scale ``Δ`` and zero point ``zp``; ``l = 0`` is fixed for inputs that
  are never negative (ReLU-like), decided on the first batch unless ``signed`` is given.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .checks import MAX_INT8_WEIGHT_BITS, check_positive
from .dasr import DEFAULT_ACT_SIGMA, DEFAULT_GAMMA, DEFAULT_WEIGHT_SIGMA
from .family import QuantizerFamily
from .checks import check_finite
from .init import init_activation_quantizer, init_weight_quantizer, normalize_weight
from .quantizers import check_rounding, daq_fake_quantize, fake_quantize_weight, floor_weight_scale

__all__ = ["DAQ", "DAQFamily", "INT_EPS"]

#: Smallest quantization step an integer backend accepts (float32 eps, torch.ao's observers' ``eps``).
INT_EPS = float(torch.finfo(torch.float32).eps)


class DAQFamily(QuantizerFamily):
    """DAQ (ICCV 2021): learned bounds, DASR rounding, odd-integer weight grid (see the module docstring).

    Options (attributes of the hosting module): ``gamma``, ``sigma`` (default by role), ``num_std``,
    ``center`` (default: per tensor), ``init`` (``"mse"`` / ``"std"``), ``rounding`` / ``beta``.
    """

    name = "daq"
    title = "DAQ"
    max_weight_bits = MAX_INT8_WEIGHT_BITS
    symmetric_weights = "weights are always symmetric (Eq. 2)"
    weight_signed_buffer = True

    def configure(self, state, gamma: float = DEFAULT_GAMMA, sigma: Optional[float] = None, num_std: float = 3.0,
                  center: Optional[bool] = None, init: str = "mse", rounding: str = "dasr",
                  beta: Optional[float] = None) -> None:
        state.gamma = check_positive(gamma, "gamma")
        default_sigma = DEFAULT_WEIGHT_SIGMA if state.is_weight else DEFAULT_ACT_SIGMA
        state.sigma = check_positive(default_sigma if sigma is None else sigma, "sigma")
        state.num_std = check_positive(num_std, "num_std")
        if init not in ("mse", "std"):
            raise ValueError(f"init must be 'mse' or 'std', got {init!r}")
        state.init = init
        state.rounding = check_rounding(rounding, beta)
        state.beta = None if beta is None else float(beta)
        if center is not None and not isinstance(center, bool):
            raise TypeError(f"center must be True, False or None, got {center!r}")
        state.center = (state.ch_axis is None) if center is None else center

    def create_state(self, state, device=None) -> None:
        if state.is_weight:
            lower, upper = -3.0, 3.0                                  # DAQ-SPEC §3: l = -3, u = 3 on ŵ
        else:
            signed = state.signed_at_construction == 1      # no .item(): the state may be on any device
            lower, upper = (-1.0 if signed else 0.0), 1.0              # replaced on the first batch
        state.lower_bound = nn.Parameter(torch.tensor([lower], device=device))
        state.upper_bound = nn.Parameter(torch.tensor([upper], device=device))
        if state.is_weight:
            state.output_scale = nn.Parameter(torch.tensor([1.0], device=device))

    def resizable(self, state) -> Tuple[str, ...]:
        return ("lower_bound", "upper_bound", "output_scale")

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize(self, state, x: torch.Tensor) -> None:
        """First-batch initialisation (DAQ-SPEC §3-5), shared with ``daq_brevitas`` through :mod:`daq_core.init`.

        Weights (:func:`daq_core.init_weight_quantizer`): bounds ``∓3`` on the normalised weight
        (``init="std"``, the paper) or the least-error candidate per channel (``"mse"``), and the
        least-squares output scale ``s``. Activations (:func:`daq_core.init_activation_quantizer`):
        ``l = 0, u = 3 std`` when the batch is never negative (or ``signed=False``), else ``±3 std``;
        with ``"mse"`` the least-error bounds among those and fractions of the range.
        """
        label = state.label()
        if state.is_weight:
            channels = 1 if state.ch_axis is None else x.shape[state.ch_axis]
            lower, upper, scale = init_weight_quantizer(
                x, state.bits, state.ch_axis if channels > 1 else None, center=state.center, method=state.init,
                name=label)
            state.set_state_tensor("lower_bound", lower)
            state.set_state_tensor("upper_bound", upper)
            state.set_state_tensor("output_scale", scale.reshape(channels).float())
            return
        # refused before any state changes (the signed decision below included): a NaN / Inf first
        # batch would otherwise leave NaN bounds that fail every later call
        check_finite(x, f"the first batch of {label}")
        signed = int(state.signed.item())
        if signed == -1:
            signed = 1 if bool((x < 0).any()) else 0
        lower, upper = init_activation_quantizer(x, state.bits, signed=signed != 0, method=state.init,
                                                 num_std=state.num_std, name=label)
        if state.upper_limit is not None:
            upper = torch.clamp(upper, max=state.upper_limit)
        state.signed.fill_(signed)
        state.set_state_tensor("lower_bound", lower.reshape(1).float())
        state.set_state_tensor("upper_bound", upper.reshape(1).float())

    # ------------------------------------------------------------------ grid
    def capped(self, state, upper: torch.Tensor) -> torch.Tensor:
        cap = state.upper_limit
        return upper if cap is None else torch.clamp(upper, max=cap)

    def activation_grid(self, state) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bounds ``(l', u')`` the activation forward uses: integer-aligned zero point.

        ``Δ = (u - l)/n``; ``zp = clamp(round(-l/Δ), 0, n)``; ``l' = -zp Δ`` (straight-through
        to ``l``) and ``u' = l' + (u - l)``. Unsigned: ``l' = 0``, ``u' = u``.
        """
        n = state.num_levels
        if state.is_unsigned:
            upper = self.capped(state, state.upper_bound)
            # 0 · u rather than a constant: the same tensor properties (requires_grad) as in the
            # signed case, so torch.compile'd kernels are not recompiled per quantizer kind
            return upper * 0.0, upper
        lower, upper = state.lower_bound, self.capped(state, state.upper_bound)
        step = (upper - lower) / n
        zero_point = torch.clamp(torch.round(-lower.detach() / step.detach()), 0, n)
        aligned = lower + (-zero_point * step.detach() - lower).detach()
        return aligned, aligned + (upper - lower)

    def weight_output_scale(self, state) -> torch.Tensor:
        """The output scale ``s`` the weight forward uses: ``output_scale`` with ``|s| / n ≥ eps``
        (:func:`daq_core.floor_weight_scale`; docs/fx.md "Dead channels")."""
        return floor_weight_scale(state.output_scale, state.bits, INT_EPS)

    def qparams(self, state) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weights: ``scale = |s| / n`` (per channel if ``ch_axis``), zero point 0; the fake-quantized
        weight equals ``scale · k`` with ``k`` odd in ``[-n, n]``. Activations: ``scale = Δ = (u' - l')/n``,
        ``zero_point = -l'/Δ`` (an integer in ``[0, n]``)."""
        with torch.no_grad():
            if state.is_weight:
                scale = (self.weight_output_scale(state).detach().abs() / state.num_levels).float()
                if state.ch_axis is None:
                    scale = scale.reshape(1)
                return scale, torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
            lower, upper = self.activation_grid(state)
            step = ((upper - lower) / state.num_levels).float().clamp_min(INT_EPS)
            zero_point = torch.clamp(torch.round(-lower / step), 0, state.num_levels).to(torch.int64)
            return step.reshape(1), zero_point.reshape(1)

    def int_range(self, state) -> Tuple[int, int]:
        n = state.num_levels
        return (-n, n) if state.is_weight else (0, n)

    # ------------------------------------------------------------------ forward
    def param_axis(self, state) -> Optional[int]:
        return state.ch_axis if state.lower_bound.numel() > 1 or state.ch_axis is not None else None

    def forward(self, state, x: torch.Tensor) -> torch.Tensor:
        # the soft ablation's forward is not rounding; in eval mode it rounds like the int model
        soft_eval = not state.training and state.rounding == "soft"
        rounding, beta = ("ste", None) if soft_eval else (state.rounding, state.beta)
        if state.is_weight:
            w = x if state.center else normalize_weight(x, state.ch_axis, center=False)
            return fake_quantize_weight(w, state.lower_bound, state.upper_bound, self.weight_output_scale(state),
                                        state.bits, state.gamma, state.sigma, ch_axis=self.param_axis(state),
                                        standardize_input=state.center, rounding=rounding, beta=beta)
        lower, upper = self.activation_grid(state)
        return daq_fake_quantize(x, lower, upper, state.bits, lower, (upper - lower) / state.num_levels,
                                 state.gamma, state.sigma, rounding=rounding, beta=beta)

    def extra_repr(self, state) -> str:
        text = f"gamma={state.gamma}, sigma={state.sigma}"
        if state.rounding != "dasr":
            text += f", rounding={state.rounding}" + (f", beta={state.beta}" if state.beta is not None else "")
        if state.is_weight:
            text += f", ch_axis={state.ch_axis}, center={state.center}"
        else:
            text += f", signed={ {-1: 'auto', 0: False, 1: True}[int(state.signed.item())] }"
            if state.upper_limit is not None:
                text += f", upper_limit={state.upper_limit}"
        return text


#: the DAQ family (one instance)
DAQ = DAQFamily()
