"""daq_fx.calibrate_output_scales: data-driven output scales + bias correction (DAQ-SPEC §5)."""

import copy

import pytest
import torch
from torch import nn

import daq_core
import daq_fx

from ._models import TinyNet, calibrate_batchnorm


def test_output_scale_correction_recovers_a_known_affine_error():
    torch.manual_seed(0)
    reference = torch.randn(16, 4, 5, 5)
    ratio = torch.tensor([0.5, 2.0, 1.0, 3.0])
    offset = torch.tensor([0.1, -0.3, 0.0, 2.0])
    quantized = (reference - offset[None, :, None, None]) / ratio[None, :, None, None]
    got_ratio, got_offset = daq_core.output_scale_correction(reference, quantized)
    assert torch.allclose(got_ratio, ratio, atol=1e-5)
    assert torch.allclose(got_offset, offset, atol=1e-5)
    # a dead channel keeps its scale; ratios are clamped
    quantized[:, 2] = 0
    quantized[:, 3] *= 1e-3
    got_ratio, _ = daq_core.output_scale_correction(reference, quantized, max_ratio=4.0)
    assert got_ratio[2] == 1.0 and got_ratio[3] == 4.0


def test_output_scale_correction_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        daq_core.output_scale_correction(torch.randn(2, 3), torch.randn(2, 4))


def _prepared(weight_bits=2, act_bits=4, per_channel=True):
    torch.manual_seed(0)
    model = TinyNet()
    calibrate_batchnorm(model, lambda: torch.randn(32, 3, 8, 8))
    model.eval()
    x = torch.randn(64, 3, 8, 8)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", weight_bits, act_bits, per_channel=per_channel)
    qat = daq_fx.prepare_qat_fx(copy.deepcopy(model), mapping, (x[:2],))
    qat.train()
    with torch.no_grad():
        qat(x)                      # first-batch initialisation
    return model, qat.eval(), x


@pytest.mark.parametrize("per_channel", [True, False])
def test_calibration_brings_the_quantized_network_closer_to_float_and_converts_exactly(per_channel):
    model, qat, x = _prepared(per_channel=per_channel)
    with torch.no_grad():
        reference = model(x)
        before = (qat(x) - reference).pow(2).mean().item()
        names = daq_fx.calibrate_output_scales(qat, x)
        after = (qat(x) - reference).pow(2).mean().item()
    assert names == ["conv1", "conv2", "fc"]
    assert after < 0.7 * before, (before, after)
    # s, biases and BN means are ordinary state: int8 conversion stays exact
    torch.backends.quantized.engine = "x86"
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        assert torch.allclose(int8(x), qat(x), atol=1e-4)


def test_calibration_is_refused_twice_and_needs_inputs():
    _, qat, x = _prepared()
    with pytest.raises(ValueError, match="needs a batch"):
        daq_fx.calibrate_output_scales(qat)
    daq_fx.calibrate_output_scales(qat, x)
    with pytest.raises(ValueError, match="already applied"):
        daq_fx.calibrate_output_scales(qat, x)


def test_calibration_leaves_switches_and_mode_as_they_were():
    _, qat, x = _prepared()
    qat.train()
    flags = {k: v.clone() for k, v in qat.state_dict().items() if k.endswith(("_enabled",))}
    daq_fx.calibrate_output_scales(qat, x)
    assert qat.training
    for k, v in qat.state_dict().items():
        if k in flags:
            assert torch.equal(v, flags[k]), k
