"""Dead channels (BN γ ≈ 0) keep DAQ's odd weight grid through ``daq_fx.convert_fx``.

A channel whose BatchNorm γ is about zero folds to tiny weights, so its DAQ weight step
``|s| / n`` falls below float32 eps. ``calculate_qparams`` reports steps of at least eps (torch.ao's
observer floor) while the forward used to quantize with the true step; torch's lowering then
computed ``round(k · step / eps)``: even codes and zeros (-6, -4, 0, ...) off the odd grid. The
weight quantizers now floor the step at eps in the forward too (``daq_core.floor_weight_scale``;
N2UQ weights ``α ≥ n · eps``), so forward, ``calculate_qparams`` and the int model share one grid.
See docs/fx.md, "Dead channels".
"""

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfig

import daq_core
import daq_fx
from daq_fx.prepare import _fold_shape

EPS = float(torch.finfo(torch.float32).eps)


def _assert_on_grid(codes: torch.Tensor, bits: int, what: str) -> None:
    n = 2 ** bits - 1
    off = ~((codes.abs() <= n) & (codes.remainder(2) == 1))
    if bool(off.any()):
        channels = off.flatten(1).any(1).nonzero().flatten().tolist()
        shown = {c: sorted(set(codes[c].flatten().tolist()))[:12] for c in channels[:4]}
        raise AssertionError(f"{what}: {int(off.sum())} weight codes off the odd grid ±{n} in output channels"
                             f" {channels}; codes there: {shown}")


def _quantized_convs(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, torch.ao.nn.quantized.modules.conv._ConvNd):
            yield name, module


# ------------------------------------------------------------------------ daq_core, fast

def test_floor_weight_scale_values_and_straight_through_gradient():
    scale = torch.tensor([1e-9, -1e-9, 0.0, 0.5, -0.3, 15 * EPS], requires_grad=True)
    floored = daq_core.floor_weight_scale(scale, 4, EPS)
    assert torch.equal(floored.detach(), torch.tensor([15 * EPS, -15 * EPS, 15 * EPS, 0.5, -0.3, 15 * EPS]))
    assert torch.equal(floored.detach()[:3].abs() / 15, torch.full((3,), EPS))   # the step: exactly eps
    weights = torch.arange(1.0, 7.0)
    (floored * weights).sum().backward()
    assert torch.equal(scale.grad, weights)          # straight through, the floor included
    with pytest.raises(ValueError, match="min_step"):
        daq_core.floor_weight_scale(scale, 4, 0.0)


def test_n2uq_weight_alpha_floor():
    w = torch.randn(3, 4, 3, 3)
    w[1] *= 1e-9
    alpha = daq_core.n2uq_weight_alpha(w, 2, 0, EPS).flatten()
    assert alpha[1].item() == 3 * EPS and torch.equal(alpha[[0, 2]], daq_core.n2uq_weight_alpha(w, 2, 0).flatten()[[0, 2]])


@pytest.mark.parametrize("bits", [1, 2, 4, 7])
def test_weight_fake_quant_dead_channel_stays_on_grid(bits):
    """``calculate_qparams`` describes the forward: ``fq(w) / scale`` is odd in every channel."""
    w = torch.randn(6, 8, 3, 3)
    w[2] *= 1e-9                                     # the dead channel: step far below eps
    w[4] *= 1e-6                                     # step near eps (4 bits: ~1e-7)
    fq = daq_fx.DAQFakeQuantize("weight", bits, ch_axis=0)
    fq.initialize(w)
    assert fq.output_scale[2].abs().item() / fq.num_levels < EPS   # the case under test
    scale, zero_point = fq.calculate_qparams()
    assert (scale >= EPS).all() and (zero_point == 0).all()
    assert scale[2].item() == EPS
    k = fq(w) / scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(k, k.round(), atol=1e-4)
    _assert_on_grid(fq.integers(w), bits, "DAQFakeQuantize.integers")
    # healthy channels are untouched by the floor
    healthy = [c for c in range(6) if fq.output_scale[c].abs().item() / fq.num_levels >= EPS]
    assert torch.equal(scale[healthy], (fq.output_scale.detach().abs() / fq.num_levels)[healthy])


class _ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("weights", ["daq", "n2uq"])
@pytest.mark.parametrize("bits", [4, 2])
def test_conv_bn_with_dead_channel_converts_on_grid(bits, weights):
    """A tiny Conv-BN net with γ = 1e-8 in one channel: every int weight odd, int model == QAT model.

    Before the fix the dead channel's codes were round(k · step / eps) = 0 (step ~1e-10).
    """
    torch.backends.quantized.engine = "x86"
    model = _ConvBnNet()
    with torch.no_grad():
        model.bn1.weight[3] = 1e-8
        model.bn2.weight[1] = -1e-8
        for bn in (model.bn1, model.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.normal_(0, 0.1)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", bits, bits)
    if weights == "n2uq":
        mapping.set_global(QConfig(activation=daq_fx.get_daq_qconfig(bits, bits).activation,
                                   weight=daq_fx.get_n2uq_qconfig(bits, bits).weight))
    example = (torch.randn(4, 3, 8, 8),)
    qat = daq_fx.prepare_qat_fx(model, mapping, example)
    qat.eval()            # eval BN: the folded weights use the running statistics set above
    with torch.no_grad():
        qat(torch.randn(16, 3, 8, 8))                  # first batch: activation bounds
    scale, _ = qat.conv1.weight_fake_quant.calculate_qparams()
    assert scale[3].item() == EPS                      # the floor applies to the dead channel
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        expected = qat(x)
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        got = int8(x)
    convs = dict(_quantized_convs(int8))
    assert set(convs) == {"conv1", "conv2"}
    for name, conv in convs.items():
        _assert_on_grid(conv.weight().int_repr().int(), bits, name)
        assert conv.weight().q_per_channel_scales().min().item() >= EPS
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())


