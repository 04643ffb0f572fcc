"""x86 int8 kernels that saturate (issue 19, part 5): 7-bit DAQ weights with 8-bit activations.

fbgemm's AVX2 kernels (torch.ao's x86 engine on CPUs without AVX512-VNNI, and its depthwise kernels)
add pairs of uint8 x int8 products in saturating int16. ``convert_fx`` computes the layers where
``2 * max_code * max|w| > 32767`` exactly (``daq_fx.ExactQuantizedConv``); the others keep the int8
kernels.
"""

import pytest
import torch
import torch.ao.nn.quantized as nnq

import daq_fx
from daq_fx.convert import INT16_PAIR_LIMIT, ExactQuantizedConv

from ._models import TinyNet, calibrate_batchnorm


def _quantized_conv(weight_bits, groups, channels=32):
    torch.manual_seed(0)
    n = 2 ** weight_bits - 1
    conv = nnq.Conv2d(channels, channels, 3, padding=1, groups=groups)
    w = (torch.randint(0, 2 ** weight_bits, (channels, channels // groups, 3, 3)) * 2 - n).float()
    sw = torch.rand(channels).double() * 0.01 + 0.001
    qw = torch.quantize_per_channel((w * sw.view(-1, 1, 1, 1)).float(), sw, torch.zeros(channels, dtype=torch.long),
                                    0, torch.qint8)
    conv.set_weight_bias(qw, torch.randn(channels) * 0.1)
    conv.scale, conv.zero_point = 0.05, 128
    return conv


@pytest.mark.parametrize("groups", [1, 32])
def test_exact_conv_equals_integer_arithmetic(groups):
    torch.backends.quantized.engine = "x86"
    conv = _quantized_conv(7, groups)
    x = torch.quantize_per_tensor(torch.rand(4, 32, 10, 10) * 5.1, 0.02, 0, torch.quint8)   # codes up to 255
    exact = ExactQuantizedConv(conv, 255, relu=False)
    w = conv.weight()
    acc = torch.nn.functional.conv2d(x.int_repr().double(), w.int_repr().double(), padding=1, groups=groups)
    y = acc * (0.02 * w.q_per_channel_scales().view(1, -1, 1, 1)) + conv.bias().double().view(1, -1, 1, 1)
    reference = torch.clamp(torch.round(y / 0.05) + 128, 0, 255)
    got = exact(x)
    assert got.q_scale() == 0.05 and got.q_zero_point() == 128
    assert (got.int_repr().double() - reference).abs().max() <= 1           # float32 requantisation: ties only
    assert ((got.int_repr().double() - reference) != 0).double().mean() < 1e-3
    kernel = conv(x).int_repr().double()
    print(f"groups={groups}: torch x86 kernel off on {((kernel - reference) != 0).double().mean():.3f} of the"
          f" outputs (max {(kernel - reference).abs().max():.0f} codes); ExactQuantizedConv matches")


@pytest.mark.parametrize("bits,exact_layers", [((7, 8), 3), ((6, 8), 0), ((7, 4), 0), ((4, 4), 0)])
def test_convert_keeps_saturating_layers_off_the_int8_kernels(bits, exact_layers):
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    model = calibrate_batchnorm(TinyNet(), lambda: torch.randn(16, 3, 12, 12))
    qat = daq_fx.prepare_qat_fx(model.train(), daq_fx.get_daq_qat_qconfig_mapping("x86", *bits),
                                (torch.randn(2, 3, 12, 12),))
    with torch.no_grad():
        qat(torch.randn(32, 3, 12, 12))
    qat.eval()
    int8 = daq_fx.convert_fx(qat)
    assert len(int8.meta["daq_exact_layers"]) == exact_layers             # conv1, conv2, fc at W7A8
    assert sum(isinstance(m, ExactQuantizedConv) for m in int8.modules()) == exact_layers
    x = torch.randn(256, 3, 12, 12)
    with torch.no_grad():
        r = daq_fx.output_agreement(qat(x), int8(x))
    assert r["top1"] == 1.0 and r["bit_exact_samples"] >= 0.98, r
    assert 2 * 255 * 127 > INT16_PAIR_LIMIT >= 2 * 255 * 63
