"""Distance-aware soft rounding (DASR) with the adaptive temperature (DAQ Eqs. 4-11).

Notation follows the paper (Sec. 3.2-3.3) and ``DAQ-SPEC.md`` §2.  For a
normalised input ``t`` (Eq. 1) let ``q_f = floor(t)`` and ``q_c = q_f + 1``.

* distance scores (Eq. 4): ``d(q) = exp(-|t - q|)``
* Gaussian kernel centred on the nearest level ``q*``: ``k(q) = exp(-(q - q*)^2 / sigma^2)``
* weighted scores (Eq. 8): ``s(q) = k(q) d(q)``
* adaptive temperature (Eq. 7): ``beta* = gamma / |s(q_f) - s(q_c)|`` (a constant for autograd)
* soft assignment (Eqs. 5-6): ``phi = softmax(beta* s) . (q_f, q_c)``
* rescaling (Eq. 10): ``Q = (phi - q_t) / (1 - 2 lambda) + q_t`` with ``lambda = 1 / (e^gamma + 1)``

With the adaptive temperature ``phi`` equals ``q_f + lambda`` or ``q_c - lambda``
(Eq. 9), so ``Q`` equals rounding exactly (Eq. 11): the forward pass *is*
``torch.round``.  Its derivative has the closed form (DAQ-SPEC §2)::

    dQ/dt = g (1 - g) / (2 g - 1) * gamma * (s_n + s_f) / (s_n - s_f),   g = sigmoid(gamma)

with ``s_n = exp(-delta)``, ``s_f = exp(-(1 - delta) - 1/sigma^2)`` and
``delta = |t - round(t)|``.  Writing ``r = s_f / s_n = exp(-(1 + 1/sigma^2 - 2 delta))``,
``(1 + r) / (1 - r) = coth((1 + 1/sigma^2 - 2 delta) / 2)``, which is what
:func:`dasr_gradient` evaluates: one ``tanh`` per element, finite everywhere
(the argument is ``>= 1/(2 sigma^2) > 0``, also at transitions ``k + 0.5``).

At an exact tie ``t = k + 0.5`` Eq. 11 picks ``q_f``; :func:`dasr` returns
``torch.round(t)`` (half to even) there, as required for bit-exact agreement with
integer backends. The two differ only on that measure-zero set.
"""

from __future__ import annotations

import math

import torch

from .checks import check_floating, check_positive

__all__ = [
    "dasr",
    "dasr_gradient",
    "dasr_gradient_constant",
    "assignment_offset",
    "soft_assignment",
    "DEFAULT_GAMMA",
    "DEFAULT_WEIGHT_SIGMA",
    "DEFAULT_ACT_SIGMA",
]

#: gamma of Eq. 7 for weights and activations (paper Sec. 4.1).
DEFAULT_GAMMA = 2.0
#: Standard deviation of the Gaussian kernel for weight quantizers (paper Sec. 4.1).
DEFAULT_WEIGHT_SIGMA = 1.0
#: Standard deviation of the Gaussian kernel for activation quantizers (paper Sec. 4.1).
DEFAULT_ACT_SIGMA = 2.0


def assignment_offset(gamma: float) -> float:
    """``lambda = 1 / (e^gamma + 1)``: the offset of ``phi(t; beta*)`` from the levels (Eq. 9)."""
    gamma = check_positive(gamma, "gamma")
    return 1.0 / (math.exp(gamma) + 1.0)


def dasr_gradient_constant(gamma: float) -> float:
    """``g (1 - g) / (2 g - 1) * gamma`` with ``g = sigmoid(gamma)``: the factor of dQ/dt.

    ``g (1 - g)`` is the softmax derivative at ``beta* |s_f - s_c| = gamma`` and
    ``1 / (2 g - 1) = 1 / (1 - 2 lambda)`` the slope of the rescaling (Eq. 10).
    """
    gamma = check_positive(gamma, "gamma")
    g = 1.0 / (1.0 + math.exp(-gamma))
    return g * (1.0 - g) / (2.0 * g - 1.0) * gamma


def _gradient_from_t(t: torch.Tensor, rounded: torch.Tensor, constant: float, kernel_term: float) -> torch.Tensor:
    """``dQ/dt`` given ``t`` and ``round(t)`` (see module docstring). Element-wise."""
    delta = (t - rounded).abs()
    return constant / torch.tanh((kernel_term - 2.0 * delta) * 0.5)


def dasr_gradient(t: torch.Tensor, gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_WEIGHT_SIGMA) -> torch.Tensor:
    """Closed-form derivative ``dDASR(t)/dt`` with ``beta*`` held constant (DAQ-SPEC §2).

    Args:
        t: normalised input (any floating dtype; computed in at least float32).
        gamma: positive constant of the adaptive temperature (Eq. 7).
        sigma: standard deviation of the Gaussian kernel ``k`` (Eq. 6).

    Returns:
        Tensor like ``t`` with the per-element derivative; bounded and finite,
        between ``C coth((1 + 1/sigma^2)/2)`` on a level and ``C coth(1/(2 sigma^2))``
        at a transition point.

    Example:
        >>> g = dasr_gradient(torch.tensor([0.0, 0.5]), gamma=2.0, sigma=1.0)
        >>> [round(v, 3) for v in g.tolist()]
        [0.362, 0.597]
    """
    check_floating(t, "t")
    gamma = check_positive(gamma, "gamma")
    sigma = check_positive(sigma, "sigma")
    tf = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    g = _gradient_from_t(tf, torch.round(tf), dasr_gradient_constant(gamma), 1.0 + 1.0 / sigma**2)
    return g.to(t.dtype)


