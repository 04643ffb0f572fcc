"""DAQ on torchao's pt2e flow (issue 8): export → prepare_qat_pt2e → train → convert_pt2e.

(a) the int8 weights of the converted model lie on DAQ's grid (odd integers within ±(2^b - 1))
    and equal the integers of the fake-quantized weight;
(b) the converted (q/dq) model reproduces the QAT model in eval;
(c) the FX flow (``daq_fx.prepare_qat_fx``) and the pt2e flow compute the same function when
    their quantizers hold the same parameters;
plus the x86 lowering (oneDNN int8 kernels), checked in a subprocess first because some CPUs
die of "Illegal instruction" there (see ``daq_fx.pt2e.check_x86_lowering``).

Skipped without torchao (``pip install 'daq-quant[pt2e]'``).
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.quantization.pt2e",
                    reason="torchao is not installed: the pt2e flow needs pip install 'daq-quant[pt2e]'"
                           " (torchao>=0.15,<0.19)")

import daq_fx  # noqa: E402
from daq_fx import DAQFakeQuantize  # noqa: E402
from daq_fx import pt2e  # noqa: E402

from ._models import agreement, bit_exact_fraction, calibrate_batchnorm  # noqa: E402

#: 32: the last feature map is 1x1 (an odd count for the global average pool: with an even count,
#: float and integer averages round exact ties differently, see daq_fx.AveragedActivation). At 96x96
#: (3x3) the same tests measured converted-vs-QAT cosine 0.980 (mobilenetv2) / 0.954 (resnet18):
#: random-init 4-bit networks amplify the rare one-code flips where float error decides a near-tie
#: differently in the QAT and the q/dq model, and larger inputs have more of them per sample.
SIZE = 32
#: small-net input: 9x9 after the max pool, an odd count for the global average
SMALL = 18


class _SmallNet(nn.Module):
    """Conv-BN-ReLU6, depthwise Conv-BN + residual add + ReLU, max pool, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        x = self.conv3(self.pool(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _train(qat, make_input, num_classes, steps):
    quant, rest = daq_fx.quantizer_parameters(qat)
    assert quant and rest
    sgd = torch.optim.SGD(rest, lr=1e-3, momentum=0.9)
    adam = torch.optim.Adam(quant, lr=1e-4)
    for _ in range(steps):
        x = make_input()
        loss = nn.functional.cross_entropy(qat(x), torch.randint(0, num_classes, (x.shape[0],)))
        sgd.zero_grad()
        adam.zero_grad()
        loss.backward()
        sgd.step()
        adam.step()
        assert torch.isfinite(loss)
    return qat


def _check_weights_on_grid(qat, converted, weight_bits):
    """(a): ints odd, within ±n, equal to ``fq.integers(W f)``; returns how many were checked."""
    n = 2**weight_bits - 1
    expected = [fq.integers(pt2e._weight(qat, name) if f is None else pt2e._weight(qat, name) * f)
                for name, fq, f in pt2e.weight_fake_quants(qat)]
    got = pt2e.quantized_weights(converted)
    assert len(got) == len(expected) > 0
    for k, (ints, want) in enumerate(zip(got, expected)):
        assert ints.dtype == torch.int8
        ints = ints.to(torch.int32)
        assert bool((ints.abs() <= n).all()), k
        assert bool((ints.remainder(2) == 1).all()), k            # odd: DAQ's grid has no zero
        assert torch.equal(ints, want), k
    return len(got)


# --------------------------------------------------------------------------------------
# fast tests
# --------------------------------------------------------------------------------------

def test_fake_quant_is_the_daq_fake_quant():
    from torchao.quantization.pt2e import FakeQuantizeBase
    fq = pt2e.DAQFakeQuantizePT2E(role="weight", bits=3, ch_axis=0, dtype=torch.int8, quant_min=-7, quant_max=7,
                                  qscheme=torch.per_channel_symmetric)
    assert isinstance(fq, FakeQuantizeBase) and isinstance(fq, DAQFakeQuantize)
    reference = DAQFakeQuantize(role="weight", bits=3, ch_axis=0)
    w = torch.randn(6, 4, 3, 3)
    assert torch.equal(fq(w), reference(w))                      # same numerics, same initialisation
    scale, zero_point = fq.calculate_qparams()
    assert torch.equal(scale, reference.calculate_qparams()[0]) and not zero_point.any()
    with pytest.raises(ValueError, match="quant_max"):
        pt2e.DAQFakeQuantizePT2E(role="weight", bits=3, quant_min=-7, quant_max=127)
    with pytest.raises(ValueError, match="static"):
        pt2e.DAQFakeQuantizePT2E(role="activation", bits=4, is_dynamic=True)


def test_quantizer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pt2e.DAQQuantizer(weight_bits=8)
    with pytest.raises(TypeError, match="list of module names"):
        pt2e.DAQQuantizer(float_module_names="fc")
    with pytest.raises(TypeError, match="export"):
        pt2e.prepare_qat_pt2e(_SmallNet(), pt2e.DAQQuantizer())


@pytest.mark.parametrize("per_channel", [True, False])
def test_small_net_prepare_train_convert(per_channel):
    torch.manual_seed(0)
    model = calibrate_batchnorm(_SmallNet(), lambda: torch.randn(8, 3, SMALL, SMALL))
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, SMALL, SMALL),)),
                                pt2e.DAQQuantizer(4, 4, per_channel=per_channel))
    fqs = {id(m): m for m in qat.modules() if isinstance(m, pt2e.DAQFakeQuantizePT2E)}.values()
    weights = [m for m in fqs if m.is_weight]
    assert len(weights) == 4 and all(m.initialized[0] == 1 for m in weights)     # conv1..3, fc
    assert all((m.lower_bound.numel() > 1) == per_channel for m in weights)
    # x, conv1-bn-relu6, add-relu (max pool and global pool share), conv3, fc; conv2-bn before the add
    assert sum(1 for m in fqs if not m.is_weight) == 6
    assert qat.meta["daq_relu6_caps"] == 1                       # the quantizer after ReLU6 clips at 6
    _train(qat, lambda: torch.randn(8, 3, SMALL, SMALL), 5, steps=3)
    pt2e.move_exported_model_to_eval(qat)
    converted = pt2e.convert_pt2e(qat)
    assert _check_weights_on_grid(qat, converted, 4) == 4
    x = torch.randn(64, 3, SMALL, SMALL)
    with torch.no_grad():
        expected, got = qat(x), converted(x)
    top1, cos = agreement(expected, got)
    assert top1 >= 0.98 and cos >= 0.999, (top1, cos)


