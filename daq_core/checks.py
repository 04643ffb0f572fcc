"""Argument validation shared by the core and both plugins.

Every check raises ``ValueError`` or ``TypeError`` whose message names the
argument and says what to do, so that a bad configuration fails where the
user wrote it and not deep inside torch.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

#: Bit-widths the numerical core supports (weights and activations).
MIN_BITS = 1
MAX_BITS = 8
#: DAQ weights are odd integers in ``[-(2^b - 1), 2^b - 1]``; int8 holds them up to 7 bits.
MAX_INT8_WEIGHT_BITS = 7


def check_bits(bits, name: str = "bits", max_bits: int = MAX_BITS) -> int:
    """Return ``bits`` as an int in ``[1, max_bits]`` or raise a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, (int, torch.Tensor)) and not (
        isinstance(bits, float) and float(bits).is_integer()
    ):
        raise TypeError(f"{name} must be an integer bit-width in [{MIN_BITS}, {max_bits}], got {bits!r}")
    if isinstance(bits, torch.Tensor):
        if bits.numel() != 1:
            raise TypeError(f"{name} must be a single integer bit-width, got a tensor of shape {tuple(bits.shape)}")
        bits = bits.item()
        if not float(bits).is_integer():
            raise TypeError(f"{name} must be an integer bit-width, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= max_bits:
        hint = ""
        if max_bits == MAX_INT8_WEIGHT_BITS and bits == 8:
            hint = (" (DAQ's weight grid is the odd integers in [-(2^b-1), 2^b-1]; at 8 bits that needs"
                    " ±255, which int8 cannot hold: use weight bits <= 7)")
        raise ValueError(f"{name}={bits} is out of range: use an integer in [{MIN_BITS}, {max_bits}]{hint}")
    return bits


def check_positive(value, name: str) -> float:
    """Return ``value`` as a positive finite float or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value} is invalid: it must be a positive finite number")
    return value


def check_floating(x, name: str) -> torch.Tensor:
    """Require a floating-point tensor (DAQ quantizes real values)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got dtype {x.dtype};"
                        f" convert it with .float() first")
    return x


def check_bounds(lower: torch.Tensor, upper: torch.Tensor, lower_name: str = "lower", upper_name: str = "upper"):
    """Require ``lower < upper`` element-wise (the quantization interval of Eq. 1)."""
    check_floating(lower, lower_name)
    check_floating(upper, upper_name)
    with torch.no_grad():
        bad = ~(lower < upper)
        if bool(bad.any()):
            lo = lower.detach().expand_as(bad)[bad].flatten()[:1].item() if lower.numel() > 1 else lower.item()
            hi = upper.detach().expand_as(bad)[bad].flatten()[:1].item() if upper.numel() > 1 else upper.item()
            raise ValueError(f"{lower_name} must be < {upper_name} (the quantization interval [l, u] of DAQ Eq. 1),"
                             f" got {lower_name}={lo} and {upper_name}={hi}; re-initialise the bounds")


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse a tensor holding NaN or Inf with a message that counts them and names ``name``.

    Used on the data a quantizer is *initialised* from (the first batch, the weights): a single
    NaN there makes every bound NaN, and every later call fails far from the cause.
    """
    check_floating(x, name)
    with torch.no_grad():
        finite = torch.isfinite(x)
        if bool(finite.all()):
            return x
        nan = int(torch.isnan(x).sum())
        inf = int(x.numel() - int(finite.sum()) - nan)
    raise ValueError(f"{name} contains {nan} NaN and {inf} Inf value(s) (of {x.numel()}, shape {tuple(x.shape)}):"
                     " DAQ initialises its bounds from these values and refuses them; nothing was changed."
                     " Find where the non-finite values come from (input data, a diverged layer) and call again"
                     " with finite values")

