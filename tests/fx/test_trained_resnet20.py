"""A trained network (CIFAR-10 ResNet-20, shared checkpoint) through DAQ QAT and convert.

Checks what random-init networks cannot show: accuracy right after prepare stays near
float at W4A4 (INTEGRATION-NOTES), and the int8 x86 model meets the issue's agreement
thresholds (top-1 ≥ 99.5 %, cosine ≥ 0.999) on real images. Skips where ../shared/data
is absent (users' checkouts).
"""

import pytest
import torch

import daq_fx

from ._models import agreement

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def _images(shared_data, per_class=40):
    from recipes.data import read_cifar10_archive
    images, labels = read_cifar10_archive(shared_data / "cifar10-jpeg-train.tar.gz", per_class)
    return (images.float() / 255 - MEAN) / STD, labels


@pytest.fixture(scope="module")
def resnet20_and_data(request):
    from pathlib import Path
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (data / "resnet20-cifar10-12fca82f.th").is_file():
        pytest.skip(f"needs {data} (project CI and dev machines)")
    models = pytest.importorskip("recipes.models")
    model = models.create_model("resnet20_cifar", 10)
    models.load_float_checkpoint(model, str(data / "resnet20-cifar10-12fca82f.th"))
    x, y = _images(data)
    return model, x, y


def _accuracy(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("weight_bits,act_bits,min_prepared_accuracy", [(4, 4, 0.55), (2, 2, 0.0), (1, 1, 0.0)])
def test_trained_resnet20(resnet20_and_data, weight_bits, act_bits, min_prepared_accuracy):
    torch.backends.quantized.engine = "x86"
    model, x, y = resnet20_and_data
    model.eval()
    with torch.no_grad():
        float_accuracy = _accuracy(model(x), y)
    assert float_accuracy > 0.8
    model.train()
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", weight_bits, act_bits,
                                                 float_module_names=daq_fx.first_and_last_layer_names(model))
    qat = daq_fx.prepare_qat_fx(model, mapping, (x[:2],))
    with torch.no_grad():
        qat(x[:128])                                        # first batch: bounds
    qat.eval()
    with torch.no_grad():
        expected = qat(x)
    prepared_accuracy = _accuracy(expected, y)
    print(f"W{weight_bits}A{act_bits}: float {float_accuracy:.3f}, right after prepare {prepared_accuracy:.3f}")
    assert prepared_accuracy >= min_prepared_accuracy        # W4A4 measured 0.685 (float 0.848)
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        got = int8(x)
    top1 = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(), 0).item()
    print(f"  int8 x86 vs QAT: top-1 agreement {top1:.4f}, cosine {cos:.6f}")
    assert top1 >= 0.995 and cos >= 0.999


@pytest.fixture(scope="module")
def resnet20_pt2e(resnet20_and_data):
    """bits -> (pt2e QAT model in eval, its outputs on the images, converted q/dq model), built once per
    bit-width for the pt2e tests below (export + prepare take tens of seconds)."""
    pytest.importorskip("torchao.quantization.pt2e",
                        reason="torchao is not installed: pip install 'daq-quant[pt2e]' (torchao>=0.15,<0.19)")
    import copy

    from daq_fx import pt2e
    model, x, _ = resnet20_and_data
    cache = {}

    def get(bits):
        if bits not in cache:
            qmodel = copy.deepcopy(model).train()
            quantizer = pt2e.DAQQuantizer(bits, bits, float_module_names=daq_fx.first_and_last_layer_names(qmodel))
            qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(qmodel, (x[:2],)), quantizer)
            with torch.no_grad():
                qat(x[:128])                                # first batch: bounds
            pt2e.move_exported_model_to_eval(qat)
            with torch.no_grad():
                expected = qat(x)
            cache[bits] = (qat, expected, pt2e.convert_pt2e(qat))
        return cache[bits]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("weight_bits,act_bits", [(4, 4), (2, 2)])
def test_trained_resnet20_pt2e(resnet20_and_data, resnet20_pt2e, weight_bits, act_bits):
    """The same trained network through torchao's pt2e flow: q/dq model vs QAT.

    Measured (400 images, 2 threads, AMD EPYC AVX2): W4A4 top-1 agreement 0.9975, cosine 0.999688,
    96% of samples bit-identical; W2A2 1.0000 / 1.000000. Before averages of codes were rounded alike
    in both models (issue 19: ``AveragedActivationPT2E``, ``exact_averages``; the last feature map is
    8x8, an even count, so its average lands on exact ties k + 1/2) W4A4 measured 0.9900 / 0.998877
    (89% bit-identical) on an AVX512 VM. What remains are near-tie values, rounded one way by the
    float32 QAT model and the other by the q/dq model (see docs/pt2e.md).
    """
    _, x, y = resnet20_and_data
    assert weight_bits == act_bits
    _, expected, converted = resnet20_pt2e(weight_bits)
    with torch.no_grad():
        got = converted(x)
    top1, cos = agreement(expected, got)
    print(f"pt2e W{weight_bits}A{act_bits}: QAT accuracy {_accuracy(expected, y):.3f};"
          f" converted vs QAT: top-1 agreement {top1:.4f}, cosine {cos:.6f}")
    assert expected.abs().max() > 0
    assert top1 >= 0.99 and cos >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 2])
def test_trained_resnet20_compiled_x86(resnet20_and_data, resnet20_pt2e, bits):
    """Compiled int8 (issue 19): torch.compile (Inductor, freezing) of the converted pt2e model, every
    quantized conv a fused oneDNN int8 kernel with its 4-bit clamp as a hardtanh post-op; agreement
    with the QAT model at the issue's thresholds (top-1 >= 0.995, cosine >= 0.999).

    Measured (400 images, 2 threads, AMD EPYC AVX2): W4A4 top-1 0.9975, cosine 0.999699, 96.5% of
    samples bit-identical; W2A2 1.0000 / 0.999943. Compile of the first call ~10-25 s.
    """
    import os
    import time

    from daq_fx import pt2e
    if not os.environ.get(pt2e.ONEDNN_ISA_ENV):
        works, message = pt2e.check_x86_lowering()
        if not works:
            pytest.skip(f"x86 int8 kernels unavailable here: {message}")
    _, x, _ = resnet20_and_data
    _, expected, converted = resnet20_pt2e(bits)
    start = time.perf_counter()
    compiled = pt2e.compile_x86(converted, (x,), check_isa=False)
    got = compiled(x)
    r = daq_fx.output_agreement(expected, got)
    print(f"compiled x86 W{bits}A{bits} vs QAT: top-1 {r['top1']:.4f}, cosine {r['cosine']:.6f}, bit-exact samples"
          f" {r['bit_exact_samples']:.4f}; kernels {compiled.kernels}; compile {compiled.compile_s:.1f} s,"
          f" total {time.perf_counter() - start:.1f} s")
    kernels = compiled.kernels
    # 18 quantized convs run as oneDNN int8 kernels, each clamping its 4-bit output inside the kernel;
    # the first conv and the last linear are float (the paper's layout)
    assert kernels["qconv"] == 18 and kernels["hardtanh_post_ops"] == 18 and compiled.activation_clamps == 18
    assert kernels["float_convs"] == 1
    assert r["top1"] >= 0.995 and r["cosine"] >= 0.999
