"""The DAQ authors' released ResNet-20 models reproduced by both plugins (DAQ-REFERENCE.md).

An oracle (``daq_reference_oracle.py``) computes the authors' eval forward from the spec's
equations; the float model, ``daq_brevitas`` and ``daq_fx`` QAT models (W1A1, W1A32) and the W1A1
x86 int8 model must predict what it predicts on ≥ 99.9 % of the 5,000 shared CIFAR-10 test images
(slow, needs ``../shared``). The fast tests check the same re-parametrisation on a synthetic
checkpoint (no shared data) and the error messages for wrong files.
"""

from pathlib import Path

import pytest
import torch

from daq_reference_oracle import reference_forward

from recipes import daq_reference as ref
from recipes.models import DAQReferenceResNet, ModelError, create_model

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CKPT = SHARED / "daq-reference"
AGREEMENT = 0.999


# --------------------------------------------------------------------------------------
# synthetic checkpoints (fast, no shared data)
# --------------------------------------------------------------------------------------

def _synthetic_checkpoint(path: Path, act_bits, seed=0) -> Path:
    """A reference-layout checkpoint with random weights, BN statistics and quantizer state."""
    g = torch.Generator().manual_seed(seed)
    model = DAQReferenceResNet(20)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("num_batches_tracked"):
            sd[k] = v
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (0.3 if v.dim() > 1 else 0.1) + (1.0 if k.endswith("bn1.weight") or k.endswith("bn2.weight") else 0.0)
    for name in model.quantized_conv_names():
        sd[f"{name}.lW"] = torch.tensor(-2.5 - 0.5 * torch.rand((), generator=g).item())
        sd[f"{name}.uW"] = torch.tensor(2.5 + 0.5 * torch.rand((), generator=g).item())
        sd[f"{name}.beta"] = torch.tensor(0.05 + 0.1 * torch.rand((), generator=g).item()) * (-1 if seed % 2 else 1)
        if act_bits is None:
            sd[f"{name}.uA"], sd[f"{name}.lA"] = torch.tensor(2.0 ** 31), torch.tensor(-2.0 ** 32)
        else:
            sd[f"{name}.uA"] = torch.tensor(1.0 + torch.rand((), generator=g).item())
        sd[f"{name}.init"] = torch.tensor(0)
    torch.save({"state_dict": sd, "epoch": 399}, path)
    return path


@pytest.mark.parametrize("bits", ["W1A1", "W2A2", "W1A32"])
def test_both_plugins_compute_the_reference_forward_on_a_synthetic_checkpoint(tmp_path, bits):
    weight_bits = int(bits[1])
    act_bits = None if bits.endswith("A32") else int(bits[3])
    path = _synthetic_checkpoint(tmp_path / f"cifar10_{bits}.pth", act_bits)
    sd = ref.read_reference_checkpoint(path)
    assert ref.reference_bits(path, sd) == (weight_bits, act_bits)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = reference_forward(sd, x, weight_bits, act_bits)
        brevitas = ref.to_brevitas(path)(x)
        fx = ref.to_daq_fx(path, calibration=torch.randn(16, 3, 32, 32))(x)
    scale = expected.abs().max()
    assert torch.equal(brevitas.argmax(1), expected.argmax(1))
    # float op order differs (natural units, scale folded into the weight): ~1e-6 relative per layer
    assert torch.allclose(brevitas, expected, atol=1e-3 * scale)
    qat = ref.to_daq_fx(path)
    n_w, n_a = 2 ** weight_bits - 1, 2 ** (act_bits or 1) - 1
    for conv, (_, out_name) in qat.meta["daq_reference_quantizers"].items():
        out_fq = qat.get_submodule(out_name)
        if act_bits is None:     # float activations: no int model, the output quantizer stays off
            assert not out_fq.fake_quant_enabled[0]
            continue
        step, _ = out_fq.calculate_qparams()     # the accumulator lattice |beta|/(n_w n_a)
        assert step.item() == pytest.approx(abs(sd[f"{conv}.beta"].item()) / (n_w * n_a), rel=1e-5)
    if weight_bits == 1:
        # 1 bit: the accumulators span < 256 lattice values on these inputs, so the FX model's 8-bit conv
        # outputs are lossless (float error ~1e-6). At 2 bits the span is 9x wider and the extremes clip.
        assert torch.equal(fx.argmax(1), expected.argmax(1))
        assert torch.allclose(fx, expected, atol=1e-3 * scale)


