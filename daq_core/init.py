"""First-batch initialisation of DAQ quantizers (DAQ-SPEC §3-5), shared by both plugins.

The paper initialises weight bounds to ``±3`` on the standardised weight, activation bounds to
3 standard deviations of the first batch, and the layer scale ``s`` (Eq. 3) by matching
output magnitudes. Measured here (``docs/fx.md``): on BN-folded, per-channel 4-bit grids those
fixed bounds start far from the float model, so the default ``method="mse"`` picks, among a few
candidates that include the paper's, the bounds with the least squared quantization error on the
first batch (per output channel for weights), and the least-squares output scale for them.
``method="std"`` is the paper's rule exactly.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch

from .checks import check_bits, check_finite, check_floating, check_positive
from .quantizers import fake_quantize_activation, fake_quantize_weight

__all__ = [
    "MIN_ACTIVATION_RANGE",
    "DAQInitWarning",
    "widen_degenerate_range",
    "WEIGHT_BOUND_CANDIDATES",
    "normalize_weight",
    "fit_weight_scale",
    "init_weight_quantizer",
    "init_activation_quantizer",
    "check_init_method",
    "output_scale_correction",
]

#: Bounds ``±c`` on the normalised weight tried by the "mse" initialisation (3 is the paper's).
WEIGHT_BOUND_CANDIDATES: Tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
#: Fractions of the first batch's range tried for activation bounds by the "mse" initialisation.
ACTIVATION_RANGE_FRACTIONS: Tuple[float, ...] = tuple(torch.linspace(0.1, 1.0, 19).tolist())
#: Activation batches larger than this are subsampled (deterministically) for the search.
MAX_INIT_SAMPLES = 1 << 18
#: Narrowest first-batch activation interval ``u - l`` (natural units). The bounds are learned
#: parameters: Adam (DAQ-SPEC §6: lr 1e-4) moves each by about its learning rate per step,
#: whatever the activations' scale, so an interval of ~1e-7 (seen: ConvNeXt's layer scale,
#: initialised at 1e-6, times its branch) is crossed by the first step and every later forward
#: fails (``lower must be < upper``). Ten such steps wide: the bounds can move and stay ordered.
MIN_ACTIVATION_RANGE = 1e-3


class DAQInitWarning(UserWarning):
    """A quantizer's first-batch initialisation had to be adjusted (the message names the quantizer)."""


