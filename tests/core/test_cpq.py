"""CPQ (reconstructed from the abstract, CPQ-SPEC): grid, multi-class STE, DropBits, bit gates."""

import math

import pytest
import torch

import daq_core
from daq_core import cpq
from daq_core.cpq import CPQ


def _x(n=3000, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=dtype) * scale).requires_grad_()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_forward_is_rounding_to_the_grid(bits, signed):
    x = _x()
    alpha = torch.tensor(0.37, dtype=torch.float64)
    y = cpq.cpq_fake_quantize(x, alpha, 0.2, bits, signed)
    k_min, k_max = cpq.cpq_grid(bits, signed)
    assert torch.equal(y, alpha * torch.clamp(torch.round(x / alpha), k_min, k_max))


def test_forward_per_channel_weights():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    alpha = torch.rand(6, dtype=torch.float64) + 0.1
    y = cpq.cpq_fake_quantize(w, alpha, 0.5 * alpha, 3, True, ch_axis=0)
    a = alpha.reshape(6, 1, 1, 1)
    assert torch.equal(y, a * torch.clamp(torch.round(w / a), -4, 3))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits,sigma", [(2, 0.3), (4, 0.1), (4, 0.6), (8, 0.25)])
def test_ste_gradient_equals_autograd_of_expected_grid_value_same_window(bits, sigma, signed):
    """∂L/∂x, ∂L/∂α, ∂L/∂σ of the fused op equal autograd of Σ_{k∈W} g_k π_k(x) over the same ±3 window."""
    x = _x(scale=0.7 * 2 ** (bits - 1))
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(cpq.cpq_fake_quantize(x, alpha, sig, bits, signed), (x, alpha, sig), grad)
    ref = torch.autograd.grad(cpq.expected_value(x, alpha, sig, bits, signed, window=3), (x, alpha, sig), grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_ste_gradient_with_dropped_bits_is_that_of_the_coarser_grid():
    """With d bits dropped the STE runs over the (b-d)-bit grid of step 2^d α, noise 2^d σ (σ in steps)."""
    x = _x()
    alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(cpq.cpq_fake_quantize(x, alpha, sig, 5, True, drop_bits=2), (x, alpha, sig), grad)
    ref = torch.autograd.grad(cpq.expected_value(x, 4 * alpha, 4 * sig, 3, True), (x, alpha, sig), grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("drop", [0, 2, 5])
def test_ste_gradient_keeps_its_scale_when_bits_are_dropped(drop):
    """The input gradient averages 1 between grid points and stays bounded at every drop count: σ scales
    with the grid in use. (With the fine σ at d = 5 it was a comb of spikes of height 16 at the coarse
    boundaries and ~0 between them, and learned bit-widths blew the weights up.)"""
    alpha, sig = torch.tensor(0.01), torch.tensor(0.005)                  # σ = α/2, the default
    x = ((torch.arange(40_000, dtype=torch.float32) + 0.5) / 40_000 * 60 - 30) * alpha   # inside the 8-bit range
    x.requires_grad_(True)
    cpq.cpq_fake_quantize(x, alpha, sig, 8, True, drop_bits=drop).sum().backward()
    assert float(x.grad.mean()) == pytest.approx(1.0, abs=0.02)
    assert float(x.grad.max()) < 1.2 and float(x.grad.min()) > 0.8


@pytest.mark.parametrize("sigma,tol", [(0.5, 1e-2), (1.0, 0.15)])
def test_window_three_is_close_to_the_full_expectation_for_sigma_up_to_the_step(sigma, tol):
    x = _x(scale=10.0)
    alpha, sig = torch.tensor(1.0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    g_win = torch.autograd.grad(cpq.expected_value(x, alpha, sig, 6, True, window=3).sum(), x)[0]
    g_all = torch.autograd.grad(cpq.expected_value(x, alpha, sig, 6, True, window=None).sum(), x)[0]
    assert (g_win - g_all).abs().max() < tol


def test_backward_materialises_no_two_to_the_b_wide_tensor():
    """8 bits: nothing saved for backward or built in it is wider than the input (no N × 256)."""
    x = torch.randn(4096, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = cpq.cpq_fake_quantize(x, torch.tensor(0.05, requires_grad=True), 0.02, 8, True)
    y.sum().backward()
    assert max(sizes) <= x.numel()


def test_dropbits_only_keeps_points_of_the_coarser_nested_grids():
    torch.manual_seed(0)
    x = _x(20000, dtype=torch.float32).detach()
    alpha = torch.tensor(0.3)
    keep = cpq.nested_keep(torch.tensor([0.5, 0.6, 0.7]))     # 4 bits, heavy dropping
    y = cpq.cpq_fake_quantize(x, alpha, 0.15, 4, True, keep=keep)
    options = torch.stack([cpq.cpq_quantize(x, alpha, 4, True, drop_bits=d) for d in range(4)])
    match = (y.unsqueeze(0) == options)
    assert bool(match.any(0).all())
    # every count occurs, with the nested probabilities P(d >= D) = 1 - K_{D-1}
    first = match.float().argmax(0)   # finest grid that explains the value (a lower bound of d)
    assert set(first.unique().tolist()) == {0, 1, 2, 3}
    codes = torch.round(y / alpha)
    assert codes.min() >= -8 and codes.max() <= 7


def test_dropbits_drop_counts_follow_the_nested_rates():
    keep = cpq.nested_keep(torch.tensor([0.9, 0.8, 0.7]))
    d = cpq.sample_drop_bits((200000,), keep, generator=torch.Generator().manual_seed(0))
    p_ge = [(d >= D).float().mean().item() for D in (1, 2, 3)]
    expected = [1 - keep[0].item(), 1 - keep[1].item(), 1 - keep[2].item()]
    assert p_ge == pytest.approx(expected, abs=5e-3)


def test_coarse_grid_probabilities_are_renormalised():
    x = _x(500).detach()
    points = torch.arange(-2, 2, dtype=torch.float64)       # the 2-bit grid left after dropping 2 of 4 bits
    pi = cpq.bin_probabilities(x, 4 * 0.3, 0.2, points, -2, 1)
    torch.testing.assert_close(pi.sum(-1), torch.ones_like(x))


def test_dropbits_gradient_to_keep_is_that_of_the_expected_output():
    x = _x(4000).detach()
    alpha = torch.tensor(0.3, dtype=torch.float64)
    z = torch.tensor([0.7, 0.8, 0.9], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    y = cpq.cpq_fake_quantize(x, alpha, 0.1, 4, True, keep=cpq.nested_keep(z))
    got = torch.autograd.grad(y, z, grad)[0]
    q = [cpq.cpq_quantize(x, alpha, 4, True, drop_bits=d) for d in range(4)]
    k = cpq.nested_keep(z)
    expected = q[3] + sum(k[d] * (q[d] - q[d + 1]) for d in range(3))
    ref = torch.autograd.grad(expected, z, grad)[0]
    torch.testing.assert_close(got, ref)


def test_eval_never_drops_bits():
    q = daq_core.FamilyQuantizer(CPQ, "activation", bits=4, drop_rate=0.5)
    x = torch.rand(4, 64) * 3
    q(x)
    q.eval()
    y = q(x)
    alpha = cpq.step_of(q).detach()
    assert torch.equal(y, alpha * torch.clamp(torch.round(x / alpha), 0, 15))
    q.train()
    assert not torch.equal(q(x), y)   # training drops bits (p = 0.5)


@pytest.mark.parametrize("min_bits, floor, grid", [(None, 2, (-2, 1)), (1, 1, (-1, 0))])
def test_gate_probabilities_move_under_the_regularizer(min_bits, floor, grid):
    """The gates fall under the regulariser until every droppable bit is read out as dropped: weights stop
    at 2 bits by default (the signed 1-bit grid {-1, 0} has no positive weight), at 1 with min_bits=1."""
    torch.manual_seed(0)
    q = daq_core.FamilyQuantizer(CPQ, "weight", bits=4, learn_bits=True, min_bits=min_bits)
    q(torch.randn(16, 8))
    assert q.gate_logits.numel() == 4 - floor
    before = cpq.keep_probability(q.gate_logits).detach().clone()
    opt = torch.optim.Adam([q.gate_logits], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        cpq.bit_regularizer(q, 1.0).backward()
        opt.step()
    after = cpq.keep_probability(q.gate_logits).detach()
    assert bool((after < before - 0.3).all())
    assert q.bit_width == floor       # every droppable bit read out as dropped
    assert q.family.int_range(q) == grid
    assert float(cpq.expected_bits(4, after)) == pytest.approx(floor + float(cpq.nested_keep(after).sum()))


def test_min_bits_is_checked():
    with pytest.raises(ValueError, match=r"min_bits must be an integer in \[1, bits=4\]"):
        daq_core.FamilyQuantizer(CPQ, "weight", bits=4, learn_bits=True, min_bits=5)


def test_bit_width_read_out_is_nested():
    q = daq_core.FamilyQuantizer(CPQ, "activation", bits=6, learn_bits=True)
    q(torch.rand(64))
    with torch.no_grad():
        q.gate_logits.copy_(torch.tensor([5.0, -5.0, 5.0, 5.0, 5.0]))   # bit 1 dropped ⇒ bit 0 too
    assert q.bit_width == 4
    scale, zero_point = q.qparams()
    torch.testing.assert_close(scale, cpq.step_of(q).detach() * 4)
    q.eval()
    y = q(torch.rand(1000) * 10)
    codes = torch.round(y / scale)
    assert bool((codes == y / scale).all()) and codes.max() <= 15


def test_expected_bits_and_average():
    probs = torch.tensor([1.0, 0.0, 1.0])
    assert float(cpq.expected_bits(4, probs)) == 2.0
    assert float(cpq.expected_bits(4, torch.ones(3))) == 4.0


def test_bit_budget_moves_lambda_towards_the_target():
    q = daq_core.FamilyQuantizer(CPQ, "weight", bits=8, learn_bits=True)
    q(torch.randn(32, 4))
    budget = cpq.BitBudget(0.0, target_weight_bits=4.0, rate=0.1)
    budget.update(q)
    assert budget.strength["weight"] > 0 and budget.strength["activation"] == 0


def test_init_step_minimises_the_error():
    w = torch.randn(4, 100)
    step = cpq.init_step(w, 4, True, ch_axis=0)
    assert step.shape == (4,)
    err = lambda s: ((torch.clamp(torch.round(w / s), -8, 7) * s - w) ** 2).sum(1)
    assert bool((err(step[:, None]) <= err(w.abs().amax(1, keepdim=True) / 8) + 1e-6).all())


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"target average bit-width must lie in \[1, 8\]"):
        cpq.BitBudget(0.1, target_weight_bits=9)
    with pytest.raises(ValueError, match=r"target average bit-width must lie in \[1, 8\]"):
        cpq.BitBudget(0.1, target_act_bits=0.5)
    with pytest.raises(ValueError, match="regularizer weight must be a finite number >= 0"):
        cpq.BitBudget(-1.0)
    with pytest.raises(ValueError, match="drop_rate"):
        daq_core.FamilyQuantizer(CPQ, "weight", bits=4, drop_rate=1.0)
    with pytest.raises(ValueError, match="keep holds"):
        cpq.cpq_fake_quantize(torch.randn(4), 1.0, 0.5, 4, keep=torch.ones(4))   # 3 droppable bits at most
    with pytest.raises(ValueError, match="ch_axis applies to weights only"):
        daq_core.FamilyQuantizer(CPQ, "activation", bits=4, ch_axis=0)
    q = daq_core.FamilyQuantizer(CPQ, "weight", bits=4, learn_bits=True)
    with pytest.raises(ValueError, match="bit gates"):
        q.load_state_dict(daq_core.FamilyQuantizer(CPQ, "weight", bits=6, learn_bits=True).state_dict())


def test_state_dict_round_trip_resizes_per_channel_step():
    src = daq_core.FamilyQuantizer(CPQ, "weight", bits=3, ch_axis=0, learn_bits=True)
    w = torch.randn(5, 7)
    src(w)
    dst = daq_core.FamilyQuantizer(CPQ, "weight", bits=3, ch_axis=0, learn_bits=True)
    dst.load_state_dict(src.state_dict())
    src.eval(), dst.eval()
    assert torch.equal(src(w), dst(w))
    assert math.isclose(float(dst.size), 35.0)


def test_bit_budget_projection_meets_the_target_from_above():
    torch.manual_seed(0)
    layers = [daq_core.FamilyQuantizer(CPQ, "weight", bits=8, learn_bits=True) for _ in range(5)]
    model = torch.nn.ModuleList(layers)
    for i, q in enumerate(layers):
        q(torch.randn(8 * (i + 1), 16))
    budget = cpq.BitBudget(0.0, target_weight_bits=3.4)
    flipped = budget.project(model)
    avg = cpq.average_bits(model, "weight")
    assert flipped["weight"] > 0 and 3.4 - 0.25 <= avg <= 3.4
    # a model already below the target gets bits back, nested (one bit per flip)
    for q in layers:
        with torch.no_grad():
            q.gate_logits.fill_(-5.0)
    assert cpq.average_bits(model, "weight") == 2.0        # weights stop at min_bits = 2
    budget.project(model)
    assert 3.4 - 0.25 <= cpq.average_bits(model, "weight") <= 3.4


@pytest.mark.slow
def test_compiled_path_matches_the_eager_one():
    """torch.compile'd kernels (hashed uniforms for DropBits): same forward, same STE, drops on the nested grids."""
    x = torch.randn(2, 8, 64, 64, requires_grad=True)      # above COMPILE_MIN_NUMEL
    step = torch.tensor(0.2, requires_grad=True)
    sigma = torch.tensor(0.1, requires_grad=True)
    grad = torch.randn_like(x)
    was = daq_core.compiled_kernels_enabled()

    def run(compiled, keep=None):
        daq_core.use_compiled_kernels(compiled)
        x.grad = step.grad = sigma.grad = None
        y = cpq.cpq_fake_quantize(x, step, sigma, 4, signed=False, keep=keep)
        y.backward(grad)
        return y.detach(), x.grad.clone(), step.grad.clone(), sigma.grad.clone()

    try:
        eager, compiled = run(False), run(True)
        assert torch.equal(eager[0], compiled[0])
        for e, c in zip(eager[1:], compiled[1:]):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)
        keep = cpq.nested_keep(torch.tensor([0.7, 0.8, 0.9]))
        y = run(True, keep)[0]
        options = torch.stack([cpq.cpq_quantize(x.detach(), step.detach(), 4, False, drop_bits=d) for d in range(4)])
        assert bool((y.unsqueeze(0) == options).any(0).all())
        dropped = (y.unsqueeze(0) != options[0]).float().mean()
        assert 0.05 < float(dropped) < 0.5
    finally:
        daq_core.use_compiled_kernels(was)


@pytest.mark.parametrize("bits", [4, 8])
def test_learned_gates_drop_bits_at_the_rate_the_read_out_assumes(bits):
    """In training a learned-bit quantizer drops bit j (and every lower one) with probability
    ``1 - P(z_j > 0)``, the rate the regulariser and the read-out use. Using a hard-concrete sample as
    the keep rate dropped far more (at the initial 8-bit gates 73% of the elements lost a bit instead
    of 24%), and the 1-epoch learned W4A4 ResNet-20 row fell to chance."""
    torch.manual_seed(0)
    q = daq_core.FamilyQuantizer(CPQ, "activation", bits=bits, learn_bits=True)
    q(torch.rand(64) * 10)                                       # initialise
    step = cpq.step_of(q).detach()
    odd = (torch.arange(200_000) % ((1 << bits) // 2)) * 2 + 1   # odd codes: any dropped bit moves them
    x = odd.float() * step
    q.train()
    with torch.no_grad():
        moved = (q(x) != x).double().mean().item()
    keep_all = float(torch.prod(cpq.keep_probability(q.gate_logits.detach())))
    assert moved == pytest.approx(1.0 - keep_all, abs=0.01)
    assert moved < 0.35                                          # the sampled-gate design: ~0.73 at 8 bits


def test_fixed_bit_widths_train_at_the_read_out_without_drops():
    """fix_bit_widths ends the search: every quantizer keeps its read-out bit-width, the training
    forward equals the eval forward (no random drops), the gates get no gradient, and fixing again
    changes nothing."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "a": daq_core.FamilyQuantizer(CPQ, "activation", bits=8, learn_bits=True),
        "w": daq_core.FamilyQuantizer(CPQ, "weight", bits=6, learn_bits=True)})
    model["a"](torch.rand(256) * 4)
    model["w"](torch.randn(8, 16))
    with torch.no_grad():   # a gate state mid-search: bits 0-2 below the threshold, bit 3 near it (P = 0.6)
        model["a"].gate_logits.copy_(torch.tensor([cpq.gate_logits_for(p) for p in (0.1, 0.2, 0.45, 0.6, .9, .95, .99)]))
        model["w"].gate_logits.copy_(torch.tensor([cpq.gate_logits_for(p) for p in (0.3, 0.7, 0.8, 0.9)]))
    assert [m.bit_width for m in model.values()] == [5, 5]
    assert not cpq.bit_widths_fixed(model)
    x = torch.rand(4096) * 4
    model.train()
    with torch.no_grad():
        before = model["a"](x)
    assert not torch.equal(before, model["a"].eval()(x))          # searching: bit 3 dropped on ~40% of elements
    assert cpq.fix_bit_widths(model) == {"a": 5, "w": 5}
    assert cpq.bit_widths_fixed(model) and [m.bit_width for m in model.values()] == [5, 5]
    assert cpq.keep_probability(model["a"].gate_logits).tolist() == [0, 0, 0, 1, 1, 1, 1]
    model.train()
    xa = x.clone().requires_grad_(True)
    y = model["a"](xa)
    assert torch.equal(y.detach(), model["a"].eval()(x).detach())  # training forward == read-out forward
    model.train()
    (y.sum() + cpq.bit_regularizer(model, 1.0)).backward()
    assert not bool(model["a"].gate_logits.grad.abs().gt(0).any())  # nothing left to learn in the gates
    assert xa.grad is not None and bool(xa.grad.abs().gt(0).any())  # the step and the input still train
    gates = model["a"].gate_logits.detach().clone()
    assert cpq.fix_bit_widths(model) == {"a": 5, "w": 5} and torch.equal(model["a"].gate_logits, gates)
