"""DASR with the adaptive temperature (DAQ Eqs. 4-11): forward, closed-form backward, Eq. 9."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import daq_core
from daq_core import assignment_offset, dasr, dasr_gradient, dasr_gradient_constant, soft_assignment

finite_t = st.floats(min_value=-300.0, max_value=300.0, allow_nan=False, allow_infinity=False, width=32)
gammas = st.floats(min_value=0.25, max_value=6.0)
sigmas = st.floats(min_value=0.3, max_value=4.0)


def _closed_form(t: float, gamma: float, sigma: float) -> float:
    """DAQ-SPEC §2 formula, written independently of the implementation (float64, math module)."""
    delta = abs(t - round(t))
    s_n = math.exp(-delta)
    s_f = math.exp(-(1.0 - delta)) * math.exp(-1.0 / sigma**2)
    g = 1.0 / (1.0 + math.exp(-gamma))
    return g * (1 - g) / (2 * g - 1) * gamma * (s_n + s_f) / (s_n - s_f)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite_t, min_size=1, max_size=64), gammas, sigmas)
def test_forward_equals_torch_round_bit_for_bit(values, gamma, sigma):
    t = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(dasr(t, gamma, sigma), torch.round(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_forward_round_all_dtypes_including_ties(dtype):
    t = torch.cat([torch.arange(-8, 8, 0.5), torch.randn(1000) * 10]).to(dtype)
    out = dasr(t)
    assert out.dtype == dtype
    assert torch.equal(out, torch.round(t))  # round-half-to-even at k + 0.5, like torch.round


@settings(max_examples=200, deadline=None)
@given(finite_t, gammas, sigmas)
def test_backward_equals_closed_form(value, gamma, sigma):
    t = torch.tensor([value], dtype=torch.float64, requires_grad=True)
    dasr(t, gamma, sigma).sum().backward()
    assert t.grad.item() == pytest.approx(_closed_form(value, gamma, sigma), rel=1e-9, abs=1e-12)


def test_backward_finite_at_transitions_and_levels():
    t = torch.cat([torch.arange(-5, 5) + 0.5, torch.arange(-5, 6).float()]).requires_grad_()
    dasr(t, 2.0, 1.0).sum().backward()
    assert torch.isfinite(t.grad).all()
    assert t.grad[:10] == pytest.approx([0.597] * 10, abs=1e-3)   # transitions (DAQ-SPEC §2)
    assert t.grad[10:] == pytest.approx([0.362] * 11, abs=1e-3)   # on grid points


def test_spec_values_sigma_two():
    g = dasr_gradient(torch.tensor([3.0, 3.5]), gamma=2.0, sigma=2.0)
    assert g.tolist() == pytest.approx([0.497, 2.217], abs=1e-3)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=-50, max_value=50), gammas, sigmas)
def test_closed_form_matches_autograd_of_the_soft_expression(value, gamma, sigma):
    """Away from transitions, autograd over Eqs. 4-10 (beta* detached) gives the closed form."""
    frac = value - math.floor(value)
    if frac < 1e-6:
        return  # on a level, autograd's |x| kink gives a one-sided derivative of the distance score
    t = torch.tensor([value], dtype=torch.float64, requires_grad=True)
    soft_assignment(t, gamma=gamma, sigma=sigma, rescale=True).sum().backward()
    expected = dasr_gradient(torch.tensor([value], dtype=torch.float64), gamma, sigma).item()
    assert t.grad.item() == pytest.approx(expected, rel=1e-8)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=-50, max_value=50), gammas, sigmas)
def test_eq9_phi_at_adaptive_temperature_is_level_plus_minus_lambda(value, gamma, sigma):
    """Eq. 9: phi(x; beta*) = q_f + lambda for x <= q_t, q_c - lambda above; Eq. 11 after rescaling."""
    frac = value - math.floor(value)
    t = torch.tensor([value], dtype=torch.float64)
    lam = assignment_offset(gamma)
    q_f = math.floor(value)
    expected = q_f + lam if frac <= 0.5 else q_f + 1 - lam
    assert soft_assignment(t, gamma=gamma, sigma=sigma).item() == pytest.approx(expected, abs=1e-9)
    assert soft_assignment(t, gamma=gamma, sigma=sigma, rescale=True).item() == pytest.approx(q_f + (frac > 0.5), abs=1e-9)


def test_soft_expression_at_transitions_matches_dasr():
    """At q_t the kernel breaks the tie (q* = q_f), so Eq. 9 gives q_f + lambda and the
    derivative of the soft expression there is the closed form's maximum."""
    t = torch.tensor([0.5, 1.5, -2.5], dtype=torch.float64, requires_grad=True)
    phi = soft_assignment(t, rescale=True)
    phi.sum().backward()
    assert phi.tolist() == pytest.approx([0.0, 1.0, -3.0])          # Eq. 11: x <= q_t -> q_f
    expected = dasr_gradient(t.detach())
    assert torch.allclose(t.grad, expected)
    t2 = t.detach().clone().requires_grad_()
    dasr(t2).sum().backward()
    assert torch.isfinite(t2.grad).all() and torch.allclose(t2.grad, expected)


def test_fixed_temperature_has_a_quantizer_gap():
    """The paper's ablation: a fixed beta leaves phi away from the rounded value near transitions."""
    t = torch.tensor([0.45], dtype=torch.float64)
    gap = (soft_assignment(t, beta=4.0, rescale=False) - torch.round(t)).abs().item()
    assert gap > 0.1
    # a large fixed beta closes the gap but the gradient vanishes away from the transition
    t_far = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    soft_assignment(t_far, beta=24.0).sum().backward()
    assert t_far.grad.abs().item() < 1e-3 < dasr_gradient(t_far.detach()).item()


def test_gradient_constant_is_spec_formula():
    g = 1 / (1 + math.exp(-2.0))
    assert dasr_gradient_constant(2.0) == pytest.approx(g * (1 - g) / (2 * g - 1) * 2.0)
    assert assignment_offset(2.0) == pytest.approx(1 - g)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(sigma=0.0), ValueError, "sigma"),
    (dict(sigma=float("nan")), ValueError, "sigma"),
    (dict(gamma="2"), TypeError, "gamma"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        dasr(torch.zeros(3), **kwargs)


def test_non_floating_input_is_a_type_error():
    with pytest.raises(TypeError, match="t must be a floating-point tensor"):
        dasr(torch.arange(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dasr([0.5, 1.0])


def test_saves_one_tensor_for_backward():
    saved = []

    def pack(x):
        saved.append(x)
        return x

    t = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        daq_core.dasr(t * 1.0)
    assert sum(x.numel() for x in saved) <= t.numel()
