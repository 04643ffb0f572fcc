"""GPU readiness (issue 19): DAQ, N2UQ and CPQ on CUDA agree with CPU; compiled kernels; DDP; QAT on CUDA.

Skipped as a whole where ``torch.cuda.is_available()`` is false. Run on a GPU machine with
``scripts/gpu_check.sh`` (or ``python -m pytest -q tests/cuda --run-slow``); docs/gpu.md.

"Matches CPU" means:

* the same integer codes, except for elements whose normalised value ``t`` lies within
  :data:`TIE_TOL` of a rounding threshold ``k + 1/2`` (there an ulp of difference in ``t``,
  e.g. a fused multiply-add on the GPU, legitimately picks the other level) or of a clip
  boundary ``0`` / ``n`` (the gradient mask);
* element-wise gradients (to the input) equal to ``1e-5`` relative on the same elements, plus,
  for DASR, what a 4-ulp difference in ``t`` makes of the gradient next to a transition (up to
  ~8x that difference for activations, σ = 2; :func:`_dasr_rtol`): the GPU may round ``t`` in
  its last bit differently (measured on an H200: 1.45e-5 at worst without this term);
* parameter gradients (sums over the tensor, reduced in another order on the GPU) equal to
  ``1e-5`` relative to the sum of the magnitudes of their terms (:func:`_param_tol`).

The state is initialised on the first batch on the CPU and copied to the GPU for these
comparisons, so that both devices quantize onto the same grid; the first batch *on* the GPU is
checked separately (state lands on the input's device).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

#: ``DAQ_CUDA_TESTS_DEVICE=cpu`` dry-runs the comparisons CPU against CPU (checks the test logic on a
#: machine without a GPU; the DDP recipe test is skipped then). Default: cuda.
_DEVICE = os.environ.get("DAQ_CUDA_TESTS_DEVICE", "cuda")

if _DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("CUDA is not available (torch.cuda.is_available() is False): the GPU-readiness tests need an"
                " NVIDIA GPU; run scripts/gpu_check.sh on a GPU machine", allow_module_level=True)

from torch import nn  # noqa: E402

import daq_core  # noqa: E402
import daq_fx  # noqa: E402
from daq_fx import DAQFakeQuantize  # noqa: E402
from daq_fx.n2uq import N2UQFakeQuantize  # noqa: E402

CUDA = torch.device(_DEVICE)
DEVICES = {"cpu": torch.device("cpu"), "cuda": CUDA}


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """Full float32 on the GPU: TF32 convolutions / matmuls would differ from the CPU by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
#: distance (in units of the grid step) from a rounding threshold or a clip boundary that is masked
TIE_TOL = 1e-4
GRAD_RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _away_from_ties(t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Mask of normalised values farther than TIE_TOL from ``k + 1/2`` (and from ``0``, ``n``)."""
    t = t.detach().double().cpu()
    frac = t - torch.floor(t)
    ok = (frac - 0.5).abs() > TIE_TOL
    if n is not None:
        # exactly on a boundary (e.g. ReLU zeros with l = 0) is the same on both devices
        ok &= ((t.abs() > TIE_TOL) | (t == 0)) & ((t - n).abs() > TIE_TOL)
    return ok


def _codes_match(codes_cpu: torch.Tensor, codes_cuda: torch.Tensor, mask: torch.Tensor) -> None:
    assert codes_cuda.device.type == CUDA.type
    codes_cuda = codes_cuda.cpu()
    assert mask.float().mean() > 0.99, "test data too close to ties: the comparison would be empty"
    diff = (codes_cpu != codes_cuda) & mask
    assert not bool(diff.any()), f"{int(diff.sum())} codes differ away from ties (of {int(mask.sum())})"


def _dasr_rtol(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Relative tolerance of DASR's gradient at the normalised values ``t``.

    ``GRAD_RTOL`` plus what a 4-ulp difference in ``t`` itself makes of the gradient: ``t`` is
    computed from the input and the bounds, and CUDA need not round it like the CPU (e.g. torch
    computes ``tensor / python_number`` on CUDA as a multiplication by the reciprocal, so the step
    ``(u - l) / n`` may differ in its last bit). The gradient ``C coth(z)``, ``z = (1 + 1/σ² - 2δ)/2``,
    ``δ = |t - round(t)|``, has ``|d ln coth(z) / dδ| = 2 / sinh(2z)``: about 8 for activations
    (σ = 2) next to a transition, 1.7 for weights (σ = 1); elsewhere the term is negligible.
    """
    t = t.detach().double().cpu()
    z = (1.0 + 1.0 / sigma ** 2 - 2.0 * (t - torch.round(t)).abs()) / 2.0
    ulps = 4.0 * torch.finfo(torch.float32).eps * t.abs().clamp_min(1.0)
    return GRAD_RTOL + 2.0 / torch.sinh(2.0 * z) * ulps


def _elementwise_close(g_cpu: torch.Tensor, g_cuda: torch.Tensor, mask: torch.Tensor, what: str,
                       rtol=GRAD_RTOL) -> None:
    """Element-wise gradients equal to ``rtol`` relative (a float, or one per element) where ``mask``."""
    assert g_cuda.device.type == CUDA.type, what
    g_cuda = g_cuda.detach().cpu().double()
    g_cpu = g_cpu.detach().double()
    err = (g_cuda - g_cpu).abs()
    rtol = torch.as_tensor(rtol, dtype=torch.float64)
    bad = (err > rtol * g_cpu.abs() + 1e-30) & mask
    rel = err / (g_cpu.abs() + 1e-30)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} elements differ by more than their tolerance"
                                 f" ({GRAD_RTOL} relative, more next to DASR's transitions: _dasr_rtol); worst"
                                 f" relative error {float(rel[mask].max()):.3g}")