def test_fx_reference_model_converts_to_int8_with_the_qat_predictions(tmp_path):
    path = _synthetic_checkpoint(tmp_path / "cifar10_W1A1.pth", act_bits=1)
    x = torch.randn(32, 3, 32, 32)
    qat = ref.to_daq_fx(path, calibration=torch.randn(32, 3, 32, 32))
    int8 = ref.convert_reference_fx(qat)
    names = [n for n, m in int8.named_modules() if type(m).__name__ == "Conv2d" and "quantized" in type(m).__module__]
    assert len(names) == 18                      # every block conv runs as an int8 kernel
    for n in names:
        codes = int8.get_submodule(n).weight().int_repr()
        assert set(codes.unique().tolist()) <= {-1, 1}     # 1-bit DAQ grid: ±1
    with torch.no_grad():
        y_qat, y_int = qat(x), int8(x)
    assert torch.equal(y_qat.argmax(1), y_int.argmax(1))
    assert torch.allclose(y_qat, y_int, atol=1e-3 * y_qat.abs().max())


def test_reparametrisation_is_the_papers_form():
    sd = {"c.weight": torch.randn(8, 4, 3, 3), "c.lW": torch.tensor(-2.0), "c.uW": torch.tensor(3.0),
          "c.beta": torch.tensor(-0.5), "c.uA": torch.tensor(2.0)}
    state = ref.reference_quantizer_state(sd, "c", 1, 1)
    assert state["lower"].item() == -2.0 and state["upper"].item() == 3.0
    assert state["scale"].item() == pytest.approx(0.25)        # |beta| / uA: s·W_q · uA·A_q = |beta|·W_q·A_q
    assert state["act_upper"].item() == 2.0
    assert ref.reference_quantizer_state(sd, "c", 1, None)["scale"].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------
# bad input: clear messages naming the key and what to do
# --------------------------------------------------------------------------------------

def test_checkpoint_missing_quantizer_state_names_the_key(tmp_path):
    path = _synthetic_checkpoint(tmp_path / "cifar10_W1A1.pth", act_bits=1)
    blob = torch.load(path, weights_only=False)
    del blob["state_dict"]["layer2.block_1.0.conv2.beta"]
    torch.save(blob, path)
    with pytest.raises(ref.ReferenceCheckpointError, match=r"layer2\.block_1\.0\.conv2\.beta"):
        ref.to_brevitas(path)
    with pytest.raises(ref.ReferenceCheckpointError, match=r"layer2\.block_1\.0\.conv2\.beta"):
        ref.to_daq_fx(path)


def test_float_activation_checkpoint_asked_for_quantized_activations_is_explained(tmp_path):
    path = _synthetic_checkpoint(tmp_path / "cifar10_W1A32.pth", act_bits=None)
    with pytest.raises(ref.ReferenceCheckpointError, match=r"uA .*act_bits=None"):
        ref.to_brevitas(path, weight_bits=1, act_bits=1)


def test_bits_that_cannot_be_read_from_the_name_are_asked_for(tmp_path):
    path = _synthetic_checkpoint(tmp_path / "model.pth", act_bits=1)
    with pytest.raises(ref.ReferenceCheckpointError, match="pass weight_bits= and act_bits="):
        ref.to_brevitas(path)
    assert ref.reference_bits(path, weight_bits=1, act_bits=1) == (1, 1)


def test_our_resnet20_checkpoint_given_as_reference_names_the_key_and_the_loader(tmp_path):
    model = create_model("resnet20_cifar", 10)
    path = tmp_path / "resnet20.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(ref.ReferenceCheckpointError, match=r"layer1\.block_0\.0\.conv1\.weight.*resnet20_cifar"):
        ref.to_daq_fx(path)
    with pytest.raises(ref.ReferenceCheckpointError, match="no 'state_dict'"):
        torch.save({"weights": 1}, tmp_path / "x.pth")
        ref.read_reference_checkpoint(tmp_path / "x.pth")