# ------------------------------------------------------------------------ trained ResNet-20, slow

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
DEAD = {"layer3.1.conv1": 59, "layer3.2.conv1": 31}   # BN γ 5.6e-6 and 1.2e-6 in the shared checkpoint


@pytest.fixture(scope="module")
def resnet20_and_images():
    from pathlib import Path
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (data / "resnet20-cifar10-12fca82f.th").is_file() or not (data / "cifar10-jpeg-train.tar.gz").is_file():
        pytest.skip(f"needs the shared checkpoint and CIFAR-10 images in {data} (project CI and dev machines)")
    models = pytest.importorskip("recipes.models")
    from recipes.data import read_cifar10_archive
    model = models.create_model("resnet20_cifar", 10)
    models.load_float_checkpoint(model, str(data / "resnet20-cifar10-12fca82f.th"))
    images, _ = read_cifar10_archive(data / "cifar10-jpeg-train.tar.gz", 30)     # 300 real images
    return model, (images.float() / 255 - MEAN) / STD


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 2])
def test_trained_resnet20_dead_channels_keep_the_grid(resnet20_and_images, bits):
    """W4A4 / W2A2: every int weight code of every quantized conv odd in ±(2^b − 1), the dead channels
    included; the floor moves their conv outputs by < 1e-3 of the next activation step; the int model
    agrees with the QAT model on 300 real images.

    On the code before the fix: layer3.1.conv1 channel 59 codes -7 … 7 (evens and 0), layer3.2.conv1
    channel 31 codes -1, 0, 1, 2 (W4A4); W2A2 layer3.2.conv1 channel 31 likewise.
    """
    torch.backends.quantized.engine = "x86"
    source, x = resnet20_and_images
    for name, channel in DEAD.items():
        bn = source.get_submodule(name.replace("conv", "bn"))
        assert abs(bn.weight[channel].item()) < 1e-5, "the checkpoint's dead channels moved"
    model = copy.deepcopy(source).train()
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", bits, bits,
                                                 float_module_names=daq_fx.first_and_last_layer_names(model))
    qat = daq_fx.prepare_qat_fx(model, mapping, (x[:2],))
    with torch.no_grad():
        qat(x[:128])                                                  # first batch: bounds
    qat.eval()

    # the floor's effect, measured where it applies: |conv(input, new − old folded weights)|
    inputs = {}
    hooks = [qat.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: inputs.__setitem__(name, args[0].detach())) for name in DEAD]
    with torch.no_grad():
        expected = qat(x)
    for hook in hooks:
        hook.remove()
    floored = 0
    nodes = {node.target: node for node in qat.graph.nodes if node.op == "call_module"}
    for name in DEAD:
        conv = qat.get_submodule(name)
        fq = conv.weight_fake_quant
        true_step = fq.output_scale.detach().abs() / fq.num_levels
        step = fq.calculate_qparams()[0]
        small = (true_step < EPS).nonzero().flatten()
        floored += len(small)
        if len(small) == 0:
            continue
        assert DEAD[name] in small.tolist() and (step[small] == EPS).all()
        with torch.no_grad():
            folded = conv.weight * daq_fx.weight_fold_factor(conv).reshape(_fold_shape(conv, conv.weight))
            new = fq(folded)[small]                                   # eps · k
            old = new * (true_step / step)[small].reshape(-1, 1, 1, 1)   # the unfloored forward: step · k
            change = nn.functional.conv2d(inputs[name], new - old, None, conv.stride, conv.padding).abs().max()
        user = next(u for u in nodes[name].users if u.op == "call_module")
        act_step = qat.get_submodule(user.target).calculate_qparams()[0].item()
        print(f"W{bits}A{bits} {name} channels {small.tolist()}: step {true_step[small].tolist()} -> {EPS:.3g};"
              f" max |conv output change| {change.item():.3g} = {change.item() / act_step:.2e} of the next"
              f" activation step {act_step:.3g}")
        assert change.item() < 1e-3 * act_step
    assert floored >= 1                                               # the checkpoint exercises the floor

    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        got = int8(x)
    convs = dict(_quantized_convs(int8))
    assert len(convs) == 18                                           # all but the first conv
    for name, conv in convs.items():
        _assert_on_grid(conv.weight().int_repr().int(), bits, f"W{bits}A{bits} {name}")
    agreement = daq_fx.output_agreement(expected, got)
    print(f"W{bits}A{bits} int8 x86 vs QAT on {len(x)} images: {agreement}")
    assert agreement["top1"] >= 0.995 and agreement["cosine"] >= 0.999