class _PaddedNet(nn.Module):
    """Conv-BN-ReLU, then TensorFlow-"SAME" zero padding (timm's Conv2dSame exports to aten.pad) before
    a stride-2 conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(nn.functional.pad(x, (0, 1, 0, 1)))))
        return self.fc(x.mean((2, 3)))


def test_zero_pad_shares_its_input_quantizer():
    """A zero pad adds 0, which lies on the DAQ grid: no second quantizer between the pad and the conv
    (as in FX), and the converted model still matches the QAT model."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(_PaddedNet(), lambda: torch.randn(8, 3, SMALL, SMALL))
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, SMALL, SMALL),)), pt2e.DAQQuantizer(4, 4))
    pad = next(n for n in qat.graph.nodes if n.op == "call_function" and "pad" in str(n.target))
    before, after = pad.args[0], next(iter(pad.users))
    assert before.op == after.op == "call_module"
    assert qat.get_submodule(before.target) is qat.get_submodule(after.target)
    # x, conv1-bn-relu (shared by the pad), conv2-bn-relu (shared by the mean), fc
    activations = {id(m) for m in qat.modules() if isinstance(m, pt2e.DAQFakeQuantizePT2E) and not m.is_weight}
    assert len(activations) == 4
    qat(torch.randn(8, 3, SMALL, SMALL))
    pt2e.move_exported_model_to_eval(qat)
    x = torch.randn(64, 3, SMALL, SMALL)
    with torch.no_grad():
        expected, got = qat(x), pt2e.convert_pt2e(qat)(x)
    top1, cos = agreement(expected, got)
    assert top1 >= 0.98 and cos >= 0.999, (top1, cos)


