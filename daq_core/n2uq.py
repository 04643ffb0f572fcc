"""N2UQ (Nonuniform-to-Uniform Quantization, CVPR 2022): learnable input thresholds, uniform outputs.

A comparison quantizer beside DAQ (DAQ-SPEC §8). Notation:

* ``n = 2^b - 1`` segments between ``n + 1`` learned boundaries
  ``d_0 = s``, ``d_i = s + sum_{j<=i} a_j`` with positive widths ``a_j`` (init ``2/n``);
* the *non-uniform normalisation* ``g(x)``: piecewise linear, 0 below ``d_0``, ``n`` above
  ``d_n`` and ``i - 1 + (x - d_{i-1}) / a_i`` in segment ``i``;
* forward: ``y = scale * (2/n) * round(g(x))`` - i.e. counting the segment midpoints
  ``(d_{i-1} + d_i)/2`` that ``x`` exceeds - so the *output* levels are uniform,
  ``scale * (2/n) * k``, ``k = 0..n``, while the input thresholds are not;
* backward (generalised STE): the derivative of ``scale * (2/n) * g(x)``, i.e.
  ``scale * (2/n) / a_i`` inside segment ``i`` and 0 outside ``[d_0, d_n]``; the
  boundaries ``s`` and ``a`` receive the gradient of ``g`` with respect to them.

The weight quantizer is per-channel with ``alpha = (n / 2^(b-1)) mean|W|`` (a constant),
the ``2^b`` symmetric levels ``alpha (2k - n)/n`` without zero, and a clipped STE.
"""

from __future__ import annotations

from typing import Optional

import torch

from .checks import check_bits, check_floating

__all__ = ["n2uq_thresholds", "n2uq_activation", "n2uq_weight", "n2uq_init_widths", "n2uq_weight_alpha",
           "n2uq_step", "n2uq_fake_quantize_activation", "n2uq_activation_codes", "n2uq_init_activation"]


def n2uq_init_widths(bits: int, dtype=torch.float32) -> torch.Tensor:
    """Initial segment widths ``a_j = 2/n`` (boundaries spanning ``[s, s + 2]``)."""
    n = (1 << check_bits(bits)) - 1
    return torch.full((n,), 2.0 / n, dtype=dtype)


def _positive(widths: torch.Tensor) -> torch.Tensor:
    # widths are kept positive by a floor; the floor is straight-through for the gradient sign
    return widths.clamp_min(1e-6)


