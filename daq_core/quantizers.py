"""DAQ quantizer functions built on DASR (DAQ Eqs. 1-3, DAQ-SPEC §1, §3-5).

The central primitive is :func:`daq_fake_quantize`, which fuses normalisation
(Eq. 1), DASR (Eqs. 4-11) and an affine output map into one
``torch.autograd.Function``:

    t = clamp((x - l) / Δ, 0, n),   Δ = (u - l) / n,   n = 2^b - 1        (Eq. 1)
    y = out_offset + out_step * DASR(t)

Its forward is plain rounding (DASR's forward is exact rounding) and its backward
the closed-form gradient (DAQ-SPEC §2), with zero gradient to ``x``, ``l`` and
``u`` through ``t`` for elements clipped outside ``[l, u]``.  Only the input
``x`` (already alive in the autograd graph) is saved for backward; ``t`` and the
gradient factor are recomputed element-wise in backward.

The two quantizers of the paper are affine output maps of it:

* weights (Eq. 2 with the layer scale of Eq. 3 folded in):
  ``w_out = s * (2 DASR(t) - n) / n`` on standardised weights, i.e.
  ``out_offset = -s``, ``out_step = 2 s / n``: the ``2^b`` symmetric levels with no zero.
* activations in natural units: ``a_out = l + Δ DASR(t)``, i.e. ``out_offset = l``,
  ``out_step = Δ``: the ``2^b`` levels of ``[l, u]`` (the paper's ``a_q = DASR(t)/n`` of Eq. 2
  times ``u - l``, plus ``l``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .checks import check_bits, check_bounds, check_floating, check_positive
from .dasr import DEFAULT_ACT_SIGMA, DEFAULT_GAMMA, DEFAULT_WEIGHT_SIGMA, dasr_gradient_constant

__all__ = [
    "daq_fake_quantize",
    "normalize",
    "standardize",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "weight_integers",
    "activation_integers",
    "integer_aligned_lower_bound",
    "init_weight_scale",
    "init_activation_bounds",
    "floor_weight_scale",
    "use_compiled_kernels",
    "compiled_kernels_enabled",
    "num_levels",
    "ROUNDINGS",
    "check_rounding",
]


def num_levels(bits: int) -> int:
    """``n = 2^b - 1``: the largest normalised level (there are ``n + 1 = 2^b`` levels)."""
    return (1 << check_bits(bits)) - 1


# --------------------------------------------------------------------------------------
# Element-wise kernels (eager, optionally compiled with torch.compile)
# --------------------------------------------------------------------------------------

def _forward_kernel(x, lower, step, out_offset, out_step, n: float):
    t = ((x - lower) / step).clamp(0.0, n)
    return out_offset + out_step * torch.round(t)


def _backward_kernel(x, lower, step, out_offset, out_step, grad_y, n: float, constant: float, kernel_term: float):
    """All gradients of the fused quantizer, reductions included (one pass when compiled).

    Returns ``(grad_x, grad_lower, grad_upper, grad_out_offset, grad_out_step)``, the
    parameter gradients summed to the parameters' (broadcast) shapes.
    """
    t_raw = (x - lower) / step
    inside = (t_raw >= 0.0) & (t_raw <= n)
    t = t_raw.clamp(0.0, n)
    q = torch.round(t)
    dq_dt = constant / torch.tanh((kernel_term - 2.0 * (t - q).abs()) * 0.5)   # DAQ-SPEC §2
    g_t = torch.where(inside, grad_y * out_step * dq_dt, 0.0)                   # dL/dt, 0 when clipped
    grad_x = g_t / step                                                          # dt/dx = 1/Δ
    scaled = g_t / (n * step)
    grad_lower = (scaled * (t - n)).sum_to_size(lower.shape)                     # dt/dl = (t - n)/(nΔ)
    grad_upper = (-(scaled * t)).sum_to_size(lower.shape)                        # dt/du = -t/(nΔ)
    grad_offset = grad_y.sum_to_size(out_offset.shape)
    grad_step = (grad_y * q).sum_to_size(out_step.shape)
    return grad_x, grad_lower, grad_upper, grad_offset, grad_step


_KERNELS = {"forward": _forward_kernel, "backward": _backward_kernel, "compiled": False}


def use_compiled_kernels(enabled: bool = True) -> bool:
    """Compile the element-wise DAQ kernels with ``torch.compile`` (falls back to eager).

    Compilation costs tens of seconds on the first call per shape family and makes
    forward+backward about as fast as torch's own fake-quant; eager is the default
    so that tests and short scripts start instantly. Also enabled by the
    environment variable ``DAQ_COMPILE=1``.

    Returns:
        Whether compiled kernels are now in use.
    """
    if not enabled:
        _KERNELS.update(forward=_forward_kernel, backward=_backward_kernel, compiled=False)
        return False
    try:
        fwd = torch.compile(_forward_kernel, dynamic=True)
        bwd = torch.compile(_backward_kernel, dynamic=True)
    except Exception:  # pragma: no cover - depends on the platform's compiler
        return False
    _KERNELS.update(forward=fwd, backward=bwd, compiled=True)
    return True


def compiled_kernels_enabled() -> bool:
    """Whether :func:`use_compiled_kernels` is active."""
    return bool(_KERNELS["compiled"])


if os.environ.get("DAQ_COMPILE", "0") == "1":  # pragma: no cover
    use_compiled_kernels(True)


#: Tensors smaller than this (weights, tiny activations) always take the eager kernels:
#: compiling them costs more than it saves.
COMPILE_MIN_NUMEL = 1 << 16


def _run(kind: str, x: torch.Tensor, *args):
    eager = _forward_kernel if kind == "forward" else _backward_kernel
    if _KERNELS["compiled"] and x.numel() >= COMPILE_MIN_NUMEL:
        # n, gamma and sigma stay python floats: specialised, one compilation per
        # combination (a handful per model), which lets inductor vectorise the kernel (~5x).
        # Tensors are passed detached (the fused Function does the autograd): dynamo guards on
        # requires_grad, and the same quantizer is called with and without it (training step,
        # no_grad first batch / eval), which otherwise compiles every kernel twice and ran into
        # dynamo's recompile limit (8) on mobilenetv2, leaving later calls eager.
        try:
            return _KERNELS[kind](x.detach(), *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        except Exception:  # pragma: no cover - compiler missing or failing: stay correct, go eager
            use_compiled_kernels(False)
    return eager(x, *args)


# --------------------------------------------------------------------------------------
# The fused autograd Function
# --------------------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


#: sentinel ``gamma`` selecting the straight-through gradient in the fused Function
_STE_GAMMA = float("inf")


class _DAQFakeQuantize(torch.autograd.Function):
    """Normalise (Eq. 1) → DASR (Eqs. 4-11) → ``out_offset + out_step * Q``; closed-form backward."""

    @staticmethod
    def forward(ctx, x, lower, upper, out_offset, out_step, n: int, gamma: float, sigma: float):
        cdt = _compute_dtype(x)
        xc = x.to(cdt)
        lower_c, upper_c = lower.to(cdt), upper.to(cdt)
        step = (upper_c - lower_c) / n
        y = _run("forward", xc, lower_c, step, out_offset.to(cdt), out_step.to(cdt), float(n))
        # x is already alive in the autograd graph; the rest are per-tensor/per-channel parameters
        ctx.save_for_backward(x, lower, upper, out_offset, out_step)
        if gamma == _STE_GAMMA:   # the straight-through ablation: dQ/dt = 1 / tanh(large) = 1
            ctx.n, ctx.constant, ctx.kernel_term = n, 1.0, sigma
        else:
            ctx.n, ctx.constant, ctx.kernel_term = n, dasr_gradient_constant(gamma), 1.0 + 1.0 / sigma**2
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, lower, upper, out_offset, out_step = ctx.saved_tensors
        cdt = _compute_dtype(x)
        lower_c, out_offset_c, out_step_c = lower.to(cdt), out_offset.to(cdt), out_step.to(cdt)
        step = (upper.to(cdt) - lower_c) / ctx.n
        grads = _run("backward", x.to(cdt), lower_c, step, out_offset_c, out_step_c, grad_y.to(cdt),
                     float(ctx.n), ctx.constant, ctx.kernel_term)
        targets = (x, lower, upper, out_offset, out_step)
        out = [g.to(ref.dtype) if need else None for g, ref, need in zip(grads, targets, ctx.needs_input_grad)]
        return (*out, None, None, None)


def _as_param_tensor(value, x: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_floating(value, name)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a floating tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=_compute_dtype(x), device=x.device)


def _broadcast_channel(p: torch.Tensor, x: torch.Tensor, ch_axis: Optional[int], name: str) -> torch.Tensor:
    """Shape a per-tensor (numel 1) or per-channel (numel C) parameter to broadcast against ``x``."""
    if p.numel() == 1:
        return p.reshape([1] * x.dim()) if x.dim() else p.reshape(())
    if ch_axis is None:
        raise ValueError(f"{name} has {p.numel()} elements but ch_axis is None: pass ch_axis for per-channel"
                         f" quantization or a single value for per-tensor")
    axis = ch_axis % x.dim()
    if p.numel() != x.shape[axis]:
        raise ValueError(f"{name} has {p.numel()} elements but x has {x.shape[axis]} channels along"
                         f" ch_axis={ch_axis}; use one value per channel")
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


#: Rounding rules of :func:`daq_fake_quantize`: DAQ's DASR, and the paper's ablations (Tables 6-7).
ROUNDINGS = ("dasr", "ste", "soft")

#: ``1 + 1/σ²`` large enough that ``tanh((k - 2|t - q|)/2) == 1`` in float32: the STE's ``dQ/dt = 1``.
_STE_KERNEL_TERM = 1.0e4


def check_rounding(rounding: str, beta: Optional[float] = None) -> str:
    """Validate a ``rounding`` / ``beta`` pair (see :func:`daq_fake_quantize`)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
    if rounding == "soft":
        if beta is None:
            raise ValueError("rounding='soft' needs a fixed temperature: pass beta (the paper's ablation uses 4 and 24)")
        check_positive(beta, "beta")
    elif beta is not None:
        raise ValueError(f"beta applies to rounding='soft' only (got rounding={rounding!r}); drop beta")
    return rounding


