"""CPQ: Cluster-Promoting Quantization with DropBits (Lee et al., ICCV 2021) — reconstructed from the abstract.

Only the paper's abstract is available and no public code exists; this module implements the
concrete design of ``CPQ-SPEC.md`` (grid, logistic bin probabilities, multi-class STE, DropBits,
hard-concrete bit gates), which follows Relaxed Quantization (Louizos et al., ICLR 2019) where the
paper's equations are unknown. Results are "CPQ (reconstructed from the abstract)"; the design
choices are listed in ``docs/cpq.md``.

Notation (CPQ-SPEC §1-6), ``b`` the configured (largest) bit-width:

* grid ``g_k = α k``, ``k ∈ K_b``: weights signed ``{-2^(b-1), …, 2^(b-1) - 1}``, activations
  unsigned ``{0, …, 2^b - 1}`` (signed inputs, e.g. a network input, get the signed grid);
* bin probabilities of ``x + ε``, ``ε`` logistic of scale ``σ``, ``S`` the logistic sigmoid::

      π_k(x) = S((g_k + α/2 - x)/σ) - S((g_k - α/2 - x)/σ)      edge bins open

* forward: the argmax of ``π`` — the nearest grid point — computed as
  ``α clamp(round(x/α), k_min, k_max)`` exactly;
* backward (multi-class STE, ``∂h/∂π := I``): the gradient of ``Σ_{k∈W} g_k π^W_k(x)`` over the
  window ``W`` of the ``±m`` grid points around the chosen one (default ``m = 3``), ``π^W`` the bin
  probabilities restricted to the window with its two edge bins open (renormalised over ``W``, as
  DropBits renormalises over a coarser grid), in closed form per element (``2m`` logistic terms;
  no ``2^b``-wide tensor);
* DropBits (training): each element drops its ``d`` least significant bits, ``d ∈ {0, …, b-1}``,
  nested (dropping bit ``j`` drops every lower bit); with ``d`` bits dropped the grid is the
  ``(b-d)``-bit grid of step ``2^d α`` (the points ``k ≡ 0 mod 2^d``) and ``π`` is the bin mass
  over that coarser grid (renormalised: it sums to 1), so the forward is the nearest point of the
  coarser grid and the STE runs over it;
* learned bit-widths: per droppable bit ``j`` a hard-concrete keep gate ``z_j`` (Louizos et al.,
  ICLR 2018; temperature 2/3, stretch (-0.1, 1.1)) whose ``P(z_j > 0)`` is the keep rate of bit ``j``
  in training (the per-element Bernoulli draw is the noise); regulariser
  ``λ Σ_layers size_l Σ_j P(z_j > 0)``; bit ``j`` is kept iff ``P(z_j > 0) >= 0.5`` and the
  bit-width is ``b - d`` with ``d`` the nested drop count.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .checks import MAX_BITS, check_bits, check_finite, check_floating, check_positive
from .family import ACTIVATION, SIGNED, UNSIGNED, WEIGHT, FamilyStateMixin, QuantizerFamily, family_modules

__all__ = [
    "CPQ",
    "CPQFamily",
    "DEFAULT_DROP_RATE",
    "DEFAULT_WINDOW",
    "DEFAULT_RELATIVE_SIGMA",
    "cpq_grid",
    "cpq_fake_quantize",
    "cpq_quantize",
    "bin_probabilities",
    "expected_value",
    "sample_drop_bits",
    "nested_keep",
    "hard_concrete_sample",
    "keep_probability",
    "drop_bits_from_gates",
    "init_step",
    "BitBudget",
    "bit_regularizer",
    "average_bits",
]

#: fixed-bit mode: the drop rate ``p_j`` of every droppable bit (CPQ-SPEC §5)
DEFAULT_DROP_RATE = 0.1
#: learned bit-widths: the fewest bits a layer may learn, per role (``min_bits``). Weights stop at 2: the
#: signed 1-bit grid ``{-1, 0}`` (CPQ-SPEC §1) has no positive weight, and a learned W4A4 ResNet-20 whose
#: last conv fell to it predicted one class. Activations may reach the unsigned 1-bit grid ``{0, 1}``.
DEFAULT_MIN_LEARNED_BITS = {"weight": 2, "activation": 1}
#: the multi-class STE's window: grid points within ``±m`` of the chosen one (CPQ-SPEC §4)
DEFAULT_WINDOW = 3
#: the logistic noise scale at initialisation, in steps: ``σ = 0.5 α`` gives a gradient of about 1
#: everywhere between grid points (the sum of the bins' logistic slopes); smaller σ sharpens it
DEFAULT_RELATIVE_SIGMA = 0.5
#: hard-concrete distribution (Louizos, Welling, Kingma 2018): temperature and stretch interval
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
_HC_SHIFT = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)
#: range of the regulariser weight λ under a target (BitBudget)
MIN_LAMBDA, MAX_LAMBDA = 1e-4, 1e4
#: initial gate logits rise by this much per bit (LSB lowest): see CPQFamily.create_state
GATE_LOGIT_STEP = 0.5
#: a fixed (hardened) gate's logit, ``±HARD_GATE_LOGIT``: ``P(z > 0)`` is then exactly 1 or 0 in float32
#: (the sigmoid saturates / underflows), so the training forward is the read-out's (:func:`fix_bit_widths`)
HARD_GATE_LOGIT = 1.0e4
#: the smallest step the forward uses (float32 eps, as the int backends' observers)
MIN_STEP = float(torch.finfo(torch.float32).eps)


def cpq_grid(bits: int, signed: bool) -> Tuple[int, int]:
    """``(k_min, k_max)`` of ``K_b``: signed ``(-2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``."""
    bits = check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# --------------------------------------------------------------------------------------
# element-wise kernels (eager; compiled with torch.compile when daq_core.use_compiled_kernels is on)
# --------------------------------------------------------------------------------------

def _coarse(step, d, k_min: float, k_max: float):
    """Step and integer range of the grid with ``d`` low bits dropped: ``2^d α``, ``K_{b-d}``."""
    p = torch.exp2(d)
    return step * p, k_min / p, torch.floor((k_max + 1.0) / p) - 1.0, p


def _forward_kernel(x, step, d, k_min: float, k_max: float):
    s, lo, hi, _ = _coarse(step, d, k_min, k_max)
    return torch.clamp(torch.round(x / s), lo, hi) * s


def _sampled_forward_kernel(x, step, keep, k_min: float, k_max: float, droppable: int):
    """Draw the nested drop count per element (one uniform each: ``d = #{D : u >= K_{D-1}}``), then quantize."""
    u = torch.rand_like(x)
    d = torch.zeros_like(x)
    for j in range(droppable):
        d = d + (u >= keep[j]).to(x.dtype)
    return _forward_kernel(x, step, d, k_min, k_max), d.to(torch.uint8)


def _hashed_uniform(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers (24 bits) from an integer hash of the element index and ``seed``.

    The compiled path's random source: inductor fuses these integer ops into the quantizer's kernel,
    while its CPU ``rand_like`` runs ~6x slower than eager torch.rand_like (measured, 8x32x56x56).
    """
    h = (torch.arange(x.numel(), device=x.device, dtype=torch.int64).reshape(x.shape) * 2654435761 + seed)
    h = h & 0xFFFFFFFF
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).to(x.dtype) * (1.0 / 16777216.0)


def _hashed_forward_kernel(x, step, keep, seed, k_min: float, k_max: float, droppable: int):
    """:func:`_sampled_forward_kernel` with the hashed uniforms (compiled path)."""
    u = _hashed_uniform(x, seed)
    d = torch.zeros_like(x)
    for j in range(droppable):
        d = d + (u >= keep[j]).to(x.dtype)
    return _forward_kernel(x, step, d, k_min, k_max), d.to(torch.uint8)


def _backward_kernel(x, step, sigma, d, grad_y, k_min: float, k_max: float, window: int):
    """Gradients of ``Σ_{k∈W} g_k π^W_k(x)``: the window's bins, its two edge bins open (renormalised).

    By parts, ``Σ_{k=a}^{c} g_k π^W_k = s (c - Σ_{k=a}^{c-1} F(k+½))`` with ``F(t) = S((t s - x)/σ)``
    and ``s`` the (coarse) step: the ``2m`` bin boundaries nearest to the chosen point, one logistic
    each. With ``d`` bits dropped the noise scale is the coarse grid's, ``σ_d = 2^d σ`` (σ is measured
    in steps, of the grid in use): the slopes then sum to about 1 between grid points at every ``d``.
    (With the fine σ the gradient became a comb of spikes ``2^(d-1)`` high at the coarse boundaries and
    ~0 between them; learned bit-widths, which train 8-bit layers at ``d`` up to 6, exploded the weights.)
    Returns ``(grad_x, grad_step, grad_sigma)``, the parameter gradients summed to their shapes.
    """
    sigma_shape = sigma.shape
    s, lo, hi, p = _coarse(step, d, k_min, k_max)
    sigma = sigma * p
    k = torch.clamp(torch.round(x / s), lo, hi)
    a = torch.maximum(lo, k - window)
    c = torch.minimum(hi, k + window)
    g = c
    dg_x = torch.zeros_like(x)
    dg_s = torch.zeros_like(x)
    dg_sigma = torch.zeros_like(x)
    # the boundaries lie ρ = s/σ apart: the logistic of each one from a single exp per side,
    # e^{-z} above the element (≤ 1 inside the range) and e^{z} below it, times r = e^{-ρ} per boundary
    r = torch.exp(-(s / sigma))
    sides = ((range(0, window), torch.exp(-torch.clamp(((k + 0.5) * s - x) / sigma, min=-80.0)), True),
             (range(-1, -window - 1, -1), torch.exp(torch.clamp(((k - 0.5) * s - x) / sigma, max=80.0)), False))
    for offsets, e, above in sides:
        for i in offsets:
            q = k + i                               # the boundary q + ½ between points q and q + 1
            inside = ((q >= a) & (q < c)).to(x.dtype)
            t = q + 0.5
            sig = 1.0 / (1.0 + e) if above else e / (1.0 + e)      # S((t s - x)/σ)
            slope = inside * sig * (1.0 - sig) / sigma
            g = g - inside * sig
            dg_x = dg_x + slope
            dg_s = dg_s - slope * t
            dg_sigma = dg_sigma + slope * (t * s - x) / sigma
            e = e * r
    grad_x = grad_y * s * dg_x
    grad_step = (grad_y * (g + s * dg_s) * p).sum_to_size(step.shape)
    grad_sigma = (grad_y * s * dg_sigma * p).sum_to_size(sigma_shape)
    return grad_x, grad_step, grad_sigma


def _keep_gradient(x, step, grad_y, k_min: float, k_max: float, droppable: int):
    """``∂/∂K_D`` of ``E[y] = q_{b-1} + Σ_D K_D (q_D - q_{D+1})``: ``Σ grad_y (q_D - q_{D+1})`` per D."""
    out = []
    finer = _forward_kernel(x, step, torch.zeros((), dtype=x.dtype, device=x.device), k_min, k_max)
    for j in range(droppable):
        coarser = _forward_kernel(x, step, torch.full((), j + 1.0, dtype=x.dtype, device=x.device), k_min, k_max)
        out.append((grad_y * (finer - coarser)).sum())
        finer = coarser
    return torch.stack(out)


_COMPILED: Dict[str, object] = {}


def _kernel(name: str, eager, x: torch.Tensor):
    from .quantizers import COMPILE_MIN_NUMEL, compiled_kernels_enabled

    if not compiled_kernels_enabled() or x.numel() < COMPILE_MIN_NUMEL:
        return eager
    fn = _COMPILED.get(name)
    if fn is None:
        try:
            fn = torch.compile(eager, dynamic=True)
        except Exception:  # pragma: no cover - no compiler: stay eager
            fn = eager
        _COMPILED[name] = fn
    return fn


def _call(name: str, eager, x: torch.Tensor, *args):
    fn = _kernel(name, eager, x)
    if fn is eager:
        return eager(x, *args)
    try:  # tensors detached: the Function does the autograd (see daq_core.quantizers._run)
        return fn(x.detach(), *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    except Exception:  # pragma: no cover - compiler failing: stay correct
        _COMPILED[name] = eager
        return eager(x, *args)


# --------------------------------------------------------------------------------------
# the fused autograd Function
# --------------------------------------------------------------------------------------

class _CPQFakeQuantize(torch.autograd.Function):
    """Forward: the nearest point of the (per-element coarse) grid; backward: the windowed multi-class STE."""

    @staticmethod
    def forward(ctx, x, step, sigma, keep, drop_bits, k_min: int, k_max: int, window: int):
        if keep is not None:
            if _kernel("hashed_forward", _hashed_forward_kernel, x) is not _hashed_forward_kernel:
                seed = torch.randint(0, 1 << 31, (), dtype=torch.int64).to(x.device)   # from torch's generator
                y, d = _call("hashed_forward", _hashed_forward_kernel, x, step, keep, seed, float(k_min),
                             float(k_max), keep.numel())
            else:
                y, d = _sampled_forward_kernel(x, step, keep, float(k_min), float(k_max), keep.numel())
        else:
            d = drop_bits
            y = _call("forward", _forward_kernel, x, step, d.to(x.dtype), float(k_min), float(k_max))
        ctx.save_for_backward(x, step, sigma, d, keep)
        ctx.grid = (float(k_min), float(k_max), int(window))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, step, sigma, d, keep = ctx.saved_tensors
        k_min, k_max, window = ctx.grid
        grad_x, grad_step, grad_sigma = _call("backward", _backward_kernel, x, step, sigma, d.to(x.dtype), grad_y,
                                              k_min, k_max, window)
        grad_keep = None
        if keep is not None and ctx.needs_input_grad[3]:
            grad_keep = _keep_gradient(x.detach(), step.detach(), grad_y, k_min, k_max, keep.numel()).to(keep.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_step if ctx.needs_input_grad[1] else None,
                grad_sigma if ctx.needs_input_grad[2] else None, grad_keep, None, None, None, None)


def _shaped(p, x: torch.Tensor, ch_axis: Optional[int], name: str) -> torch.Tensor:
    if not isinstance(p, torch.Tensor):
        p = torch.tensor(float(p), dtype=x.dtype, device=x.device)
    check_floating(p, name)
    if p.numel() == 1:
        return p.reshape([1] * x.dim())
    if ch_axis is None or p.numel() != x.shape[ch_axis % x.dim()]:
        raise ValueError(f"{name} has {p.numel()} values: pass one value, or one per channel along ch_axis"
                         f" (got ch_axis={ch_axis} for a tensor of shape {tuple(x.shape)})")
    shape = [1] * x.dim()
    shape[ch_axis % x.dim()] = -1
    return p.reshape(shape)


def cpq_fake_quantize(x: torch.Tensor, step, sigma, bits: int, signed: bool = True, ch_axis: Optional[int] = None,
                      keep: Optional[torch.Tensor] = None, drop_bits: int = 0,
                      window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """The CPQ quantizer (CPQ-SPEC §1-5): ``α' clamp(round(x/α'), K_{b-d})`` with ``α' = 2^d α``.

    Args:
        x: floating input.
        step: ``α > 0``, one value or one per channel along ``ch_axis``.
        sigma: the logistic noise scale ``σ > 0`` of the bin probabilities (like ``step``), used by
            the backward only.
        bits: ``b``, 1..8.
        signed: the signed grid (weights, signed inputs) or the unsigned one (after ReLU).
        ch_axis: the channel axis of per-channel ``step`` / ``sigma``.
        keep: DropBits (training): ``K_D``, ``D = 0 … b-2``, the probability that every bit from
            ``D`` up is kept (non-decreasing in ``D``; :func:`nested_keep`); each element draws its
            drop count ``d`` from it. Differentiable: its gradient is that of the expected output.
        drop_bits: without ``keep``: drop the ``d`` lowest bits of every element (the eval forward
            at a learned bit-width ``b - d``); 0 is the plain ``b``-bit grid.
        window: ``m`` of the multi-class STE.

    Returns:
        Tensor like ``x`` on the grid. Gradients reach ``x``, ``step``, ``sigma`` and ``keep``.

    Example:
        >>> cpq_fake_quantize(torch.tensor([-3.0, -0.4, 0.6, 9.0]), 1.0, 0.5, bits=2).tolist()
        [-2.0, -0.0, 1.0, 1.0]
    """
    check_floating(x, "x")
    bits = check_bits(bits)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer (grid points each side of the chosen one), got {window!r}")
    k_min, k_max = cpq_grid(bits, signed)
    step = _shaped(step, x, ch_axis, "step")
    sigma = _shaped(sigma, x, ch_axis, "sigma")
    if keep is not None:
        check_floating(keep, "keep")
        if not 1 <= keep.numel() <= bits - 1 and bits > 1:
            raise ValueError(f"keep holds {keep.numel()} probabilities; a {bits}-bit grid has 1 to {bits - 1} droppable"
                             f" bits (the lowest ones)")
        if bits == 1:
            keep = None
    if keep is None:
        if isinstance(drop_bits, bool) or not isinstance(drop_bits, int) or not 0 <= drop_bits < bits:
            raise ValueError(f"drop_bits must be an integer in [0, {bits - 1}], got {drop_bits!r}")
        d = torch.full((), drop_bits, dtype=torch.uint8, device=x.device)
        return _CPQFakeQuantize.apply(x, step, sigma, None, d, k_min, k_max, window)
    return _CPQFakeQuantize.apply(x, step, sigma, keep.reshape(-1), None, k_min, k_max, window)


def cpq_quantize(x: torch.Tensor, step, bits: int, signed: bool = True, ch_axis: Optional[int] = None,
                 drop_bits: int = 0) -> torch.Tensor:
    """The forward alone (no autograd): ``α' clamp(round(x/α'), K_{b-d})``."""
    k_min, k_max = cpq_grid(bits, signed)
    step = _shaped(step, x, ch_axis, "step")
    d = torch.full((), float(drop_bits), dtype=x.dtype, device=x.device)
    return _forward_kernel(x, step, d, float(k_min), float(k_max))


# --------------------------------------------------------------------------------------
# the probabilistic parametrisation itself (reference forms, for tests and analysis)
# --------------------------------------------------------------------------------------

def bin_probabilities(x: torch.Tensor, step, sigma, points: torch.Tensor, k_min, k_max) -> torch.Tensor:
    """``π_k(x)`` (CPQ-SPEC §2) for the integer ``points`` (last dim), edge bins of ``[k_min, k_max]`` open.

    ``k_min`` / ``k_max`` may be tensors broadcasting against ``points`` (a window per element).

    Differentiable by autograd; ``x`` gets a trailing dimension of ``points.shape[-1]``.
    """
    xk = x.unsqueeze(-1)
    upper = torch.sigmoid(((points + 0.5) * step - xk) / sigma)
    lower = torch.sigmoid(((points - 0.5) * step - xk) / sigma)
    upper = torch.where(points >= k_max, torch.ones_like(upper), upper)
    lower = torch.where(points <= k_min, torch.zeros_like(lower), lower)
    return upper - lower


def expected_value(x: torch.Tensor, step, sigma, bits: int, signed: bool = True,
                   window: Optional[int] = DEFAULT_WINDOW) -> torch.Tensor:
    """``Σ_{k∈W} g_k π^W_k(x)``: ``W`` the ``±window`` points around the chosen one (``None``: the whole grid).

    ``π^W`` are the bin probabilities of :func:`bin_probabilities` over ``W`` with the window's edge
    bins open (they sum to 1 over ``W``). Its gradient is the multi-class STE of
    :func:`cpq_fake_quantize` (for tests; materialises ``2 window + 1`` or ``2^b`` values per element).
    """
    k_min, k_max = cpq_grid(bits, signed)
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(float(step), dtype=x.dtype)
    if window is None:
        points = torch.arange(k_min, k_max + 1, dtype=x.dtype, device=x.device)
        valid = torch.ones_like(points, dtype=torch.bool)
        lo, hi = k_min, k_max
    else:
        k = torch.clamp(torch.round(x.detach() / step.detach()), k_min, k_max).unsqueeze(-1)
        points = k + torch.arange(-window, window + 1, dtype=x.dtype, device=x.device)
        valid = (points >= k_min) & (points <= k_max)
        lo, hi = torch.clamp(k - window, min=k_min), torch.clamp(k + window, max=k_max)
    pi = bin_probabilities(x, step, sigma, points, lo, hi)
    return torch.where(valid, points * step * pi, torch.zeros_like(pi)).sum(-1)


# --------------------------------------------------------------------------------------
# DropBits and the hard-concrete keep gates (CPQ-SPEC §5-6)
# --------------------------------------------------------------------------------------

def nested_keep(keep_rates: torch.Tensor) -> torch.Tensor:
    """``K_D = Π_{j >= D} z_j``: the probability that no bit from ``D`` up is dropped (bit ``j`` dropped
    with probability ``1 - z_j``; dropping bit ``j`` drops every lower bit)."""
    return torch.flip(torch.cumprod(torch.flip(keep_rates, [0]), 0), [0])


def sample_drop_bits(shape, keep: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-element nested drop counts ``d`` drawn from ``K`` (:func:`nested_keep`), as int64."""
    u = torch.rand(shape, generator=generator, device=keep.device)
    return (u.unsqueeze(-1) >= keep.reshape(-1)).sum(-1)