def n2uq_thresholds(start: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Input thresholds: the segment midpoints ``(d_{i-1} + d_i)/2``, ``i = 1..n`` (monotone)."""
    a = _positive(widths)
    bounds = start + torch.cat([a.new_zeros(1), torch.cumsum(a, 0)])
    return 0.5 * (bounds[:-1] + bounds[1:])


def _segments(x: torch.Tensor, start: torch.Tensor, widths: torch.Tensor):
    """Locate ``x`` among the boundaries ``d_0..d_n``; return the pieces of ``g(x)``."""
    a = _positive(widths)
    n = a.numel()
    bounds = start.reshape(1) + torch.cat([a.new_zeros(1), torch.cumsum(a, 0)])   # d_0..d_n
    seg = torch.bucketize(x.detach(), bounds.detach(), right=True)  # 0 below d_0, i in segment i, n+1 above d_n
    inside = (seg >= 1) & (seg <= n)
    idx = (seg - 1).clamp(0, n - 1)
    a_i, d_prev = a[idx], bounds[idx]
    g = torch.where(inside, idx.to(x.dtype) + (x - d_prev) / a_i, (seg > n).to(x.dtype) * n)
    return n, inside, idx, a_i, d_prev, g


class _N2UQActivation(torch.autograd.Function):
    """Forward ``scale (2/n) round(g(x))``; backward the G-STE (derivative of ``scale (2/n) g``)."""

    @staticmethod
    def forward(ctx, x, start, widths, scale):
        n, _, _, _, _, g = _segments(x, start, widths)
        ctx.save_for_backward(x, start, widths, scale)
        return scale * (2.0 / n) * torch.round(g)

    @staticmethod
    def backward(ctx, grad_y):
        x, start, widths, scale = ctx.saved_tensors
        n, inside, idx, a_i, d_prev, g = _segments(x, start, widths)
        unit = 2.0 / n
        zero = torch.zeros_like(grad_y)
        g_x = torch.where(inside, grad_y * scale * unit / a_i, zero)          # dy/dx = scale (2/n) / a_i (G-STE)
        # g = i - 1 + (x - d_{i-1}) / a_i:  dg/ds = -1/a_i,  dg/da_j = -1/a_i (j < i),  dg/da_i = -(x - d_{i-1})/a_i^2
        grad_start = (-g_x).sum().reshape(start.shape)
        per_segment = zero.new_zeros(n).index_add_(0, idx.flatten(), (-g_x).flatten())
        own = zero.new_zeros(n).index_add_(0, idx.flatten(), torch.where(inside, -g_x * (x - d_prev) / a_i, zero).flatten())
        later = torch.flip(torch.cumsum(torch.flip(per_segment, [0]), 0), [0]) - per_segment   # sum over segments i > j
        grad_widths = (own + later) * (widths >= 1e-6).to(grad_y.dtype)
        grad_scale = (grad_y * unit * torch.round(g)).sum().reshape(scale.shape)
        return g_x, grad_start, grad_widths, grad_scale


def n2uq_activation(x: torch.Tensor, start: torch.Tensor, widths: torch.Tensor, scale,
                    bits: Optional[int] = None) -> torch.Tensor:
    """N2UQ activation quantizer (see module docstring).

    Args:
        x: floating input.
        start: ``s = d_0``, a scalar tensor.
        widths: the ``n = 2^b - 1`` positive segment widths ``a_j`` (floored at 1e-6).
        scale: output scale; levels are ``scale * (2/n) * k``.
        bits: optional; checked against ``widths.numel()``.

    Returns:
        Tensor like ``x`` on the uniform output grid.
    """
    check_floating(x, "x")
    check_floating(widths, "widths")
    n = widths.numel()
    if n < 1 or (n + 1) & n:
        raise ValueError(f"widths must hold 2^b - 1 segment widths, got {n}")
    if bits is not None and (1 << check_bits(bits)) - 1 != n:
        raise ValueError(f"bits={bits} needs {(1 << bits) - 1} widths, got {n}")
    if not isinstance(start, torch.Tensor):
        start = torch.tensor(float(start), dtype=x.dtype, device=x.device)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
    if start.numel() != 1 or scale.numel() != 1:
        raise ValueError("start and scale must be single values (N2UQ activations are per-tensor)")
    return _N2UQActivation.apply(x, start, widths, scale)


def n2uq_weight_alpha(w: torch.Tensor, bits: int, ch_axis: Optional[int] = 0, min_step: float = 0.0) -> torch.Tensor:
    """``alpha = (n / 2^(b-1)) mean|W|`` per output channel (or per tensor), a constant.

    ``min_step`` floors the grid's step ``alpha / n`` (an integer backend's smallest quantization
    scale; see :func:`daq_core.floor_weight_scale` for why the forward must use the same floor).
    """
    n = (1 << check_bits(bits)) - 1
    with torch.no_grad():
        if ch_axis is None or w.dim() < 2:
            m = w.abs().mean()
        else:
            dims = [d for d in range(w.dim()) if d != ch_axis % w.dim()]
            m = w.abs().mean(dim=dims, keepdim=True)
        alpha = (n / 2 ** (bits - 1)) * m.clamp_min(1e-12)
        return alpha.clamp_min(n * min_step) if min_step > 0 else alpha


class _ClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha, n: int):
        u = ((w / alpha + 1.0) * (n / 2.0)).clamp(0, n)
        ctx.save_for_backward(w, alpha)
        return alpha * (2.0 * torch.round(u) - n) / n

    @staticmethod
    def backward(ctx, grad):
        w, alpha = ctx.saved_tensors
        return torch.where(w.abs() <= alpha, grad, torch.zeros_like(grad)), None, None


def n2uq_weight(w: torch.Tensor, bits: int, ch_axis: Optional[int] = 0, min_step: float = 0.0) -> torch.Tensor:
    """N2UQ weight quantizer: ``alpha (2k - n)/n`` with ``k = round((w/alpha + 1) n/2)``, clipped STE.

    ``min_step``: floor of the step ``alpha / n`` (see :func:`n2uq_weight_alpha`).
    """
    check_floating(w, "w")
    n = (1 << check_bits(bits)) - 1
    alpha = n2uq_weight_alpha(w, bits, ch_axis, min_step)
    return _ClippedSTE.apply(w, alpha, n)


# ----------------------------------------------------------------------------------------------
# What the framework plugins (daq_fx, daq_brevitas) share around the two quantizers above
# ----------------------------------------------------------------------------------------------

def n2uq_step(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The output step ``Δ = |scale| 2/n`` of the uniform activation levels."""
    n = (1 << check_bits(bits)) - 1
    return scale.abs() * (2.0 / n)