def daq_fake_quantize(x: torch.Tensor, lower, upper, bits: int, out_offset, out_step,
                      gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_WEIGHT_SIGMA,
                      ch_axis: Optional[int] = None, rounding: str = "dasr",
                      beta: Optional[float] = None) -> torch.Tensor:
    """``out_offset + out_step * DASR(clamp((x - l)/Δ, 0, n))`` with the closed-form gradient.

    Implements Eq. 1 (normalisation, zero gradient outside ``[l, u]``) and
    Eqs. 4-11 (DASR with the adaptive temperature) in one autograd Function;
    the affine output map lets the same primitive produce the weight grid (Eq. 2)
    and natural-unit activations.

    Args:
        x: floating input (float32/float16/bfloat16; computed in float32 for half types).
        lower, upper: bounds ``l < u`` of Eq. 1, scalars or per-channel tensors along ``ch_axis``.
        bits: bit-width ``b`` in 1..8 (``2^b`` levels).
        out_offset, out_step: the output map; scalars or per-channel like the bounds.
        gamma, sigma: DASR hyperparameters (Eq. 7 and the Gaussian kernel).
        ch_axis: the channel axis of ``x`` for per-channel parameters.
        rounding: ``"dasr"`` (DAQ, default); the paper's ablations: ``"ste"`` (the same
            forward, gradient ``dQ/dt = 1``: DAQ with a straight-through estimator) and
            ``"soft"`` (kernel soft argmax ``φ(t; β)`` of Eq. 5 with the *fixed* temperature
            ``beta`` and no rescaling: its forward is not rounding — the quantizer gap; use
            ``"dasr"`` or ``"ste"`` at test time, which round).
        beta: the fixed temperature of ``rounding="soft"``.

    Returns:
        Tensor like ``x``. Gradients flow to ``x``, ``lower``, ``upper``,
        ``out_offset`` and ``out_step``.
    """
    check_floating(x, "x")
    n = num_levels(bits)
    gamma = check_positive(gamma, "gamma")
    sigma = check_positive(sigma, "sigma")
    lower = _broadcast_channel(_as_param_tensor(lower, x, "lower"), x, ch_axis, "lower")
    upper = _broadcast_channel(_as_param_tensor(upper, x, "upper"), x, ch_axis, "upper")
    check_bounds(lower, upper)
    out_offset = _broadcast_channel(_as_param_tensor(out_offset, x, "out_offset"), x, ch_axis, "out_offset")
    out_step = _broadcast_channel(_as_param_tensor(out_step, x, "out_step"), x, ch_axis, "out_step")
    check_rounding(rounding, beta)
    if rounding == "soft":
        from .dasr import soft_assignment   # the term-by-term Eq. 5 with a fixed β, by autograd

        t = normalize(x, lower, upper, bits, ch_axis)
        return (out_offset + out_step * soft_assignment(t, gamma, sigma, beta=beta)).to(x.dtype)
    if rounding == "ste":
        return _DAQFakeQuantize.apply(x, lower, upper, out_offset, out_step, n, _STE_GAMMA, _STE_KERNEL_TERM)
    return _DAQFakeQuantize.apply(x, lower, upper, out_offset, out_step, n, gamma, sigma)