def keep_probability(gate_logits: torch.Tensor) -> torch.Tensor:
    """``P(z_j > 0)`` of the hard-concrete gates: ``sigmoid(log α_j - β log(-γ/ζ))``."""
    return torch.sigmoid(gate_logits - _HC_SHIFT)


def hard_concrete_sample(gate_logits: torch.Tensor, training: bool = True) -> torch.Tensor:
    """A hard-concrete sample ``z ∈ [0, 1]`` per gate (reparametrised: differentiable in the logits).

    In eval (``training=False``) the gate's deterministic value ``clamp(S(log α)(ζ - γ) + γ, 0, 1)``.
    """
    if training:
        u = torch.rand_like(gate_logits).clamp(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + gate_logits) / HC_BETA)
    else:
        s = torch.sigmoid(gate_logits)
    return torch.clamp(s * (HC_ZETA - HC_GAMMA) + HC_GAMMA, 0.0, 1.0)


def gate_logits_for(keep_rate: float) -> float:
    """The gate logit ``log α`` with ``P(z > 0) = keep_rate``."""
    keep_rate = min(max(float(keep_rate), 1e-4), 1.0 - 1e-4)
    return math.log(keep_rate / (1.0 - keep_rate)) + _HC_SHIFT


def drop_bits_from_gates(gate_logits: torch.Tensor) -> int:
    """The nested drop count of the read-out: ``1 + max{j : P(z_j > 0) < 0.5}``, 0 when every bit is kept."""
    dropped = (keep_probability(gate_logits.detach()) < 0.5).nonzero()
    return 0 if dropped.numel() == 0 else int(dropped.max().item()) + 1