class _DASR(torch.autograd.Function):
    """DASR (Eqs. 4-11): forward ``round(t)``; backward the closed form. Saves ``t`` only."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
        ctx.save_for_backward(t)
        ctx.constant = dasr_gradient_constant(gamma)
        ctx.kernel_term = 1.0 + 1.0 / sigma**2
        return torch.round(t)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (t,) = ctx.saved_tensors
        tf = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        grad = _gradient_from_t(tf, torch.round(tf), ctx.constant, ctx.kernel_term)
        return (grad_output * grad).to(t.dtype), None, None


def dasr(t: torch.Tensor, gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_WEIGHT_SIGMA) -> torch.Tensor:
    """Distance-aware soft rounding with the adaptive temperature (DAQ Eqs. 4-11).

    The forward value equals ``torch.round(t)`` bit for bit (Eq. 11: no quantizer
    gap); the backward pass is the derivative of the soft assignment (Eqs. 5-6)
    at the adaptive temperature ``beta*`` (Eq. 7), held constant, followed by the
    rescaling of Eq. 10, evaluated in closed form (see :func:`dasr_gradient`).

    Args:
        t: normalised input (Eq. 1), a floating tensor of any shape and dtype.
        gamma: positive constant of the adaptive temperature (paper: 2).
        sigma: standard deviation of the Gaussian kernel (paper: 1 for weights, 2 for activations).

    Returns:
        ``round(t)`` with DASR's gradient.

    Example:
        >>> t = torch.tensor([0.2, 0.5, 1.7], requires_grad=True)
        >>> dasr(t).tolist()
        [0.0, 0.0, 2.0]
    """
    check_floating(t, "t")
    gamma = check_positive(gamma, "gamma")
    sigma = check_positive(sigma, "sigma")
    return _DASR.apply(t, gamma, sigma)


def soft_assignment(t: torch.Tensor, gamma: float = DEFAULT_GAMMA, sigma: float = DEFAULT_WEIGHT_SIGMA,
                    beta: float | None = None, rescale: bool = False) -> torch.Tensor:
    """The soft expression of DASR, written out term by term (Eqs. 4-8, and 10 if ``rescale``).

    This is the *reference* formulation, differentiated by autograd: many
    element-wise ops and several saved tensors per call, and at exact ties Eq. 11
    rounds half down (``x <= q_t -> q_f``) where :func:`dasr` follows
    ``torch.round`` (half to even). Use :func:`dasr` for training; this function
    exists to check it and to reproduce the paper's fixed-temperature ablation
    (pass ``beta``).

    Args:
        t: normalised input.
        gamma: constant of the adaptive temperature (Eq. 7); used when ``beta`` is None.
        sigma: standard deviation of the Gaussian kernel (Eq. 6).
        beta: a fixed temperature instead of the adaptive one (kernel soft argmax).
        rescale: apply the rescaling ``f`` of Eq. 10 (with ``lambda`` from ``gamma``).

    Returns:
        ``phi(t; beta)`` (Eq. 5), or ``f(phi)`` when ``rescale``.
    """
    check_floating(t, "t")
    sigma = check_positive(sigma, "sigma")
    q_f = torch.floor(t).detach()
    q_c = q_f + 1.0
    d_f = torch.exp(-(t - q_f).abs())                       # Eq. 4
    d_c = torch.exp(-(t - q_c).abs())
    nearest_is_c = (d_c > d_f).to(t.dtype).detach()          # q* = argmax of the distance scores
    far_kernel = math.exp(-1.0 / sigma**2)                  # k(q) for the level that is not q*
    k_f = nearest_is_c * far_kernel + (1 - nearest_is_c)
    k_c = (1 - nearest_is_c) * far_kernel + nearest_is_c
    s_f, s_c = k_f * d_f, k_c * d_c                         # Eq. 8
    if beta is None:
        gamma = check_positive(gamma, "gamma")
        beta_t = (gamma / (s_f - s_c).abs()).detach()      # Eq. 7, a constant for autograd
    else:
        beta_t = check_positive(beta, "beta")
    m_c = torch.sigmoid(beta_t * (s_c - s_f))               # Eq. 6 for two candidates
    phi = q_f + m_c                                          # Eq. 5: (1 - m_c) q_f + m_c q_c
    if rescale:
        lam = assignment_offset(gamma)
        q_t = q_f + 0.5
        phi = (phi - q_t) / (1.0 - 2.0 * lam) + q_t         # Eq. 10
    return phi