def test_reference_checkpoint_given_to_the_wrong_model_says_which_model(tmp_path):
    q = _synthetic_checkpoint(tmp_path / "cifar10_W1A1.pth", act_bits=1)
    with pytest.raises(ModelError, match=r"quantizer state \('layer1\.block_0\.0\.conv1\.(uW|lW|uA|beta)'\).*to_brevitas"):
        create_model("resnet20_daq_reference", 10, initial_checkpoint=str(q))
    fp = tmp_path / "cifar10_fp.pth"
    torch.save({"state_dict": DAQReferenceResNet(20).state_dict()}, fp)
    with pytest.raises(ModelError, match=r"'layer1\.block_0\.0\.conv1\.weight'.*--model resnet20_daq_reference"):
        create_model("resnet20_cifar", 10, initial_checkpoint=str(fp))
    assert isinstance(create_model("resnet20_daq_reference", 10, initial_checkpoint=str(fp)), DAQReferenceResNet)


# --------------------------------------------------------------------------------------
# the authors' checkpoints on the 5,000 shared test images (slow, needs ../shared)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_images():
    if not (CKPT / "cifar10_W1A1.pth").is_file():
        pytest.skip(f"needs {CKPT} and the CIFAR-10 test archive (project CI and dev machines)")
    from recipes.data import read_cifar10_archive
    images, labels = read_cifar10_archive(SHARED / "cifar10-jpeg-test-a.tar.gz", 500)
    train, _ = read_cifar10_archive(SHARED / "cifar10-jpeg-train.tar.gz", 50)
    return ref.normalize_images(images), labels, ref.normalize_images(train)


def _predict(model_or_fn, x):
    with torch.no_grad():
        return torch.cat([model_or_fn(xb).argmax(1) for xb in x.split(500)])


_ORACLE = {}


def _oracle(kind, x):
    if kind not in _ORACLE:
        sd = ref.read_reference_checkpoint(CKPT / f"cifar10_{kind}.pth")
        bits = {"fp": (None, None), "W1A1": (1, 1), "W1A32": (1, None)}[kind]
        _ORACLE[kind] = _predict(lambda xb: reference_forward(sd, xb, *bits), x)
    return _ORACLE[kind]


def _agreement(a, b):
    return (a == b).float().mean().item()


@pytest.mark.slow
def test_float_reference_model_predicts_what_the_oracle_predicts(test_images):
    x, y, _ = test_images
    assert len(y) == 5000
    preds = _predict(ref.load_reference_float(CKPT / "cifar10_fp.pth"), x)
    assert _agreement(preds, _oracle("fp", x)) >= AGREEMENT


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["W1A1", "W1A32"])
def test_brevitas_reproduces_the_authors_quantized_models(test_images, kind):
    x, y, _ = test_images
    preds = _predict(ref.to_brevitas(CKPT / f"cifar10_{kind}.pth"), x)
    agree = _agreement(preds, _oracle(kind, x))
    print(f"brevitas {kind}: agreement with the oracle {agree:.4f}, accuracy {_agreement(preds, y):.4f}")
    assert agree >= AGREEMENT


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["W1A1", "W1A32"])
def test_daq_fx_reproduces_the_authors_quantized_models_and_w1a1_converts(test_images, kind):
    x, y, calib = test_images
    qat = ref.to_daq_fx(CKPT / f"cifar10_{kind}.pth", calibration=calib)
    oracle = _oracle(kind, x)
    preds = _predict(qat, x)
    agree = _agreement(preds, oracle)
    print(f"daq_fx {kind}: agreement with the oracle {agree:.4f}, accuracy {_agreement(preds, y):.4f}")
    assert agree >= AGREEMENT
    if kind == "W1A1":
        int8 = ref.convert_reference_fx(qat)
        int_preds = _predict(int8, x)
        agree = _agreement(int_preds, oracle)
        print(f"daq_fx {kind} x86 int8: agreement with the oracle {agree:.4f}")
        assert agree >= AGREEMENT