def normalize(x: torch.Tensor, lower, upper, bits: int, ch_axis: Optional[int] = None) -> torch.Tensor:
    """Eq. 1: ``t = clamp((x - l) / Δ, 0, n)``, ``Δ = (u - l)/n``; zero gradient outside ``[l, u]``.

    Differentiable by autograd (for analysis and tests; the quantizers use the fused path).

    Example:
        >>> normalize(torch.tensor([-1.0, 0.5, 2.0]), 0.0, 1.0, bits=2).tolist()
        [0.0, 1.5, 3.0]
    """
    check_floating(x, "x")
    n = num_levels(bits)
    lower = _broadcast_channel(_as_param_tensor(lower, x, "lower"), x, ch_axis, "lower")
    upper = _broadcast_channel(_as_param_tensor(upper, x, "upper"), x, ch_axis, "upper")
    check_bounds(lower, upper)
    t = (x - lower) * n / (upper - lower)
    inside = (t >= 0) & (t <= n)
    return torch.where(inside, t, t.detach().clamp(0, n))


# --------------------------------------------------------------------------------------
# Weights (DAQ-SPEC §3, Eq. 2) and activations (§4)
# --------------------------------------------------------------------------------------

def _reduce_dims(x: torch.Tensor, ch_axis: Optional[int]):
    if ch_axis is None or x.dim() == 0:
        return None
    axis = ch_axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def standardize(w: torch.Tensor, ch_axis: Optional[int] = None, eps: float = 1e-12
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ŵ = (W - mean(W)) / std(W)`` with mean/std treated as constants (DAQ-SPEC §3).

    Over the whole tensor (the paper) or per output channel (``ch_axis``). ``std`` is the
    unbiased one, computed exactly as the authors' reference does (``DAQ-REFERENCE.md``:
    ``(W - W.mean()) / W.std()``): a 1-bit layer trained by DAQ has many weights within float
    error of the threshold ``(l + u)/2`` (e.g. 2,422 of 36,864 within 1e-3 in their W1A32
    ``layer3.block_2.0.conv2``), so any other way of computing ``ŵ`` — the biased std with
    rescaled bounds, another reduction order — flips some of them. A constant tensor (std 0), or a
    single element, standardises to zeros instead of NaN.

    Returns:
        ``(w_hat, mean, std)``; ``mean`` and ``std`` are detached and broadcast against ``w``.
    """
    check_floating(w, "w")
    dims = _reduce_dims(w, ch_axis)
    with torch.no_grad():
        wc = w.detach().to(_compute_dtype(w))
        count = wc.numel() if dims is None else wc.numel() // max(wc.shape[ch_axis % wc.dim()], 1)
        if dims is None:
            mean = wc.mean()
            std = wc.std() if count > 1 else torch.zeros((), dtype=wc.dtype, device=wc.device)
        else:
            mean = wc.mean(dim=dims, keepdim=True)
            std = wc.std(dim=dims, keepdim=True) if count > 1 else torch.zeros_like(mean)
        std = std.clamp_min(eps)
    w_hat = (w.to(mean.dtype) - mean) / std
    return w_hat.to(w.dtype), mean, std


def fake_quantize_weight(w: torch.Tensor, lower, upper, scale, bits: int,
                         gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_WEIGHT_SIGMA,
                         ch_axis: Optional[int] = None, standardize_input: bool = True,
                         rounding: str = "dasr", beta: Optional[float] = None) -> torch.Tensor:
    """DAQ weight quantizer: ``s * w_q`` with ``w_q = (2 DASR(t) - n) / n`` (Eqs. 1-3).

    ``t`` normalises the standardised weight (DAQ-SPEC §3) with learned bounds
    ``l, u`` (init -3, 3); ``w_q`` takes the ``2^b`` symmetric levels of ``[-1, 1]``
    with no zero (b = 1: ±1; b = 2: ±1/3, ±1); ``s`` is the learned output scale
    (Eq. 3 folded into the weight). Bounds and scale may be per output channel.

    Returns:
        ``s * w_q``, in the weight's dtype; its integers are ``2 DASR(t) - n`` (odd,
        ``|k| <= n``) with quantization step ``s / n`` and zero point 0.

    Example:
        >>> w = torch.tensor([-2.0, -0.1, 0.1, 2.0])
        >>> fake_quantize_weight(w, -3.0, 3.0, 1.0, bits=1).tolist()
        [-1.0, -1.0, 1.0, 1.0]
    """
    check_floating(w, "w")
    n = num_levels(bits)
    w_hat = standardize(w, ch_axis)[0] if standardize_input else w
    scale = _as_param_tensor(scale, w, "scale")
    return daq_fake_quantize(w_hat, lower, upper, bits, -scale, scale * (2.0 / n), gamma, sigma, ch_axis,
                             rounding=rounding, beta=beta)


def fake_quantize_activation(x: torch.Tensor, lower, upper, bits: int,
                             gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_ACT_SIGMA,
                             ch_axis: Optional[int] = None, rounding: str = "dasr",
                             beta: Optional[float] = None) -> torch.Tensor:
    """DAQ activation quantizer in natural units: ``l + Δ DASR(t)`` (Eqs. 1-2, DAQ-SPEC §4).

    The ``2^b`` levels of ``[l, u]``. Besides DASR's gradient through ``t``, the
    bounds receive the gradient of the output range (``∂y/∂u = DASR(t)/n``), which
    in the paper's normalised units (``a_q = DASR(t)/n``) the layer scale ``s`` of
    Eq. 3 carries instead.

    Example:
        >>> fake_quantize_activation(torch.tensor([-1.0, 0.4, 0.6, 9.0]), 0.0, 3.0, bits=2).tolist()
        [0.0, 0.0, 1.0, 3.0]
    """
    check_floating(x, "x")
    n = num_levels(bits)
    lower = _as_param_tensor(lower, x, "lower")
    upper = _as_param_tensor(upper, x, "upper")
    return daq_fake_quantize(x, lower, upper, bits, lower, (upper - lower) / n, gamma, sigma, ch_axis,
                             rounding=rounding, beta=beta)


def floor_weight_scale(scale: torch.Tensor, bits: int, min_step: float) -> torch.Tensor:
    """The output scale ``s`` with the weight grid's step ``|s| / n`` floored at ``min_step``.

    The weight levels are ``s (2 DASR(t) - n) / n``: odd integers times the step ``|s| / n``.
    An integer backend stores that step as the weight's (per-channel) quantization scale and
    may not accept an arbitrarily small one (torch.ao: its observers' ``eps``, float32 eps).
    A channel whose BatchNorm γ is about zero (a "dead" channel of a trained network) has a
    folded weight, and so an ``s``, far below that; reporting the floored step while the
    forward used the true one put the int weights off the odd grid (``round(k · step / floor)``).
    Using the floored ``s`` in the forward too keeps both on one grid: such a channel's levels
    become ``±min_step, ±3 min_step, …`` instead of ``±step, ±3 step, …``, a change of at most
    ``n · min_step`` per weight.

    Where the floor applies the value is ``±n · min_step`` (the sign of ``s`` kept, ``+`` for 0)
    and the gradient passes straight through to ``s``, so the scale can still grow back above
    the floor during training; elsewhere ``s`` is returned unchanged.
    """
    check_floating(scale, "scale")
    floor = num_levels(bits) * check_positive(min_step, "min_step")
    small = scale.detach().abs() < floor      # no host sync: per-channel tensors, every forward
    floored = torch.where(scale.detach() < 0, -floor, floor).to(scale.dtype)
    return torch.where(small, floored + (scale - scale.detach()), scale)


def weight_integers(w: torch.Tensor, lower, upper, bits: int, ch_axis: Optional[int] = None,
                    standardize_input: bool = True) -> torch.Tensor:
    """The integer codes ``2 round(t) - n`` of the DAQ weight grid (odd, within ``±(2^b - 1)``)."""
    with torch.no_grad():
        n = num_levels(bits)
        w_hat = standardize(w, ch_axis)[0] if standardize_input else w
        q = daq_fake_quantize(w_hat.float(), lower, upper, bits, 0.0, 1.0, ch_axis=ch_axis)
        return (2 * q - n).round().to(torch.int32)


def activation_integers(x: torch.Tensor, lower, upper, bits: int, ch_axis: Optional[int] = None) -> torch.Tensor:
    """The integer codes ``round(t)`` in ``[0, n]`` of the activation grid."""
    with torch.no_grad():
        q = daq_fake_quantize(x.float(), lower, upper, bits, 0.0, 1.0, ch_axis=ch_axis)
        return q.round().to(torch.int32)


def integer_aligned_lower_bound(lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """Nudge ``l`` to ``-round(-l/Δ) Δ`` so that the zero point ``-l/Δ`` is an integer.

    Integer backends need an integer activation zero point. The nudge is applied
    straight-through (the gradient of ``l`` is unchanged); ``Δ`` is kept, so the
    caller should use ``u' = l' + nΔ`` as the matching upper bound.
    """
    n = num_levels(bits)
    step = (upper - lower) / n
    nudged = -torch.round(-lower / step) * step
    return lower + (nudged - lower).detach()


def init_weight_scale(w: torch.Tensor, lower, upper, bits: int, ch_axis: Optional[int] = None) -> torch.Tensor:
    """Least-squares output scale ``s = <W, w_q> / <w_q, w_q>`` (per tensor or channel).

    The weight-only form of the layer-output matching of DAQ-SPEC §5: it makes
    ``s w_q`` the closest point of the scaled grid to ``W``, so a freshly
    initialised quantized layer reproduces the float layer's output magnitude.
    """
    with torch.no_grad():
        wq = fake_quantize_weight(w.float(), lower, upper, 1.0, bits, ch_axis=ch_axis)
        wf = w.float()
        dims = _reduce_dims(w, ch_axis)
        if dims is None:
            num, den = (wf * wq).sum(), (wq * wq).sum()
        else:
            num, den = (wf * wq).sum(dim=dims), (wq * wq).sum(dim=dims)
        scale = num / den.clamp_min(1e-12)
        # a channel whose weights are all zero or anti-aligned keeps a small positive scale
        fallback = wf.abs().amax() if dims is None else wf.abs().amax(dim=dims)
        scale = torch.where(scale > 0, scale, fallback.clamp_min(1e-8))
        return scale


def init_activation_bounds(x: torch.Tensor, signed: bool, num_std: float = 3.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """First-batch bounds (DAQ-SPEC §4): ``(0, 3 std)`` after ReLU-like inputs, else ``(-3σ, 3σ)``.

    The standard deviation is floored at 1e-6 so that an all-zero batch still yields ``l < u``.
    """
    check_floating(x, "x")
    num_std = check_positive(num_std, "num_std")
    with torch.no_grad():
        xf = x.detach().float()
        std = xf.std(unbiased=False) if xf.numel() > 1 else xf.abs().reshape(())
        std = std.clamp_min(1e-6)
        if signed:
            return -num_std * std, num_std * std
        return torch.zeros((), dtype=torch.float32, device=x.device), num_std * std
