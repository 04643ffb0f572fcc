"""End-to-end: timm models through DAQ QAT and convert (issue 3, "Done when").

Each model: W4A4 prepare, a few training steps, eval, convert to x86 int8; then
(a) the int weights lie on the DAQ grid and equal the fake-quantized weight's integers,
(b) the int8 model matches the QAT model (top-1 agreement ≥ 99.5%, cosine ≥ 0.999),
(c) eval outputs do not depend on the rest of the batch (BN uses running statistics).

Random-init networks (no pretrained weights offline) get their BN statistics calibrated
first: with BN's initial statistics some (efficientnet_b0) output ~1e-6 in eval.
"""

import pytest
import torch
from torch import nn

import daq_fx
from daq_fx import DAQFakeQuantize
from daq_fx.prepare import folded_weight

from ._models import agreement, bit_exact_fraction, calibrate_batchnorm

SIZE = 32
#: floors for the bit-exact sample fraction of random-init W4A4 models (the issue's top-1/cosine thresholds
#: are asserted on a trained network: tests/fx/test_trained_resnet20.py). Which near-ties flip depends on
#: the CPU's int8 kernels, so the fraction does too. Measured at the test's seed, 2 threads, for
#: mobilenetv2 / resnet18 / efficientnet_b0 / mobilenetv3 / regnety: on an AVX512-VNNI Intel VM 0.945 /
#: 0.867 / 0.961 / 0.984 / 0.930 (lowest over seeds 0-2: 0.945 / 0.805 / 0.922 / 0.984 / 0.922), on an
#: AMD EPYC VM 0.977 / 0.750 / 0.914 / 0.852 / 0.984 (see docs/fx.md, "Backends"). The bugs these tests
#: caught converted 0-67 % of samples bit-exactly.
#: tf_efficientnet_b0 (TensorFlow "SAME" padding, timm's Conv2dSame → daq_fx.static_same_padding): 1.000 (AMD).
EXACT_SAMPLES = {"mobilenetv2_100": 0.9, "resnet18": 0.7, "efficientnet_b0": 0.85,
                 "mobilenetv3_large_100": 0.8, "regnety_002": 0.85, "tf_efficientnet_b0": 0.85}
MODELS = ["mobilenetv2_100", "resnet18", "efficientnet_b0", "mobilenetv3_large_100", "regnety_002",
          "tf_efficientnet_b0"]