def test_float_module_names_stay_float():
    torch.manual_seed(0)
    model = calibrate_batchnorm(_SmallNet(), lambda: torch.randn(8, 3, SMALL, SMALL))
    quantizer = pt2e.DAQQuantizer(4, 4, float_module_names=daq_fx.first_and_last_layer_names(model))
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, SMALL, SMALL),)), quantizer)
    assert [name for name, _, _ in pt2e.weight_fake_quants(qat)] == ["conv2.weight", "conv3.weight"]


def test_zero_gamma_is_rejected():
    model = _SmallNet()
    nn.init.zeros_(model.bn2.weight)
    with pytest.raises(ValueError, match=r"'bn2'.*gamma"):
        pt2e.export_for_qat(model, (torch.randn(2, 3, SMALL, SMALL),))


# --------------------------------------------------------------------------------------
# timm models (slow)
# --------------------------------------------------------------------------------------

def _timm_model(name):
    import timm
    torch.manual_seed(0)
    kwargs = dict(zero_init_last=False) if name.startswith("resnet") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return calibrate_batchnorm(model, lambda: torch.randn(8, 3, SIZE, SIZE))


_CACHE = {}


def _pt2e_qat_and_converted(name):
    if name not in _CACHE:
        model = _timm_model(name)
        qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, SIZE, SIZE),)),
                                    pt2e.DAQQuantizer(4, 4))
        _train(qat, lambda: torch.randn(8, 3, SIZE, SIZE), 10, steps=2)
        pt2e.move_exported_model_to_eval(qat)
        _CACHE[name] = (qat, pt2e.convert_pt2e(qat), torch.randn(64, 3, SIZE, SIZE))
    return _CACHE[name]


@pytest.mark.slow
@pytest.mark.parametrize("name,num_weights", [("mobilenetv2_100", 53), ("resnet18", 21)])
def test_timm_weights_on_daq_grid(name, num_weights):
    qat, converted, _ = _pt2e_qat_and_converted(name)
    assert _check_weights_on_grid(qat, converted, 4) == num_weights


#: measured bit-exact sample fractions (converted vs QAT, 64 samples): mobilenetv2 0.89, resnet18 0.67
EXACT_SAMPLES = {"mobilenetv2_100": 0.8, "resnet18": 0.55}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18"])
def test_timm_converted_matches_qat(name):
    """(b) on random-init models: most samples bit-exact.

    Not cosine >= 0.999 here (measured 0.96 for both): where float error makes the QAT model and the
    q/dq model round a near-tie differently (one code, rare), a random-init 4-bit network amplifies
    the flip into a different output; the small network above and the FX flow's trained ResNet-20
    (test_trained_resnet20.py) meet 0.999.
    """
    qat, converted, x = _pt2e_qat_and_converted(name)
    with torch.no_grad():
        expected, got = qat(x), converted(x)
    top1, cos = agreement(expected, got)
    exact = bit_exact_fraction(expected, got)
    print(f"pt2e {name} converted vs QAT: top-1 agreement {top1:.4f}, cosine {cos:.6f},"
          f" bit-exact samples {exact:.4f}, max |diff| {(expected - got).abs().max().item():.3g}")
    assert expected.abs().max() > 0
    assert exact >= EXACT_SAMPLES[name]
    assert cos >= 0.9


def _activation_fake_quants(graph_module):
    """The distinct DAQ activation quantizers in the order the graph first uses them."""
    found, seen = [], set()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, DAQFakeQuantize) and not module.is_weight and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found


@torch.no_grad()
def _copy_quantizer(source: DAQFakeQuantize, target: DAQFakeQuantize):
    assert source.role == target.role and source.bits == target.bits
    for name in ("lower_bound", "upper_bound", "output_scale"):
        if hasattr(source, name):
            target._set_param(name, getattr(source, name).detach().clone())
    target.signed.copy_(source.signed)
    target.initialized.copy_(source.initialized)
    if not source.is_weight:
        target.set_upper_limit(source.upper_limit)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18"])