def n2uq_fake_quantize_activation(x: torch.Tensor, start: torch.Tensor, widths: torch.Tensor,
                                  scale: torch.Tensor, zero_point=0) -> torch.Tensor:
    """The activation quantizer as both plugins run it: ``Δ (round(g(x)) - zp)``, ``Δ = |scale| 2/n``.

    :func:`n2uq_activation` with a positive scale (``|scale|``) and the output shifted down by
    ``zp`` whole steps (``zp = 0`` for ReLU-like inputs, the paper's non-negative levels; an integer
    in ``[0, n]`` chosen on the first batch for signed inputs, see :func:`n2uq_init_activation`).
    The codes ``round(g(x))`` are the quint8 integers of a grid with scale ``Δ`` and zero point
    ``zp``. The G-STE backward is that of :func:`n2uq_activation` (the shift is affine).
    """
    y = n2uq_activation(x, start, widths, scale.abs())
    if isinstance(zero_point, torch.Tensor) or zero_point != 0:
        y = y - n2uq_step(scale, _bits_of(widths)) * zero_point
    return y


def _bits_of(widths: torch.Tensor) -> int:
    n = widths.numel()
    return (n + 1).bit_length() - 1


@torch.no_grad()
def n2uq_activation_codes(x: torch.Tensor, start: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The integer codes ``round(g(x))`` in ``[0, n]`` of the activation forward (int64)."""
    if not isinstance(start, torch.Tensor):
        start = torch.tensor(float(start), dtype=x.dtype, device=x.device)
    n = widths.numel()
    y = n2uq_activation(x, start.to(x.dtype), widths.to(x.dtype), torch.tensor(n / 2.0, dtype=x.dtype,
                                                                                      device=x.device))
    return torch.round(y).to(torch.int64)


@torch.no_grad()
def n2uq_init_activation(x: torch.Tensor, bits: int, signed: bool, method: str = "mse", num_std: float = 3.0):
    """First-batch initialisation: N2UQ starts as the uniform quantizer of DAQ's first-batch bounds.

    The bounds ``(l, u)`` come from :func:`daq_core.init_activation_quantizer` (``method`` "mse" or
    "std", DAQ-SPEC §4); then ``Δ = (u - l)/n``, ``zp = clamp(round(-l/Δ), 0, n)`` (0 when unsigned),
    ``s = -zp Δ`` (integer-aligned), all widths ``a_j = Δ`` and ``scale = n Δ / 2``, so that the
    output ``Δ (round((x - s)/Δ clipped) - zp)`` is uniform rounding onto ``[l, u]``; training then
    moves the thresholds apart.

    Returns:
        ``(start, widths, scale, zero_point)``: 0-d, ``(n,)``, 0-d float32 tensors and an int64 0-d tensor.
    """
    from .init import init_activation_quantizer
    n = (1 << check_bits(bits)) - 1
    lower, upper = init_activation_quantizer(x, bits, signed=signed, method=method, num_std=num_std)
    step = ((upper - lower) / n).clamp_min(1e-8)
    zero_point = torch.clamp(torch.round(-lower / step), 0, n) if signed else torch.zeros_like(step)
    start = -zero_point * step
    widths = step.reshape(1).expand(n).clone()
    return (start.reshape(()).float(), widths.float(), (step * n / 2).reshape(()).float(),
            zero_point.reshape(()).to(torch.int64))


# ----------------------------------------------------------------------------------------------
# N2UQ as a quantizer family (daq_core.family): what an integer-backend adapter hosts
# ----------------------------------------------------------------------------------------------

from .family import QuantizerFamily  # noqa: E402

#: Smallest quantization step an integer backend accepts (float32 eps; see daq_core.daq.INT_EPS).
_INT_EPS = float(torch.finfo(torch.float32).eps)


class N2UQFamily(QuantizerFamily):
    """N2UQ as a :class:`daq_core.family.QuantizerFamily`.

    Activations (per tensor): learned ``start``, positive ``widths`` (``n = 2^b - 1``) and
    ``output_scale``, a first-batch ``zero_point``; output ``Δ (round(g(A)) - zp)``, ``Δ = |scale| 2/n``:
    codes ``round(g(A))`` in ``0 … n`` (uniform output levels, non-uniform input thresholds).
    Weights: ``α = (n / 2^(b-1)) mean|W|`` per output channel or tensor (a statistic recomputed on
    every forward; the buffer ``alpha`` records the last one), levels ``α (2k - n)/n``: the odd
    integers ``-n … n`` times ``α / n`` (DAQ's weight grid; int8 holds them up to 7 bits).
    Options: ``init`` (``"mse"`` / ``"std"``), ``num_std``.
    """

    name = "n2uq"
    title = "N2UQ"
    max_weight_bits = 7
    symmetric_weights = "weights are always symmetric"
    per_tensor_activations = "N2UQ activations are per tensor"
    convertible_activations = False

    def configure(self, state, init: str = "mse", num_std: float = 3.0) -> None:
        from .checks import check_positive
        from .init import check_init_method

        state.init = check_init_method(init)
        state.num_std = check_positive(num_std, "num_std")

    def create_state(self, state, device=None) -> None:
        from torch import nn

        if state.is_weight:
            state.register_buffer("alpha", torch.ones(1, device=device))
        else:
            state.start = nn.Parameter(torch.zeros(1, device=device))
            state.widths = nn.Parameter(n2uq_init_widths(state.bits).to(device))
            state.output_scale = nn.Parameter(torch.ones(1, device=device))
            state.register_buffer("zero_point", torch.zeros(1, dtype=torch.int64, device=device))

    def resizable(self, state):
        return ("alpha",) if state.is_weight else ()

    def check_state_dict(self, state, state_dict, prefix: str) -> None:
        key = prefix + "widths"
        if not state.is_weight and key in state_dict and state_dict[key].shape != state.widths.shape:
            raise ValueError(f"checkpoint entry '{key}' holds {state_dict[key].numel()} widths, this N2UQ activation"
                             f" quantizer has bits={state.bits} ({state.num_levels} widths): build the model with the"
                             " bit-width the checkpoint was trained with")

    def weight_axis(self, state, w: torch.Tensor) -> Optional[int]:
        return state.ch_axis if state.ch_axis is not None and w.dim() >= 2 else None

    @torch.no_grad()
    def set_alpha(self, state, w: torch.Tensor) -> None:
        alpha = n2uq_weight_alpha(w, state.bits, self.weight_axis(state, w), _INT_EPS).reshape(-1).float()
        state.set_state_tensor("alpha", alpha)

    @torch.no_grad()
    def initialize(self, state, x: torch.Tensor) -> None:
        """Weights record ``α``; activations start as DAQ's first-batch uniform quantizer."""
        from .checks import check_finite

        if state.is_weight:
            self.set_alpha(state, x)
            return
        check_finite(x, f"the first batch of {state.label()}")   # before any state changes
        if state.upper_limit is not None:
            x = x.clamp(max=state.upper_limit)
        signed = state.decide_signed(x)
        start, widths, scale, zero_point = n2uq_init_activation(x, state.bits, signed=signed, method=state.init,
                                                                num_std=state.num_std)
        state.start.data.copy_(start.reshape(1))
        state.widths.data.copy_(widths)
        state.output_scale.data.copy_(scale.reshape(1))
        state.zero_point.copy_(zero_point.reshape(1))

    def forward(self, state, x: torch.Tensor) -> torch.Tensor:
        if state.is_weight:
            self.set_alpha(state, x)
            return n2uq_weight(x, state.bits, self.weight_axis(state, x), _INT_EPS)   # step α/n ≥ eps
        if state.upper_limit is not None:
            x = torch.clamp(x, max=state.upper_limit)
        return n2uq_fake_quantize_activation(x, state.start.reshape(()), state.widths,
                                             state.output_scale.reshape(()), state.zero_point.reshape(()))

    def qparams(self, state):
        """Weights: ``α / n`` (per channel), zero point 0; activations: ``Δ = |scale| 2/n`` and ``zp``."""
        with torch.no_grad():
            if state.is_weight:
                scale = (state.alpha / state.num_levels).float()
                return scale, torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
            step = n2uq_step(state.output_scale, state.bits).float().clamp_min(_INT_EPS)
            return step.reshape(1), state.zero_point.clone()

    def int_range(self, state):
        n = state.num_levels
        return (-n, n) if state.is_weight else (0, n)

    def extra_repr(self, state) -> str:
        if state.is_weight:
            return f"ch_axis={state.ch_axis}"
        text = f"signed={ {-1: 'auto', 0: False, 1: True}[int(state.signed.item())] }, init={state.init!r}"
        if state.upper_limit is not None:
            text += f", upper_limit={state.upper_limit}"
        return text


#: the N2UQ family (one instance)
N2UQ = N2UQFamily()

__all__ += ["N2UQ", "N2UQFamily"]