@torch.no_grad()
def widen_degenerate_range(lower: torch.Tensor, upper: torch.Tensor, min_range: float = MIN_ACTIVATION_RANGE
                           ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Scale ``(l, u)`` about 0 so that ``u - l >= min_range``; returns ``(l, u, widened)``.

    Scaling keeps ``l = 0`` (unsigned) and the relative position of 0 in a signed interval
    (so the integer zero point is the same). Values inside the old interval are far below the
    new step; they quantize to (about) zero, as they contribute (about) nothing in float.
    """
    check_positive(min_range, "min_range")
    width = upper - lower
    if bool(width >= min_range):
        return lower, upper, False
    factor = min_range / width.clamp_min(torch.finfo(torch.float32).tiny)
    if not bool(torch.isfinite(factor)):
        return torch.zeros_like(lower), torch.full_like(upper, min_range), True
    return lower * factor, upper * factor, True


def check_init_method(method) -> str:
    if method not in ("mse", "std"):
        raise ValueError(f"init must be 'mse' (least-error bounds, default) or 'std' (the paper's ±3 std),"
                         f" got {method!r}")
    return method


def _other_dims(x: torch.Tensor, ch_axis: Optional[int]):
    if ch_axis is None or x.dim() == 0:
        return list(range(x.dim()))
    axis = ch_axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def normalize_weight(w: torch.Tensor, ch_axis: Optional[int] = None, center: bool = True) -> torch.Tensor:
    """The input of Eq. 1 for weights, statistics held constant for autograd.

    ``center=True``: ``(W - mean W) / std W`` (DAQ-SPEC §3, the paper). ``center=False``:
    ``W / rms(W)``, which keeps the grid symmetric about zero instead of about the mean; with
    per-channel BN-folded weights whose means are not zero this lets the zero-free grid sit
    symmetric around 0, which the int backend's symmetric weight quantization needs anyway.
    Per output channel when ``ch_axis`` is given.
    """
    check_floating(w, "w")
    if center:
        from .quantizers import standardize
        return standardize(w, ch_axis)[0]
    with torch.no_grad():
        rms = w.detach().float().pow(2).mean(dim=_other_dims(w, ch_axis), keepdim=True).sqrt().clamp_min(1e-12)
    return w / rms.to(w.dtype)


def _shaped(p: torch.Tensor, w: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    if ch_axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * w.dim()
    shape[ch_axis % w.dim()] = -1
    return p.reshape(shape)


@torch.no_grad()
def fit_weight_scale(w: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                     ch_axis: Optional[int] = None, center: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares output scale ``s = <W, w_q>/<w_q, w_q>`` and the squared error left.

    The weight-only form of the layer-output matching of DAQ-SPEC §5 (Eq. 3 folded into the
    weight). ``lower``/``upper`` have one value per channel (or one). Returns ``(scale, error)``
    with one value per channel (shape ``(C,)``) or scalars for per-tensor.
    """
    wf = w.detach().float()
    axis = ch_axis if lower.numel() > 1 else None
    lo, hi = lower.reshape(-1) if axis is not None else lower.reshape(()), upper.reshape(-1) if axis is not None \
        else upper.reshape(())
    grid = fake_quantize_weight(normalize_weight(wf, axis, center), lo, hi, 1.0, bits, ch_axis=axis,
                                standardize_input=False)
    dims = _other_dims(wf, axis)
    scale = (wf * grid).sum(dim=dims) / (grid * grid).sum(dim=dims).clamp_min(1e-12)
    # a channel of zeros (or anti-aligned) keeps a small positive scale
    scale = torch.where(scale > 0, scale, wf.abs().amax().clamp_min(1e-8))
    error = ((wf - _shaped(scale, wf, axis) * grid) ** 2).sum(dim=dims)
    return scale, error


@torch.no_grad()
def init_weight_quantizer(w: torch.Tensor, bits: int, ch_axis: Optional[int] = None, center: bool = True,
                          method: str = "mse", init_bound: float = 3.0,
                          candidates: Sequence[float] = WEIGHT_BOUND_CANDIDATES, name: Optional[str] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-batch ``(lower, upper, scale)`` of a DAQ weight quantizer (DAQ-SPEC §3, §5).

    ``method="std"``: ``l, u = ∓init_bound`` (paper: 3). ``"mse"``: per channel, the bound among
    ``init_bound`` and ``candidates`` with the least squared error of ``s · w_q`` against ``W``.
    The scale is the least-squares :func:`fit_weight_scale` in both cases. A weight holding NaN
    or Inf is refused (``ValueError`` naming ``name``).

    Returns:
        Three float32 tensors of shape ``(C,)`` (per channel) or ``(1,)`` (per tensor).
    """
    check_finite(w, f"the weight of {name or 'a DAQ weight quantizer'}")
    check_bits(bits)
    method = check_init_method(method)
    init_bound = check_positive(init_bound, "init_bound")
    channels = 1 if ch_axis is None else w.shape[ch_axis]
    bound = torch.full((channels,), init_bound, device=w.device)
    scale, best = fit_weight_scale(w, -bound, bound, bits, ch_axis, center)
    if method == "mse":
        for c in candidates:
            cand = torch.full_like(bound, float(c))
            cand_scale, error = fit_weight_scale(w, -cand, cand, bits, ch_axis, center)
            better = error < best
            bound = torch.where(better, cand, bound)
            scale = torch.where(better, cand_scale, scale)
            best = torch.where(better, error, best)
    return -bound, bound.clone(), scale.reshape(channels).float()


@torch.no_grad()
def init_activation_quantizer(x: torch.Tensor, bits: int, signed: bool, method: str = "mse",
                              num_std: float = 3.0, name: Optional[str] = None,
                              min_range: float = MIN_ACTIVATION_RANGE) -> Tuple[torch.Tensor, torch.Tensor]:
    """First-batch activation bounds ``(l, u)`` (DAQ-SPEC §4), 0-dim float32 tensors.

    ``method="std"``: ``(0, num_std·std)`` unsigned, ``±num_std·std`` signed (the paper).
    ``"mse"``: among those and the batch range scaled by 0.1 … 1 (``l = 0`` unsigned), the
    bounds that quantize the batch with the least squared error. Batches over
    ``MAX_INIT_SAMPLES`` elements are subsampled with an even stride (deterministic; the global
    RNG is not touched, so seeded runs stay reproducible).

    A batch holding NaN or Inf is refused (``ValueError``) before anything is computed. Bounds
    narrower than ``min_range`` (:data:`MIN_ACTIVATION_RANGE`) are widened to it
    (:func:`widen_degenerate_range`) with a :class:`DAQInitWarning` naming ``name``.
    """
    label = name or "a DAQ activation quantizer"
    check_finite(x, f"the first batch of {label}")
    check_bits(bits)
    method = check_init_method(method)
    lower, upper = _activation_bounds(x, bits, signed, method, num_std)
    wide_lower, wide_upper, widened = widen_degenerate_range(lower, upper, min_range)
    if widened:
        warnings.warn(f"{label}: first-batch bounds [{lower.item():.3g}, {upper.item():.3g}] are narrower than"
                      f" MIN_ACTIVATION_RANGE={min_range:g} (e.g. a layer scale initialised at 1e-6): widened to"
                      f" [{wide_lower.item():.3g}, {wide_upper.item():.3g}], or the first optimizer step of the"
                      " learned bounds would cross them", DAQInitWarning, stacklevel=3)
    return wide_lower.reshape(()).float(), wide_upper.reshape(()).float()


def _activation_bounds(x: torch.Tensor, bits: int, signed: bool, method: str, num_std: float):
    """The bounds of :func:`init_activation_quantizer` before the minimum-range check."""
    from .quantizers import init_activation_bounds
    lower, upper = init_activation_bounds(x, signed=signed, num_std=num_std)
    if method == "std":
        return lower.reshape(()), upper.reshape(())
    xf = x.detach().float().flatten()
    if xf.numel() > MAX_INIT_SAMPLES:   # an evenly strided subsample: deterministic, no RNG consumed
        xf = xf[:: -(-xf.numel() // MAX_INIT_SAMPLES)]
    lo = xf.min().clamp(max=-1e-6) if signed else torch.zeros((), device=xf.device)
    hi = xf.max().clamp(min=1e-6)
    candidates = [(lower.reshape(()), upper.reshape(()))] + [(lo * c, hi * c) for c in ACTIVATION_RANGE_FRACTIONS]
    best, best_error = candidates[0], None
    for lo_c, hi_c in candidates:
        if not bool(hi_c > lo_c):
            continue
        error = (fake_quantize_activation(xf, lo_c, hi_c, bits) - xf).pow(2).mean()
        if best_error is None or error < best_error:
            best, best_error = (lo_c, hi_c), error
    return best[0].reshape(()).float(), best[1].reshape(()).float()


def output_scale_correction(reference: torch.Tensor, quantized: torch.Tensor, ch_axis: int = 1,
                            max_ratio: float = 4.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(ratio, offset)`` with ``ratio · quantized + offset ≈ reference`` (least squares).

    The data-driven form of the layer output scale's initialisation (DAQ-SPEC §5, Eq. 3: the
    paper sets ``s = mean|conv(x, W)| / mean|conv(a_q, w_q)|`` on the first batch), per output
    channel and in least squares: ``reference = conv(x, W)`` is the float layer on float inputs,
    ``quantized = conv(a_q, w_q)`` the quantized layer on its quantized inputs. Multiplying the
    weight quantizer's output scale ``s`` by ``ratio`` and adding ``offset`` to the layer's bias
    (bias correction) removes the systematic part of the quantization error that per-weight
    rounding cannot see. At 2 bits this is what keeps a pretrained network from falling to chance
    right after prepare.

    Args:
        reference, quantized: layer outputs of the same shape (e.g. ``N×C×H×W``).
        ch_axis: the channel axis (1 for conv/linear outputs).
        max_ratio: ``ratio`` is clamped to ``[1/max_ratio, max_ratio]`` (a channel that is all
            zero after quantization keeps its scale).

    Returns:
        ``(ratio, offset)``, each of shape ``(C,)``, float32.
    """
    check_floating(reference, "reference")
    check_floating(quantized, "quantized")
    if reference.shape != quantized.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and quantized {tuple(quantized.shape)} must have the"
                         " same shape (the same layer on the same batch)")
    check_positive(max_ratio, "max_ratio")
    dims = _other_dims(reference, ch_axis)
    ref, q = reference.detach().float(), quantized.detach().float()
    ref_c = ref - ref.mean(dim=dims, keepdim=True)
    q_c = q - q.mean(dim=dims, keepdim=True)
    energy = q_c.pow(2).sum(dim=dims)
    ratio = torch.where(energy > 0, (ref_c * q_c).sum(dim=dims) / energy.clamp_min(1e-30), torch.ones_like(energy))
    ratio = ratio.clamp(1.0 / max_ratio, max_ratio)
    offset = ref.mean(dim=dims) - ratio * q.mean(dim=dims)
    return ratio.reshape(-1), offset.reshape(-1)