def test_timm_fx_and_pt2e_agree(name):
    """(c): the same float model, the same first batch, FX's quantizer parameters copied into pt2e."""
    model = _timm_model(name)
    example = (torch.randn(2, 3, SIZE, SIZE),)
    fx_qat = daq_fx.prepare_qat_fx(model, daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4), example)
    pt_qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(copy.deepcopy(model), example), pt2e.DAQQuantizer(4, 4))
    first = torch.randn(8, 3, SIZE, SIZE)
    with torch.no_grad():                 # first-batch initialisation + one BN statistics update, both flows
        fx_qat(first)
        pt_qat(first)
    # weights: by parameter name (FX fuses Conv-BN(-ReLU) into a module named after the conv)
    fx_weights = {f"{module_name}.weight": module.weight_fake_quant for module_name, module in fx_qat.named_modules()
                  if isinstance(getattr(module, "weight_fake_quant", None), DAQFakeQuantize)}
    pt_weights = pt2e.weight_fake_quants(pt_qat)
    assert sorted(fx_weights) == sorted(weight_name for weight_name, _, _ in pt_weights)
    for weight_name, fq, _ in pt_weights:
        assert torch.allclose(fq.output_scale, fx_weights[weight_name].output_scale, rtol=1e-4), weight_name
        _copy_quantizer(fx_weights[weight_name], fq)
    # activations: the same tensors are quantized; pair the quantizers by their (independent) first-batch
    # initialisation, which saw the same data in both flows (graph order differs around residual branches)
    fx_acts, pt_acts = _activation_fake_quants(fx_qat), _activation_fake_quants(pt_qat)
    assert len(fx_acts) == len(pt_acts)
    unused, bound_gap = list(fx_acts), 0.0
    for target in pt_acts:
        def gap(source):
            scale = max(source.upper_bound.abs().item(), 1e-6)
            return (abs(source.upper_bound.item() - target.upper_bound.item())
                    + abs(source.lower_bound.item() - target.lower_bound.item())) / scale
        candidates = [m for m in unused if m.is_unsigned == target.is_unsigned]
        source = min(candidates, key=gap)
        bound_gap = max(bound_gap, gap(source))
        unused.remove(source)
        _copy_quantizer(source, target)
    assert bound_gap < 1e-3
    fx_qat.eval()
    pt2e.move_exported_model_to_eval(pt_qat)
    x = torch.randn(64, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = fx_qat(x), pt_qat(x)
    top1, cos = agreement(a, b)
    diff = (a - b).abs().max().item()
    print(f"{name} FX vs pt2e QAT: {len(pt_acts)} activation + {len(pt_weights)} weight quantizers,"
          f" independent init upper-bound gap {bound_gap:.2e}; top-1 agreement {top1:.4f}, cosine {cos:.6f},"
          f" max |diff| {diff:.3g} (output range {a.abs().max().item():.3g})")
    assert cos >= 0.999 and top1 >= 0.95


# --------------------------------------------------------------------------------------
# lowering to x86 int8 kernels (slow: runs a subprocess, then oneDNN)
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lower_to_x86_small_net():
    import os
    if not os.environ.get(pt2e.ONEDNN_ISA_ENV):
        works, message = pt2e.check_x86_lowering()
        if not works:
            pytest.skip(f"x86 lowering unavailable here: {message}")
    torch.manual_seed(0)
    model = calibrate_batchnorm(_SmallNet(), lambda: torch.randn(8, 3, SMALL, SMALL))
    example = (torch.randn(4, 3, SMALL, SMALL),)
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, example), pt2e.DAQQuantizer(4, 4))
    _train(qat, lambda: torch.randn(8, 3, SMALL, SMALL), 5, steps=2)
    pt2e.move_exported_model_to_eval(qat)
    converted = pt2e.convert_pt2e(qat)
    lowered = pt2e.lower_to_x86(converted, example)
    x = torch.randn(4, 3, SMALL, SMALL)
    with torch.no_grad():
        expected, got = converted(x), lowered(x)
    top1, cos = agreement(expected, got)
    print(f"x86 lowered vs q/dq: top-1 {top1:.3f}, cosine {cos:.6f}, clamps {lowered.meta['daq_activation_clamps']}")
    assert "onednn" in lowered.code
    assert cos >= 0.999