def _qat_model(name, weight_bits=4, act_bits=4, steps=2):
    import timm
    torch.manual_seed(0)
    kwargs = dict(zero_init_last=False) if name.startswith(("resnet", "regnet")) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    calibrate_batchnorm(model, lambda: torch.randn(16, 3, SIZE, SIZE))
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", weight_bits, act_bits)
    qat = daq_fx.prepare_qat_fx(model, mapping, (torch.randn(2, 3, SIZE, SIZE),))
    quant, rest = daq_fx.quantizer_parameters(qat)
    opt = torch.optim.SGD([{"params": rest, "lr": 1e-3, "momentum": 0.9}, {"params": quant, "lr": 1e-4}])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(qat(torch.randn(8, 3, SIZE, SIZE)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    return qat.eval()


def _check_weights_on_grid(qat, int8, weight_bits):
    n = 2**weight_bits - 1
    checked = 0
    for name, module in qat.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, DAQFakeQuantize):
            continue
        ints = int8.get_submodule(name).weight().int_repr().to(torch.int32)
        assert bool((ints.abs() <= n).all()), name
        assert bool((ints.remainder(2) == 1).all()), name           # odd: DAQ's grid has no zero
        assert torch.equal(ints, fq.integers(folded_weight(module))), name
        checked += 1
    assert checked > 0
    return checked


_CACHE = {}


def _qat_and_int8(name):
    if name not in _CACHE:
        torch.backends.quantized.engine = "x86"
        qat = _qat_model(name)
        _CACHE[name] = (qat, daq_fx.convert_fx(qat), torch.randn(128, 3, SIZE, SIZE))
    return _CACHE[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_w4a4_timm_model_grid_and_eval_batchnorm(name):
    """(a) int weights on the DAQ grid and equal to the fake-quant integers; (c) eval BN."""
    qat, int8, x = _qat_and_int8(name)
    _check_weights_on_grid(qat, int8, 4)
    other = torch.cat([x[:4], 5 * torch.randn(4, 3, SIZE, SIZE)])
    with torch.no_grad():
        for model in (qat, int8):
            assert torch.allclose(model(other)[:4], model(x)[:4], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_w4a4_timm_model_int8_matches_qat(name):
    """(b) on random-init models: most samples bit-exact (the issue's batch thresholds are
    checked on a trained network in test_trained_resnet20.py)."""
    qat, int8, x = _qat_and_int8(name)
    with torch.no_grad():
        expected, got = qat(x), int8(x)
    top1, cos = agreement(expected, got)
    exact_samples = bit_exact_fraction(expected, got)
    print(f"{name}: bit-exact samples {exact_samples:.4f}, top-1 agreement {top1:.4f}, cosine {cos:.6f},"
          f" clamps {int8.meta['daq_activation_clamps']}")
    assert expected.abs().max() > 0          # not a degenerate all-zero output
    # Samples that are not bit-exact contain a rare (~1e-5 per activation) one-code flip where float
    # (QAT) and integer (x86) arithmetic round a near-tie differently; random-init 4-bit networks
    # amplify such a flip to a different output.
    assert exact_samples >= EXACT_SAMPLES[name]


@pytest.mark.slow
@pytest.mark.parametrize("weight_bits,act_bits", [(2, 2), (1, 4)])
def test_low_bit_mobilenetv2(weight_bits, act_bits):
    """W2A2 and binary (1-bit) weights: ints ±1 / ±1, ±3, and the int8 model reproduces the QAT model.

    Random-init: most samples bit-exact (measured at this seed: W2A2 0.992, W1A4 1.000 of 128); the
    issue's top-1/cosine thresholds at W2A2 and W1A1 are asserted on the trained ResNet-20
    (test_trained_resnet20.py).
    """
    torch.backends.quantized.engine = "x86"
    qat = _qat_model("mobilenetv2_100", weight_bits, act_bits, steps=1)
    int8 = daq_fx.convert_fx(qat)
    assert _check_weights_on_grid(qat, int8, weight_bits) == 53
    x = torch.randn(128, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = qat(x), int8(x)
    top1, cos = agreement(expected, got)
    exact_samples = bit_exact_fraction(expected, got)
    print(f"W{weight_bits}A{act_bits}: bit-exact samples {exact_samples:.4f}, top-1 {top1:.4f}, cosine {cos:.6f}")
    assert expected.abs().max() > 0
    assert exact_samples >= 0.9


@pytest.mark.slow
def test_timm_zero_init_last_is_detected():
    import timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)   # zero_init_last=True
    with pytest.raises(ValueError, match=r"(?s)'layer1\.0\.bn2'.*zero_init_last=False"):
        daq_fx.prepare_qat_fx(model, daq_fx.get_daq_qat_qconfig_mapping(), (torch.randn(1, 3, 32, 32),))


@pytest.mark.slow
def test_batchnormact_is_replaced_and_fused():
    import timm
    from torch.ao.nn.intrinsic.qat import ConvBnReLU2d
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)
    qat = daq_fx.prepare_qat_fx(model, daq_fx.get_daq_qat_qconfig_mapping(), (torch.randn(1, 3, 32, 32),))
    assert isinstance(qat.conv_stem, ConvBnReLU2d)             # Conv + BatchNormAct2d(ReLU6) fused
    assert "batch_norm" not in qat.code                         # no frozen F.batch_norm(training=True)
    capped = [m for m in qat.modules() if isinstance(m, DAQFakeQuantize) and m.upper_limit == 6.0]
    assert len(capped) == 35                                    # every former ReLU6 still clips at 6


#: issue 18, a sweep over 30 timm families (``python -m benchmarks.timm_sweep``): the four that failed,
#: created as a user would (random init). vgg11_bn's head (timm's ConvMlp: 512 -> 4096 channels,
#: 7x7, 103M weights) is narrowed with ``mlp_ratio=1/64`` to keep the test in seconds; the head's
#: class and its shape-dependent forward are the same (the full model runs in the sweep).
ISSUE18_MODELS = {
    "ghostnet_100": ({}, 64),                     # F.dropout(training=self.training) in forward_head
    "resnet18_drop_rate": (dict(drop_rate=0.2, zero_init_last=False), 32),
    "convnext_atto": ({}, 32),                    # layer scale 1e-6: first-batch ranges ~1e-7
    "vgg11_bn": (dict(mlp_ratio=1 / 64), 32),     # ConvMlp: control flow on the input size
}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(ISSUE18_MODELS))
def test_issue18_timm_models(key):
    """prepare, 2 QAT steps with the recommended optimizers (Adam lr 1e-4 for l, u, s: DAQ-SPEC §6),
    eval deterministic and batch-independent, convert, weights on the grid. Before the fixes:
    ghostnet / resnet18(drop_rate) differed between two eval calls, convnext_atto failed at the second
    step (``lower must be < upper``), vgg11_bn failed in prepare (DAQPrepareError, ConvMlp)."""
    import warnings

    import timm

    import daq_core

    kwargs, size = ISSUE18_MODELS[key]
    name = key.replace("_drop_rate", "")
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", daq_core.DAQInitWarning)
        qat = daq_fx.prepare_qat_fx(model, mapping, (torch.randn(2, 3, size, size),))
        quant, rest = daq_fx.quantizer_parameters(qat)
        sgd = torch.optim.SGD(rest, lr=1e-3, momentum=0.9)
        adam = torch.optim.Adam(quant, lr=1e-4)
        for _ in range(2):
            loss = nn.functional.cross_entropy(qat(torch.randn(8, 3, size, size)), torch.randint(0, 10, (8,)))
            sgd.zero_grad()
            adam.zero_grad()
            loss.backward()
            sgd.step()
            adam.step()
            assert torch.isfinite(loss)
    widened = [str(w.message) for w in caught if issubclass(w.category, daq_core.DAQInitWarning)]
    if name == "convnext_atto":
        assert widened and all("activation_post_process" in m for m in widened)   # named, reported
    qat.eval()
    x = torch.randn(8, 3, size, size)
    other = torch.cat([x[:4], 5 * torch.randn(4, 3, size, size)])
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        expected = qat(x)
        assert torch.equal(expected, qat(x))                                  # no dropout in eval
        assert torch.allclose(qat(other)[:4], expected[:4], atol=1e-5)        # batch-independent
        got = int8(x)
        assert torch.allclose(int8(other)[:4], got[:4], atol=1e-5)
    assert _check_weights_on_grid(qat, int8, 4) > 0
    top1, cos = agreement(expected, got)
    print(f"{key}: {len(widened)} widened first-batch ranges, int8 vs QAT top-1 {top1:.3f}, cosine {cos:.4f},"
          f" bit-exact samples {bit_exact_fraction(expected, got):.3f}")