def gates_fixed(gate_logits: torch.Tensor) -> bool:
    """True when every gate is fixed at keep or drop (``|log α| >= HARD_GATE_LOGIT``: :func:`fix_bit_widths`)."""
    return bool((gate_logits.detach().abs() >= HARD_GATE_LOGIT).all())


def expected_bits(bits: int, keep_probs: torch.Tensor) -> torch.Tensor:
    """``b - E[d]`` with bit ``j`` kept with probability ``keep_probs[j]`` (nested drops)."""
    if keep_probs.numel() == 0:
        return torch.tensor(float(bits))
    return (bits - keep_probs.numel()) + nested_keep(keep_probs).sum()


# --------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------

@torch.no_grad()
def init_step(x: torch.Tensor, bits: int, signed: bool, ch_axis: Optional[int] = None,
              fractions: Iterable[float] = tuple(i / 20 for i in range(4, 21))) -> torch.Tensor:
    """The step ``α`` with the least squared quantization error among ``f · max|x| / k_top``.

    ``k_top`` is ``2^(b-1)`` (signed) or ``2^b - 1`` (unsigned); ``f`` runs over ``fractions`` of the
    range (clipping the tails often pays at low bit-widths). Per channel along ``ch_axis``.

    Returns:
        ``(C,)`` per channel, else ``(1,)``; float32, at least :data:`MIN_STEP`.
    """
    xf = x.detach().float()
    k_min, k_max = cpq_grid(bits, signed)
    top = max(-k_min, k_max)
    if ch_axis is None or xf.dim() == 0:
        flat = xf.reshape(1, -1)
    else:
        flat = xf.movedim(ch_axis % xf.dim(), 0).reshape(xf.shape[ch_axis % xf.dim()], -1)
    peak = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    best_err = best = None
    for f in fractions:
        step = peak * f / top
        err = ((torch.clamp(torch.round(flat / step), k_min, k_max) * step - flat) ** 2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = step, err
        else:
            better = err < best_err
            best = torch.where(better, step, best)
            best_err = torch.where(better, err, best_err)
    return best.reshape(-1).clamp_min(MIN_STEP)


# --------------------------------------------------------------------------------------
# the family declaration
# --------------------------------------------------------------------------------------

class CPQFamily(QuantizerFamily):
    """CPQ as a :class:`daq_core.family.QuantizerFamily` (state: ``step``, ``log_sigma``, gates).

    Options (set on the hosting module):
        learn_bits: learn the bit-width with hard-concrete keep gates (``gate_logits``, one per
            droppable bit) instead of fixed drop rates.
        drop_rate: DropBits's fixed ``p_j`` (fixed-bit mode; 0 turns DropBits off), and the gates'
            initial drop probability with ``learn_bits``.
        window: ``m`` of the multi-class STE.
        init_sigma: ``σ / α`` at initialisation.
        min_bits: learned bit-widths: the fewest bits the read-out may reach (None: 2 for weights,
            1 for activations, :data:`DEFAULT_MIN_LEARNED_BITS`); one gate per droppable bit above it.

    State: ``log_step`` (``log α``; ``(1,)`` or per channel), ``log_sigma`` (``log(σ/α)``, per tensor: σ is
    measured in steps so that per-channel steps share it), ``gate_logits`` (``(b - min_bits,)``, learned
    bit-widths only) and the buffer ``size`` (the weight count, or the activation's elements per
    sample: the regulariser's ``size_l``).
    """

    name = "cpq"
    title = "CPQ"
    max_weight_bits = MAX_BITS          # signed b-bit codes: int8 holds 8-bit CPQ weights
    symmetric_weights = "weights always use the signed grid (CPQ-SPEC §1)"
    learns_bits = True

    def configure(self, state, learn_bits: bool = False, drop_rate: float = DEFAULT_DROP_RATE,
                  window: int = DEFAULT_WINDOW, init_sigma: float = DEFAULT_RELATIVE_SIGMA,
                  min_bits: Optional[int] = None) -> None:
        if not isinstance(learn_bits, bool):
            raise TypeError(f"learn_bits must be True or False, got {learn_bits!r}")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be a number in [0, 1) (DropBits's per-bit drop probability), got {drop_rate!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if min_bits is not None and (isinstance(min_bits, bool) or not isinstance(min_bits, int)
                                     or not 1 <= min_bits <= state.bits):
            raise ValueError(f"min_bits must be an integer in [1, bits={state.bits}] (the fewest bits a learned"
                             f" bit-width may reach), got {min_bits!r}")
        state.learn_bits = learn_bits
        state.min_bits = min(state.bits, min_bits if min_bits is not None else DEFAULT_MIN_LEARNED_BITS[state.role])
        state.drop_rate = float(drop_rate)
        state.window = window
        state.init_sigma = check_positive(init_sigma, "init_sigma")

    def create_state(self, state, device=None) -> None:
        from torch import nn

        # the step in log space: Adam's lr is then a relative change (weight steps are ~1e-2 in weight
        # units; lr 1e-3 on α itself moved them by ~5% a step and a 1-epoch ResNet-20 QAT fell 81 -> 58%)
        state.log_step = nn.Parameter(torch.zeros(1, device=device))
        state.log_sigma = nn.Parameter(torch.full((1,), math.log(state.init_sigma), device=device))
        if state.learn_bits and state.bits > state.min_bits:
            # ordered gates: the LSB's keep probability is 1 - drop_rate, each higher bit's logit GATE_LOGIT_STEP
            # above, so the regulariser removes bits from the bottom one at a time (equal gates would all cross
            # the threshold together and the nested read-out would fall from b bits to 1 at once)
            logit = gate_logits_for(1.0 - (state.drop_rate or DEFAULT_DROP_RATE))
            # one gate per droppable bit: bits 0 .. b - min_bits - 1 (the read-out never goes below min_bits)
            logits = logit + GATE_LOGIT_STEP * torch.arange(state.bits - state.min_bits, dtype=torch.float32)
            state.gate_logits = nn.Parameter(logits.to(device))
        state.register_buffer("size", torch.ones(1, device=device))

    def resizable(self, state) -> Tuple[str, ...]:
        return ("log_step",)

    def check_state_dict(self, state, state_dict, prefix: str) -> None:
        key = prefix + "gate_logits"
        own = getattr(state, "gate_logits", None)
        if key in state_dict and (own is None or own.shape != state_dict[key].shape):
            raise ValueError(f"checkpoint entry '{key}' holds {state_dict[key].numel()} bit gates, this CPQ quantizer"
                             f" has bits={state.bits}, learn_bits={state.learn_bits}: build the model with the"
                             " settings the checkpoint was trained with")

    # ------------------------------------------------------------------ helpers
    def signed(self, state) -> bool:
        return state.is_weight or not state.is_unsigned

    def channel_axis(self, state, x: torch.Tensor) -> Optional[int]:
        return state.ch_axis if state.is_weight and state.log_step.numel() > 1 else None

    def effective_step(self, state) -> torch.Tensor:
        return torch.exp(state.log_step).clamp_min(MIN_STEP)

    def drop_bits(self, state) -> int:
        """The eval forward's drop count: the gates' read-out (0 in fixed-bit mode)."""
        gates = getattr(state, "gate_logits", None)
        return 0 if gates is None else drop_bits_from_gates(gates)

    def keep(self, state) -> Optional[torch.Tensor]:
        """DropBits's ``K_D`` for this training step (None: no bits dropped)."""
        if state.bits == 1:
            return None
        gates = getattr(state, "gate_logits", None)
        if gates is not None:
            if gates_fixed(gates):
                return None     # bit-widths fixed (fix_bit_widths): train at the read-out, no random drops
            # bit j is dropped with probability 1 - P(z_j > 0): the rate the regulariser and the read-out
            # use. (Using a hard-concrete *sample* z_j as the keep rate dropped far more: the samples lie
            # mostly inside (0, 1), and at the initial 8-bit gates 73% of the elements lost >= 1 bit and
            # 3.5% all seven; the learned W4A4 row fell to chance. The per-element Bernoulli draw is
            # the noise; the gates get the gradient of the expected output through P(z_j > 0).)
            return nested_keep(keep_probability(gates))
        if state.drop_rate == 0.0:
            return None
        rates = torch.full((state.bits - 1,), 1.0 - state.drop_rate, device=state.log_step.device)
        return nested_keep(rates)

    def keep_probabilities(self, state) -> torch.Tensor:
        gates = getattr(state, "gate_logits", None)
        if gates is None:
            return torch.ones(state.bits - 1, device=state.log_step.device)
        return keep_probability(gates)

    # ------------------------------------------------------------------ family interface
    @torch.no_grad()
    def initialize(self, state, x: torch.Tensor) -> None:
        check_finite(x, f"the first batch of {state.label()}")
        if state.is_weight:
            axis = state.ch_axis if state.ch_axis is not None and x.dim() > 1 and x.shape[state.ch_axis] > 1 else None
            state.set_state_tensor("log_step", init_step(x, state.bits, True, axis).log())
            state.size.fill_(float(x.numel()))
        else:
            if state.upper_limit is not None:
                x = x.clamp(max=state.upper_limit)
            signed = state.decide_signed(x)
            state.set_state_tensor("log_step", init_step(x, state.bits, signed).log())
            state.size.fill_(float(x[0].numel() if x.dim() > 1 else x.numel()))

    def forward(self, state, x: torch.Tensor) -> torch.Tensor:
        if not state.is_weight and state.upper_limit is not None:
            x = torch.clamp(x, max=state.upper_limit)
        step = self.effective_step(state)
        sigma = step * torch.exp(state.log_sigma)
        axis = self.channel_axis(state, x)
        signed = self.signed(state)
        if state.training:
            keep = self.keep(state)
            if keep is not None:
                return cpq_fake_quantize(x, step, sigma, state.bits, signed, axis, keep=keep, window=state.window)
        return cpq_fake_quantize(x, step, sigma, state.bits, signed, axis, drop_bits=self.drop_bits(state),
                                 window=state.window)

    def bit_width(self, state) -> int:
        return state.bits - self.drop_bits(state)

    def int_range(self, state) -> Tuple[int, int]:
        bits = self.bit_width(state)
        if state.is_weight:
            return cpq_grid(bits, True)
        return 0, (1 << bits) - 1            # quint8 codes; signed grids shift by the zero point

    def qparams(self, state) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            scale = (self.effective_step(state).detach() * float(1 << self.drop_bits(state))).float().reshape(-1)
            if state.is_weight or state.is_unsigned:
                zero_point = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
            else:
                zero_point = torch.full(scale.shape, 1 << (self.bit_width(state) - 1), dtype=torch.int64,
                                        device=scale.device)
            return scale, zero_point

    def extra_repr(self, state) -> str:
        text = f"learn_bits={state.learn_bits}"
        if state.learn_bits:
            text += f", bit_width={self.bit_width(state)}"
        else:
            text += f", drop_rate={state.drop_rate}"
        return text + f", window={state.window}"


#: the CPQ family (one instance; adapters compare by identity)
CPQ = CPQFamily()


# --------------------------------------------------------------------------------------
# learned bit-widths: the regulariser, the λ controller, the read-out
# --------------------------------------------------------------------------------------

def _cpq_states(model) -> Dict[str, FamilyStateMixin]:
    return {name: m for name, m in family_modules(model).items() if m.family.name == CPQ.name}


def _role_states(model, role: str) -> List[FamilyStateMixin]:
    return [m for m in _cpq_states(model).values() if m.role == role and getattr(m, "gate_logits", None) is not None
            and bool(m.initialized[0])]


def bit_regularizer(model, strength) -> torch.Tensor:
    """``λ Σ_l (size_l / Σ size) Σ_j P(z_j > 0)`` per role (CPQ-SPEC §6; sizes normalised per role).

    ``strength``: ``λ``, a number, or ``{"weight": λ_w, "activation": λ_a}``.
    """
    total = None
    for role in (WEIGHT, ACTIVATION):
        lam = strength.get(role, 0.0) if isinstance(strength, dict) else strength
        states = _role_states(model, role)
        if not states or not lam:
            continue
        sizes = torch.stack([m.size.reshape(()) for m in states])
        weights = sizes / sizes.sum()
        term = sum(w * keep_probability(m.gate_logits).sum() for w, m in zip(weights, states))
        total = lam * term if total is None else total + lam * term
    if total is None:
        return torch.zeros(())
    return total


@torch.no_grad()
def fix_bit_widths(model) -> Dict[str, int]:
    """End the bit-width search: fix every CPQ quantizer at its read-out bit-width (CPQ-SPEC §6).

    Each gate becomes ``±HARD_GATE_LOGIT`` (kept iff ``P(z_j > 0) >= 0.5``, nested as the read-out):
    ``P(z > 0)`` is then exactly 1 or 0, DropBits draws nothing, and the training forward equals the
    eval forward at the learned bit-width, so training can go on at the mixed bit-widths the search
    chose. (While the gates still learn, the gates nearest to the threshold keep ``P(z > 0)`` near
    0.5 and drop that bit on about half the elements of every step; see docs/cpq.md.) The gates'
    gradients vanish (the sigmoid saturates). Idempotent; returns ``{quantizer name: bit-width}``.

    Example:
        >>> fixed = fix_bit_widths(model)    # after BitBudget.project(model)   # doctest: +SKIP
    """
    out = {}
    for name, m in _cpq_states(model).items():
        gates = getattr(m, "gate_logits", None)
        if gates is None:
            continue
        d = CPQ.drop_bits(m)
        gates[:d] = -HARD_GATE_LOGIT
        gates[d:] = HARD_GATE_LOGIT
        out[name] = m.bits - d
    return out


def bit_widths_fixed(model) -> bool:
    """True when the model has learned-bit CPQ quantizers and all are fixed (:func:`fix_bit_widths`)."""
    gates = [m.gate_logits for m in _cpq_states(model).values() if getattr(m, "gate_logits", None) is not None]
    return bool(gates) and all(gates_fixed(g) for g in gates)


@torch.no_grad()
def average_bits(model, role: str, expected: bool = False) -> Optional[float]:
    """The size-weighted average bit-width of the role's CPQ quantizers (read-out, or expected)."""
    states = [m for m in _cpq_states(model).values() if m.role == role and bool(m.initialized[0])]
    if not states:
        return None
    num = den = 0.0
    for m in states:
        size = float(m.size.item())
        if expected:
            b = float(expected_bits(m.bits, CPQ.keep_probabilities(m)))
        else:
            b = float(m.bit_width)
        num += size * b
        den += size
    return num / den


class BitBudget:
    """Learned bit-widths towards a target average: the regulariser with ``λ`` adjusted per step.

    ``λ`` starts at ``strength`` for each role and, for a role with a target, is adjusted after every
    step on the size-weighted read-out average (CPQ-SPEC §6: "a target average bit-width is reached
    by adjusting λ"), as the multiplier of the constraint ``avg = target``: its sign is that of
    ``avg - target`` (0 within ``deadband`` bits: hold), its magnitude grows by
    ``exp(rate · |avg - target|)`` per step while the sign stays and halves when it flips (from at
    least ``MIN_LAMBDA``, at most ``MAX_LAMBDA``: the task loss's pull on the gates grows with the layer
    sizes, so ``λ`` must move over orders of magnitude within a short run). A negative ``λ`` pulls
    dropped bits back when training overshot. :meth:`project` then
    closes what training left, where it left more than ``tolerance`` (a design choice of this
    reconstruction, see docs/cpq.md): it flips the gates nearest to the keep/drop threshold, one bit
    of one layer at a time, until the average is at most the target but not below it by more than
    one layer's share.

    Args:
        strength: the initial ``λ`` (``--bit-regularization``), >= 0.
        target_weight_bits, target_act_bits: targets in [1, 8] or None (``λ`` stays fixed).
        rate: the dual step size.

    Example:
        >>> budget = BitBudget(1e-2, target_weight_bits=3.0)
        >>> # every step: (task_loss + budget.penalty(model)).backward(); optimizer.step(); budget.update(model)
        >>> # after training: budget.project(model)
    """

    def __init__(self, strength: float = 0.0, target_weight_bits: Optional[float] = None,
                 target_act_bits: Optional[float] = None, rate: float = 0.2, deadband: float = 0.125):
        strength = check_regularization(strength)
        self.targets = {WEIGHT: check_target_bits(target_weight_bits, "target weight bits"),
                        ACTIVATION: check_target_bits(target_act_bits, "target activation bits")}
        self.strength = {WEIGHT: strength, ACTIVATION: strength}
        self.magnitude = {WEIGHT: max(strength, MIN_LAMBDA), ACTIVATION: max(strength, MIN_LAMBDA)}
        self.rate = check_positive(rate, "rate")
        self.deadband = float(deadband)

    def penalty(self, model) -> torch.Tensor:
        return bit_regularizer(model, self.strength)

    @torch.no_grad()
    def update(self, model) -> Dict[str, float]:
        for role, target in self.targets.items():
            if target is None:
                continue
            avg = average_bits(model, role)
            if avg is None:
                continue
            err = avg - target
            direction = 0.0 if abs(err) <= self.deadband else math.copysign(1.0, err)
            previous = math.copysign(1.0, self.strength[role]) if self.strength[role] else 0.0
            if direction and direction == previous:
                self.magnitude[role] = min(self.magnitude[role] * math.exp(self.rate * abs(err)), MAX_LAMBDA)
            elif direction and previous:
                self.magnitude[role] = max(self.magnitude[role] * 0.5, MIN_LAMBDA)
            self.strength[role] = direction * self.magnitude[role]
        return dict(self.strength)

    @torch.no_grad()
    def project(self, model, tolerance: float = 0.25) -> Dict[str, int]:
        """Flip the gates nearest to the threshold until each role's read-out average meets its target.

        A role whose average is within ``tolerance`` bits of its target is left as training left it.
        Returns the number of bits flipped per role (0 where training met the target).
        """
        flipped = {WEIGHT: 0, ACTIVATION: 0}
        for role, target in self.targets.items():
            states = _role_states(model, role)
            if target is None or not states or abs(average_bits(model, role) - target) <= tolerance:
                continue
            for _ in range(sum(m.bits for m in states)):
                avg = average_bits(model, role)
                if avg > target:
                    # drop the next bit of the layer whose lowest kept gate is the least sure
                    cands = [(float(keep_probability(m.gate_logits[CPQ.drop_bits(m)])), m)
                             for m in states if CPQ.drop_bits(m) < m.gate_logits.numel()]
                    if not cands:
                        break
                    _, m = min(cands, key=lambda c: c[0])
                    m.gate_logits[CPQ.drop_bits(m)] = gate_logits_for(0.45)
                    flipped[role] += 1
                    continue
                # restore a bit while that keeps the average at or below the target
                cands = [(float(keep_probability(m.gate_logits[CPQ.drop_bits(m) - 1])), m)
                         for m in states if CPQ.drop_bits(m) > 0]
                total = sum(float(m.size) for m in states)
                cands = [(p, m) for p, m in cands if avg + float(m.size) / total <= target + 1e-9]
                if not cands:
                    break
                _, m = max(cands, key=lambda c: c[0])
                d = CPQ.drop_bits(m)
                m.gate_logits[d - 1] = max(float(m.gate_logits[d - 1]), gate_logits_for(0.55))
                if d >= 2:   # nested: the bit below stays dropped, so exactly one bit comes back
                    m.gate_logits[d - 2] = min(float(m.gate_logits[d - 2]), gate_logits_for(0.45))
                flipped[role] += 1
        return flipped

    def state_dict(self) -> Dict:
        return {"strength": dict(self.strength), "magnitude": dict(self.magnitude), "targets": dict(self.targets),
                "rate": self.rate}

    def load_state_dict(self, state: Dict) -> None:
        self.strength.update(state["strength"])
        self.magnitude.update(state.get("magnitude", {}))


def check_regularization(value) -> float:
    """The regulariser weight ``λ``: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"the bit-width regularizer weight must be a finite number >= 0, got {value!r}")
    return float(value)


def check_target_bits(value, name: str = "target bits") -> Optional[float]:
    """A target average bit-width in [1, 8] (or None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number in [1, 8], got {value!r}")
    if not 1.0 <= float(value) <= MAX_BITS:
        raise ValueError(f"{name}={value} is out of range: a target average bit-width must lie in [1, {MAX_BITS}]")
    return float(value)


__all__ += ["check_regularization", "check_target_bits", "expected_bits", "gate_logits_for", "MIN_STEP", "step_of",
            "fix_bit_widths", "bit_widths_fixed", "gates_fixed", "HARD_GATE_LOGIT"]


def step_of(state) -> torch.Tensor:
    """The step ``α`` a CPQ quantizer state uses (``exp(log_step)``, floored at :data:`MIN_STEP`)."""
    return CPQ.effective_step(state)
