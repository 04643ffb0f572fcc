"""First-batch initialisation shared by both plugins (DAQ-SPEC §3-5)."""

import pytest
import torch

import daq_core as dc


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_mse_weight_init_is_no_worse_than_the_papers_bounds(center, ch_axis):
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 2, 16).view(-1, 1, 1, 1) + 0.05
    errors = {}
    for method in ("std", "mse"):
        lo, hi, s = dc.init_weight_quantizer(w, 3, ch_axis=ch_axis, center=center, method=method)
        axis = ch_axis if lo.numel() > 1 else None
        args = (lo, hi, s) if axis is not None else (lo[0], hi[0], s[0])
        wq = dc.fake_quantize_weight(dc.normalize_weight(w, axis, center), *args, 3, ch_axis=axis,
                                     standardize_input=False)
        errors[method] = (wq - w).pow(2).sum().item()
        assert lo.shape == hi.shape == s.shape == ((16,) if ch_axis == 0 else (1,))
        assert (s > 0).all() and torch.equal(lo, -hi)
    assert errors["mse"] <= errors["std"] + 1e-6
    lo, hi, _ = dc.init_weight_quantizer(w, 3, ch_axis=ch_axis, center=center, method="std")
    assert (hi == 3.0).all()


def test_weight_scale_is_least_squares():
    w = torch.randn(4, 10)
    lo, hi = torch.full((4,), -2.0), torch.full((4,), 2.0)
    s, err = dc.fit_weight_scale(w, lo, hi, 2, ch_axis=0)
    grid = dc.fake_quantize_weight(w, lo, hi, 1.0, 2, ch_axis=0)
    for c in range(4):
        for f in (0.9, 1.1):   # perturbing the scale only increases the error
            assert ((w[c] - f * s[c] * grid[c]) ** 2).sum() > err[c]


def test_uncentred_normalisation_is_rms():
    w = torch.randn(3, 50) + 2.0
    n = dc.normalize_weight(w, 0, center=False)
    assert torch.allclose(n.pow(2).mean(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(dc.normalize_weight(w, 0, center=True).mean(dim=1), torch.zeros(3), atol=1e-5)


def test_activation_init_methods():
    x = torch.relu(torch.randn(20000))
    lo, hi = dc.init_activation_quantizer(x, 4, signed=False, method="std")
    assert lo.item() == 0 and hi.item() == pytest.approx(3 * x.std(unbiased=False).item(), rel=1e-5)
    lo_m, hi_m = dc.init_activation_quantizer(x, 4, signed=False)
    err = lambda l, u: (dc.fake_quantize_activation(x, l, u, 4) - x).pow(2).mean()  # noqa: E731
    assert lo_m.item() == 0 and err(lo_m, hi_m) <= err(lo, hi)
    lo_s, hi_s = dc.init_activation_quantizer(torch.randn(1000), 2, signed=True)
    assert lo_s < 0 < hi_s
    big = torch.randn(1 << 19)
    state = torch.get_rng_state()
    dc.init_activation_quantizer(big, 4, signed=True)
    assert torch.equal(state, torch.get_rng_state()), "initialisation must not consume the global RNG"


def test_init_bad_method():
    with pytest.raises(ValueError, match="init must be 'mse'"):
        dc.init_weight_quantizer(torch.randn(4, 4), 4, method="minmax")


def test_degenerate_activation_range_is_widened_and_reported():
    x = torch.randn(1000) * 1e-7                      # e.g. ConvNeXt's layer scale (1e-6) times its branch
    with pytest.warns(dc.DAQInitWarning, match=r"'q7'.*widened"):
        lo, hi = dc.init_activation_quantizer(x, 4, signed=True, name="'q7'")
    assert float(hi - lo) == pytest.approx(dc.MIN_ACTIVATION_RANGE, rel=1e-5) and lo < 0 < hi
    with pytest.warns(dc.DAQInitWarning):
        lo, hi = dc.init_activation_quantizer(torch.zeros(100), 4, signed=False, method="std")
    assert lo.item() == 0 and hi.item() == pytest.approx(dc.MIN_ACTIVATION_RANGE)


def test_widen_keeps_zero_at_its_place():
    lo, hi, widened = dc.widen_degenerate_range(torch.tensor(-1e-7), torch.tensor(3e-7), 1e-3)
    assert widened and lo.item() == pytest.approx(-2.5e-4) and hi.item() == pytest.approx(7.5e-4)
    lo, hi, widened = dc.widen_degenerate_range(torch.tensor(-1.0), torch.tensor(2.0), 1e-3)
    assert not widened and (lo.item(), hi.item()) == (-1.0, 2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_is_refused_before_initialising(bad):
    x = torch.randn(100)
    x[5] = bad
    with pytest.raises(ValueError, match=r"first batch of 'q1' contains .*(NaN|Inf)"):
        dc.init_activation_quantizer(x, 4, signed=True, name="'q1'")
    w = torch.randn(4, 3, 3, 3)
    w[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"weight of 'conv'.* (NaN|Inf)"):
        dc.init_weight_quantizer(w, 4, ch_axis=0, name="'conv'")