def _param_tol(terms_l1: torch.Tensor) -> torch.Tensor:
    """Tolerance of a reduced gradient: ``1e-5`` times the sum of the magnitudes of its terms."""
    return GRAD_RTOL * terms_l1.double() + 1e-12


def _param_close(g_cpu: torch.Tensor, g_cuda: torch.Tensor, terms_l1, what: str) -> None:
    assert g_cuda.device.type == CUDA.type, what
    err = (g_cuda.detach().cpu().double() - g_cpu.detach().double()).abs().reshape(-1)
    tol = (GRAD_RTOL * g_cpu.detach().double().abs().reshape(-1) + _param_tol(torch.as_tensor(terms_l1))
           .reshape(-1))
    assert bool((err <= tol).all()), f"{what}: |cuda - cpu| = {err.max().item():.3g} > tol {tol.min().item():.3g}"


def _state_on(module: nn.Module, device_type: str) -> None:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    assert tensors
    off = [(n, str(t.device)) for n, t in tensors if t.device.type != device_type]
    assert not off, f"state not on {device_type}: {off}"


def _grad_y(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + 0.5   # positive: the reduced gradients have no cancellation


def _leaf(t: torch.Tensor, device) -> torch.Tensor:
    """A fresh leaf copy of ``t`` on ``device`` that collects ``.grad``."""
    return t.detach().clone().to(device).requires_grad_(True)


def _run(module, x, grad_y):
    """forward + backward; returns (y, x.grad, {param name: grad})."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(grad_y.to(y.device))
    return y.detach(), x.grad.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters()
                                         if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# daq_core
# ----------------------------------------------------------------------------------------------

def test_dasr_function_matches_cpu():
    torch.manual_seed(0)
    t = torch.randn(4096) * 5
    mask = _away_from_ties(t)
    g = _grad_y(t.shape)
    t_cpu, t_gpu = _leaf(t, "cpu"), _leaf(t, CUDA)
    q_cpu, q_gpu = daq_core.dasr(t_cpu), daq_core.dasr(t_gpu)
    q_cpu.backward(g)
    q_gpu.backward(g.to(CUDA))
    _codes_match(q_cpu.detach().long(), q_gpu.detach().long(), mask)
    _elementwise_close(t_cpu.grad, t_gpu.grad, mask, "dDASR/dt")
    # the closed-form gradient alone
    _elementwise_close(daq_core.dasr_gradient(t), daq_core.dasr_gradient(t.to(CUDA)), mask, "dasr_gradient")


@pytest.mark.parametrize("bits", [2, 4])
def test_daq_fake_quantize_matches_cpu(bits):
    torch.manual_seed(0)
    n = 2 ** bits - 1
    x = torch.randn(8, 16, 12, 12)
    lo, hi = torch.tensor(-1.5), torch.tensor(2.0)
    t = (x.double() - lo.double()) / ((hi.double() - lo.double()) / n)
    mask = _away_from_ties(t, n)
    g = _grad_y(x.shape)
    outs = {}
    for key, dev in DEVICES.items():
        xd, l, u = _leaf(x, dev), _leaf(lo, dev), _leaf(hi, dev)
        y = daq_core.fake_quantize_activation(xd, l, u, bits)
        y.backward(g.to(dev))
        outs[key] = (y.detach(), xd.grad, l.grad, u.grad)
    step = (hi - lo) / n
    codes = {key: torch.round((outs[key][0] - lo.to(DEVICES[key])) / step.to(DEVICES[key])).long() for key in outs}
    _codes_match(codes["cpu"], codes["cuda"], mask)
    _elementwise_close(outs["cpu"][1], outs["cuda"][1], mask, "grad x", _dasr_rtol(t, daq_core.DEFAULT_ACT_SIGMA))
    # a term of dL/dl or dL/du is at most |dL/dx| (through t) plus 2 |dL/dy| (through the output map)
    terms = 2 * (outs["cpu"][1].abs().sum() + 2 * g.abs().sum())
    _param_close(outs["cpu"][2], outs["cuda"][2], terms, "grad lower")
    _param_close(outs["cpu"][3], outs["cuda"][3], terms, "grad upper")


# ----------------------------------------------------------------------------------------------
# daq_fx
# ----------------------------------------------------------------------------------------------

def _fx_weight_pair(bits=4):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1
    fq = DAQFakeQuantize("weight", bits, ch_axis=0)
    fq(w)                                   # first batch on the CPU: per-channel l, u, s
    return w, fq, copy.deepcopy(fq).to(CUDA)


def test_fx_weight_per_channel_matches_cpu():
    w, fq_cpu, fq_gpu = _fx_weight_pair()
    n = fq_cpu.num_levels
    with torch.no_grad():
        w_hat = daq_core.normalize_weight(w, fq_cpu.ch_axis, center=False).double()
        lo, hi = fq_cpu.lower_bound.double().reshape(-1, 1, 1, 1), fq_cpu.upper_bound.double().reshape(-1, 1, 1, 1)
        t = (w_hat - lo) / ((hi - lo) / n)
        mask = _away_from_ties(t, n)
    _codes_match(fq_cpu.integers(w), fq_gpu.integers(w.to(CUDA)), mask)
    g = _grad_y(w.shape)
    y_c, gx_c, gp_c = _run(fq_cpu, w, g)
    y_g, gx_g, gp_g = _run(fq_gpu, w.to(CUDA), g)
    _elementwise_close(gx_c, gx_g, mask, "grad weight", _dasr_rtol(t, fq_cpu.sigma))
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt()
    # per channel: a term of dL/dl, dL/du is at most |dL/dŵ| = |dL/dw| rms; of dL/ds at most 3 |dL/dy|
    terms = 2 * (gx_c.abs().sum(dim=(1, 2, 3)) * rms + 3 * g.abs().sum(dim=(1, 2, 3)))
    for name in ("lower_bound", "upper_bound", "output_scale"):
        _param_close(gp_c[name], gp_g[name], terms, name)


@pytest.mark.parametrize("signed", [True, False])
def test_fx_activation_matches_cpu(signed):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 10, 10)
    if not signed:
        x = x.relu()
    fq_cpu = DAQFakeQuantize("activation", 4)
    fq_cpu(x)                                    # first batch on the CPU
    fq_gpu = copy.deepcopy(fq_cpu).to(CUDA)
    n = fq_cpu.num_levels
    with torch.no_grad():
        lo, hi = fq_cpu.activation_grid()
        t = (x.double() - lo.double()) / ((hi.double() - lo.double()) / n)
        mask = _away_from_ties(t, n)
    _codes_match(fq_cpu.integers(x), fq_gpu.integers(x.to(CUDA)), mask)
    g = _grad_y(x.shape)
    _, gx_c, gp_c = _run(fq_cpu, x, g)
    _, gx_g, gp_g = _run(fq_gpu, x.to(CUDA), g)
    _elementwise_close(gx_c, gx_g, mask, "grad x", _dasr_rtol(t, fq_cpu.sigma))
    terms = 2 * (gx_c.abs().sum() + 2 * g.abs().sum())
    assert set(gp_c) == set(gp_g)
    for name in gp_c:
        _param_close(gp_c[name], gp_g[name], terms, name)


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_fx_first_batch_on_cuda_keeps_state_on_cuda(role):
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 3, 3) if role == "weight" else torch.randn(4, 8, 6, 6)).to(CUDA)
    for cls in (DAQFakeQuantize, N2UQFakeQuantize):
        fq = cls(role, 4, ch_axis=0 if role == "weight" else None).to(CUDA)
        y = fq(x.requires_grad_(True))
        y.sum().backward()
        _state_on(fq, CUDA.type)
        assert bool(torch.isfinite(y).all()) and y.device.type == CUDA.type
        scale, zero_point = fq.calculate_qparams()
        assert scale.device.type == CUDA.type and zero_point.device.type == CUDA.type


# ----------------------------------------------------------------------------------------------
# N2UQ
# ----------------------------------------------------------------------------------------------

def test_n2uq_core_matches_cpu():
    torch.manual_seed(0)
    bits, n = 3, 7
    x = torch.randn(4096) * 1.5
    start, widths, scale = torch.tensor(-0.9), torch.rand(n) * 0.3 + 0.1, torch.tensor(1.3)
    bounds = start + torch.cat([torch.zeros(1), torch.cumsum(widths, 0)])
    mids = 0.5 * (bounds[:-1] + bounds[1:])
    # away from the thresholds (segment midpoints) and the segment boundaries (where the G-STE slope jumps)
    edges = torch.cat([mids, bounds])
    mask = ((x[:, None] - edges[None]).abs() > TIE_TOL * 0.3).all(1)
    g = _grad_y(x.shape)
    out = {}
    for key, dev in DEVICES.items():
        xd = _leaf(x, dev)
        s, a, c = (_leaf(v, dev) for v in (start, widths, scale))
        y = daq_core.n2uq_activation(xd, s, a, c, bits=bits)
        y.backward(g.to(dev))
        out[key] = (y.detach(), xd.grad, s.grad, a.grad, c.grad)
    step = scale * 2 / n
    _codes_match(torch.round(out["cpu"][0] / step).long(), torch.round(out["cuda"][0] / step.to(CUDA)).long(), mask)
    _elementwise_close(out["cpu"][1], out["cuda"][1], mask, "N2UQ grad x")
    terms = out["cpu"][1].abs().sum() * 4 + g.abs().sum() * 2
    for i, name in ((2, "start"), (3, "widths"), (4, "scale")):
        _param_close(out["cpu"][i], out["cuda"][i], terms, name)
    # weights: clipped STE on the per-channel grid
    w = torch.randn(16, 8, 3, 3)
    wy = {}
    for key, dev in DEVICES.items():
        wd = _leaf(w, dev)
        y = daq_core.n2uq_weight(wd, bits, ch_axis=0)
        y.backward(_grad_y(w.shape).to(dev))
        wy[key] = (y.detach(), wd.grad)
    alpha = daq_core.n2uq_weight_alpha(w, bits, 0)
    u = (w / alpha + 1.0) * (n / 2.0)
    wmask = _away_from_ties(u, n) & ((w.abs() - alpha).abs() > TIE_TOL * alpha)
    _codes_match(torch.round(wy["cpu"][0] / alpha * n).long(), torch.round(wy["cuda"][0] / alpha.to(CUDA) * n).long(),
                 wmask)
    _elementwise_close(wy["cpu"][1], wy["cuda"][1], wmask, "N2UQ grad w")


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_fx_n2uq_matches_cpu(role):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 3, 3) * 0.1 if role == "weight" else torch.randn(8, 16, 10, 10)
    fq_cpu = N2UQFakeQuantize(role, 4, ch_axis=0 if role == "weight" else None)
    fq_cpu(x)
    fq_gpu = copy.deepcopy(fq_cpu).to(CUDA)
    with torch.no_grad():
        if role == "weight":
            alpha = fq_cpu.alpha.reshape(-1, 1, 1, 1).double()
            n = fq_cpu.num_levels
            u = (x.double() / alpha + 1.0) * (n / 2.0)
            mask = _away_from_ties(u, n) & ((x.double().abs() - alpha).abs() > TIE_TOL * alpha)
        else:
            edges = torch.cat([fq_cpu.thresholds().reshape(-1), fq_cpu.start.reshape(1) +
                               torch.cat([torch.zeros(1), torch.cumsum(fq_cpu.widths.clamp_min(1e-6), 0)])])
            mask = ((x.reshape(-1, 1) - edges.reshape(1, -1)).abs() > TIE_TOL * 0.1).all(1).reshape(x.shape)
    _codes_match(fq_cpu.integers(x), fq_gpu.integers(x.to(CUDA)), mask)
    g = _grad_y(x.shape)
    _, gx_c, gp_c = _run(fq_cpu, x, g)
    _, gx_g, gp_g = _run(fq_gpu, x.to(CUDA), g)
    _elementwise_close(gx_c, gx_g, mask, "N2UQ grad x")
    terms = gx_c.abs().sum() * 10 + 2 * g.abs().sum()
    for name in gp_c:
        _param_close(gp_c[name], gp_g[name], terms, name)


# ----------------------------------------------------------------------------------------------
# CPQ
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["weight", "activation"])
def test_fx_cpq_matches_cpu(role):
    """Fixed bits, DropBits off: the same codes away from ties, the multi-class STE's gradients to 1e-5."""
    from daq_fx import CPQFakeQuantize

    torch.manual_seed(0)
    x = torch.randn(16, 8, 3, 3) * 0.1 if role == "weight" else torch.randn(8, 16, 10, 10).relu()
    fq_cpu = CPQFakeQuantize(role, 4, ch_axis=0 if role == "weight" else None, drop_rate=0.0)
    fq_cpu(x)                                           # first batch: the step, on the CPU
    fq_gpu = copy.deepcopy(fq_cpu).to(CUDA)
    step = fq_cpu.family.effective_step(fq_cpu).detach()
    step = step.reshape(-1, 1, 1, 1) if step.numel() > 1 else step
    lo, hi = fq_cpu.family.int_range(fq_cpu) if role == "weight" else (0, 15)
    t = x.double() / step.double()
    mask = _away_from_ties(t) & ((t - lo).abs() > TIE_TOL) & ((t - hi).abs() > TIE_TOL) | (t == 0)
    with torch.no_grad():
        codes_cpu = torch.round(fq_cpu(x) / step).long()
        codes_gpu = torch.round(fq_gpu(x.to(CUDA)) / step.to(CUDA)).long()
    _codes_match(codes_cpu, codes_gpu, mask)
    g = _grad_y(x.shape)
    _, gx_c, gp_c = _run(fq_cpu, x, g)
    _, gx_g, gp_g = _run(fq_gpu, x.to(CUDA), g)
    _elementwise_close(gx_c, gx_g, mask, "CPQ grad x")
    assert set(gp_c) == set(gp_g) and "log_step" in gp_c
    terms = (gx_c.abs() * x.abs()).sum() * 10 + 16 * g.abs().sum() * step.max()
    for name in gp_c:
        _param_close(gp_c[name], gp_g[name], terms / step.min(), name)


def test_fx_cpq_learned_bits_train_on_cuda():
    """Learned bit-widths on the GPU: state and gates on the input's device, DropBits keeps nested
    grid points only, the gates get gradients, eval drops nothing beyond the read-out."""
    from daq_fx import CPQFakeQuantize

    torch.manual_seed(0)
    x = torch.randn(8, 16, 10, 10, device=CUDA).relu()
    fq = CPQFakeQuantize("activation", 8, learn_bits=True, drop_rate=0.3).to(CUDA)
    y = fq(x.requires_grad_(True))                      # first batch on the GPU: initialises there
    _state_on(fq, CUDA.type)
    assert y.device.type == CUDA.type
    step = fq.family.effective_step(fq).detach()
    codes = torch.round(y.detach() / step)
    assert bool(torch.allclose(codes * step, y.detach(), rtol=0, atol=1e-6 * float(step)))
    # each element sits on the grid of its own drop count d (codes divisible by 2^d) and the draw
    # differs between elements: some codes are odd (d = 0), some are not (coarser grids)
    odd = codes.remainder(2) == 1
    assert 0 < float(odd.float().mean()) < float((codes > 0).float().mean())
    (y * _grad_y(y.shape).to(CUDA)).sum().backward()
    assert fq.gate_logits.grad is not None and fq.gate_logits.grad.device.type == CUDA.type
    assert bool(torch.isfinite(fq.gate_logits.grad).all()) and bool((fq.gate_logits.grad != 0).any())
    fq.eval()
    with torch.no_grad():
        y_eval = fq(x)
        again = fq(x)
    assert torch.equal(y_eval, again)                   # no random drops in eval
    scale, zero_point = fq.calculate_qparams()
    assert scale.device.type == CUDA.type and zero_point.device.type == CUDA.type


# ----------------------------------------------------------------------------------------------
# daq_brevitas
# ----------------------------------------------------------------------------------------------

def _brevitas():
    return pytest.importorskip("brevitas.nn", reason="brevitas is not installed: pip install -e .")


def test_brevitas_weight_quantizer_matches_cpu():
    qnn = _brevitas()
    from daq_brevitas import DAQWeightPerChannel, DAQWeightScaling
    torch.manual_seed(0)
    conv = qnn.QuantConv2d(8, 16, 3, weight_quant=DAQWeightPerChannel, weight_bit_width=4, bias=False)
    conv(torch.randn(4, 8, 10, 10))                  # first batch on the CPU
    conv_gpu = copy.deepcopy(conv).to(CUDA)
    scaling = next(m for m in conv.modules() if isinstance(m, DAQWeightScaling))
    n = 15
    with torch.no_grad():
        w_hat = scaling.normalize(conv.weight).double()
        lo, hi = scaling.lower.double().reshape(-1, 1, 1, 1), scaling.upper.double().reshape(-1, 1, 1, 1)
        t = (w_hat - lo) / ((hi - lo) / n)
        mask = _away_from_ties(t, n)
    # the quantized weight itself (no convolution: its GPU reduction order is not what is tested here)
    g = _grad_y(conv.weight.shape)
    out = {}
    for dev, m in (("cpu", conv), ("cuda", conv_gpu)):
        m.zero_grad(set_to_none=True)
        qw = m.quant_weight()
        qw.value.backward(g.to(DEVICES[dev]))
        codes = torch.round(qw.value.detach() / qw.scale.detach() + qw.zero_point.detach()).long()
        out[dev] = (codes, {k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    _codes_match(out["cpu"][0], out["cuda"][0], mask)
    grads_c, grads_g = out["cpu"][1], out["cuda"][1]
    assert set(grads_c) == set(grads_g) and "weight" in grads_c and len(grads_c) >= 3, sorted(grads_c)
    _elementwise_close(grads_c["weight"], grads_g["weight"], mask, "grad weight",
                       _dasr_rtol(t, daq_core.DEFAULT_WEIGHT_SIGMA))
    rms = conv.weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
    terms = 2 * (grads_c["weight"].abs().sum(dim=(1, 2, 3)) * rms + 3 * g.abs().sum(dim=(1, 2, 3)))
    for k in grads_c:
        if k != "weight":
            _param_close(grads_c[k], grads_g[k], terms.reshape(grads_c[k].shape) if grads_c[k].numel() == 16
                         else terms.sum(), k)


@pytest.mark.parametrize("signed", [True, False])
def test_brevitas_activation_quantizer_matches_cpu(signed):
    qnn = _brevitas()
    from daq_brevitas import DAQActPerTensor, DAQActScaling, DAQSignedActPerTensor
    torch.manual_seed(0)
    x = torch.randn(8, 16, 10, 10)
    if signed:
        q = qnn.QuantIdentity(act_quant=DAQSignedActPerTensor, bit_width=4, return_quant_tensor=False)
    else:
        x = x.relu()
        q = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=4, return_quant_tensor=False)
    q.train()
    q(x)                                             # first batch on the CPU
    q_gpu = copy.deepcopy(q).to(CUDA)
    scaling = next(m for m in q.modules() if isinstance(m, DAQActScaling))
    n = 15
    lo, hi = float(scaling.lower.detach()), float(scaling.upper.detach())
    step = (hi - lo) / n
    src = x.double()
    t = (src - lo) / step
    mask = _away_from_ties(t, n)
    g = _grad_y(x.shape)
    _, gx_c, gp_c = _run(q, x, g)
    y_c = q(x).detach()
    _, gx_g, gp_g = _run(q_gpu, x.to(CUDA), g)
    y_g = q_gpu(x.to(CUDA)).detach()
    _codes_match(torch.round((y_c - lo) / step).long(), torch.round((y_g - lo) / step).long(), mask)
    _elementwise_close(gx_c, gx_g, mask, "grad x", _dasr_rtol(t, daq_core.DEFAULT_ACT_SIGMA))
    terms = 2 * (gx_c.abs().sum() + 2 * g.abs().sum())
    assert set(gp_c) == set(gp_g)
    for name in gp_c:
        _param_close(gp_c[name], gp_g[name], terms, name)


def test_brevitas_first_batch_on_cuda_keeps_state_on_cuda():
    qnn = _brevitas()
    from daq_brevitas import DAQActPerTensor, DAQWeightPerChannel, N2UQActPerTensor, N2UQWeightPerChannel
    torch.manual_seed(0)
    x = torch.randn(4, 8, 10, 10, device=CUDA)
    for wq, aq in ((DAQWeightPerChannel, DAQActPerTensor), (N2UQWeightPerChannel, N2UQActPerTensor)):
        model = nn.Sequential(qnn.QuantConv2d(8, 16, 3, weight_quant=wq, weight_bit_width=4, bias=False),
                              qnn.QuantReLU(act_quant=aq, bit_width=4, return_quant_tensor=False)).to(CUDA)
        y = model(x)
        y.sum().backward()
        _state_on(model, CUDA.type)
        assert bool(torch.isfinite(y).all())


# ----------------------------------------------------------------------------------------------
# compiled kernels (daq_core.use_compiled_kernels: torch.compile'd element-wise kernels)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(_DEVICE != "cuda", reason="dry run on the CPU: the compiled kernels are tested on CUDA only")
def test_compiled_kernels_on_cuda_match_eager():
    torch.manual_seed(0)
    bits, n = 4, 15
    x = torch.randn(8, 32, 32, 32, device=CUDA)          # >= COMPILE_MIN_NUMEL: takes the compiled path
    assert x.numel() >= daq_core.quantizers.COMPILE_MIN_NUMEL
    lo, hi = torch.tensor(-1.2, device=CUDA), torch.tensor(2.1, device=CUDA)
    w = torch.randn(256, 64, 3, 3, device=CUDA) * 0.05   # per-channel weights, also >= the threshold
    wl, wu, ws = (torch.full((256,), v, device=CUDA) for v in (-2.5, 2.5, 0.1))
    g_x, g_w = _grad_y(x.shape).to(CUDA), _grad_y(w.shape).to(CUDA)

    def act():
        xd, l, u = x.clone().requires_grad_(True), lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
        y = daq_core.fake_quantize_activation(xd, l, u, bits)
        y.backward(g_x)
        return y.detach(), xd.grad, l.grad, u.grad

    def weight():
        wd = w.clone().requires_grad_(True)
        l, u, s = (v.clone().requires_grad_(True) for v in (wl, wu, ws))
        w_hat = daq_core.normalize_weight(wd, 0, center=False)
        y = daq_core.fake_quantize_weight(w_hat, l, u, s, bits, ch_axis=0, standardize_input=False)
        y.backward(g_w)
        return y.detach(), wd.grad, l.grad, u.grad, s.grad

    was = daq_core.compiled_kernels_enabled()
    try:
        daq_core.use_compiled_kernels(False)
        eager_a, eager_w = act(), weight()
        assert daq_core.use_compiled_kernels(True), "torch.compile is not available on this machine"
        comp_a, comp_w = act(), weight()
        assert daq_core.compiled_kernels_enabled(), "the compiled kernels failed and fell back to eager"
    finally:
        daq_core.use_compiled_kernels(was)
    step = (hi - lo) / n
    t = (x - lo) / step
    mask = _away_from_ties(t, n)
    _codes_match(torch.round((eager_a[0] - lo) / step).long().cpu(), torch.round((comp_a[0] - lo) / step).long(),
                 mask)
    _elementwise_close(eager_a[1].cpu(), comp_a[1], mask, "compiled grad x", _dasr_rtol(t, daq_core.DEFAULT_ACT_SIGMA))
    terms = 2 * (eager_a[1].abs().sum().cpu() + 2 * g_x.abs().sum().cpu())
    _param_close(eager_a[2].cpu(), comp_a[2], terms, "compiled grad lower")
    _param_close(eager_a[3].cpu(), comp_a[3], terms, "compiled grad upper")
    w_hat = daq_core.normalize_weight(w, 0, center=False)
    wt = (w_hat - wl.reshape(-1, 1, 1, 1)) / ((wu - wl).reshape(-1, 1, 1, 1) / n)
    wmask = _away_from_ties(wt, n)
    qstep = (ws / n).reshape(-1, 1, 1, 1)
    _codes_match(torch.round(eager_w[0] / qstep).long().cpu(), torch.round(comp_w[0] / qstep).long(), wmask)
    _elementwise_close(eager_w[1].cpu(), comp_w[1], wmask, "compiled grad weight",
                       _dasr_rtol(wt, daq_core.DEFAULT_WEIGHT_SIGMA))
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt()
    wterms = 2 * (eager_w[1].abs().sum(dim=(1, 2, 3)) * rms + 3 * g_w.abs().sum(dim=(1, 2, 3))).cpu()
    for i, name in ((2, "lower"), (3, "upper"), (4, "scale")):
        _param_close(eager_w[i].cpu(), comp_w[i], wterms, f"compiled grad {name}")


# ----------------------------------------------------------------------------------------------
# QAT on CUDA, convert on the CPU
# ----------------------------------------------------------------------------------------------

class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def test_fx_prepare_qat_on_cuda_then_convert_on_cpu():
    torch.manual_seed(0)
    model = _TinyNet().to(CUDA)
    example = (torch.randn(2, 3, 12, 12, device=CUDA),)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", weight_bits=4, act_bits=4)
    qat = daq_fx.prepare_qat_fx(model, mapping, example)
    _state_on(qat, CUDA.type)
    qat.train()
    qat(torch.randn(16, 3, 12, 12, device=CUDA))           # first batch: activation bounds, on the GPU
    _state_on(qat, CUDA.type)
    quant, rest = daq_fx.quantizer_parameters(qat)
    opt = torch.optim.SGD([{"params": rest, "lr": 1e-2, "momentum": 0.9}, {"params": quant, "lr": 1e-3}])
    for _ in range(3):
        x = torch.randn(8, 3, 12, 12, device=CUDA)
        loss = nn.functional.cross_entropy(qat(x), torch.randint(0, 5, (8,), device=CUDA))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert bool(torch.isfinite(loss))
    _state_on(qat, CUDA.type)
    x = torch.randn(32, 3, 12, 12)
    qat.eval()
    with torch.no_grad():
        on_gpu = qat(x.to(CUDA)).cpu()
    if CUDA.type == "cuda":                                 # (not in the CPU dry run)
        with pytest.raises(ValueError, match="move the trained QAT model to the CPU"):
            daq_fx.convert_fx(qat)                          # still on the GPU: a clear error
    qat_cpu = copy.deepcopy(qat).cpu()                      # torch.ao converts on the CPU (example inputs
    #                                                         recorded on the GPU by prepare are moved too)
    with torch.no_grad():
        expected = qat_cpu(x)
    int8 = daq_fx.convert_fx(qat_cpu)
    with torch.no_grad():
        got = int8(x)
    # the same model on the GPU: equal up to activation codes flipped at near-ties by float differences
    assert nn.functional.cosine_similarity(on_gpu.flatten(), expected.flatten(), dim=0) > 0.99
    assert (got - expected).abs().max() < 1e-4 * (expected.abs().max() + 1)
    ints = int8.get_submodule("conv1").weight().int_repr().to(torch.int32)
    assert bool((ints.abs() <= 15).all()) and bool((ints.remainder(2) == 1).all())


# ----------------------------------------------------------------------------------------------
# one recipe training step on CUDA under DDP (torchrun, 1 process, nccl)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(_DEVICE != "cuda", reason="dry run on the CPU: nccl needs CUDA")
def test_recipe_step_on_cuda_with_ddp_one_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from recipe_helpers import base_args, make_image_folder, run_recipe
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = base_args(data, out, "--device", "cuda", "--float-epochs", "0", "--epochs", "1",
                     "--max-steps-per-epoch", "2")
    res = run_recipe("recipes.resnet20_cifar10", args, torchrun_procs=1, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DDP (nccl), 1 process(es)" in res.stdout, res.stdout[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 1 and report["distributed"] == "nccl"
    assert report["device"].startswith("cuda")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    qat = [r for r in records if r["stage"] == "qat"]
    assert qat and qat[-1]["step"] == 2 and qat[-1]["train_loss"] == qat[-1]["train_loss"]   # finite, not NaN
    assert report["int_acc"] is not None          # converted on the CPU after training on the GPU
