"""Configuration errors, state_dict round trips and the quantizer/weight parameter split."""

import warnings

import pytest
import torch

import brevitas.nn as qnn

from daq_brevitas import (DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor,
                          quantize_model, quantizer_parameters)

from _daq_brevitas_models import TinyDAQNet, act_scalings, weight_scalings

warnings.filterwarnings("ignore", message="Computing zero point of output accumulator")


# ---------------------------------------------------------------------------------------------
# bad configuration fails at construction, naming the parameter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_weight_bit_width(bits):
    with pytest.raises(ValueError, match="weight_bit_width"):
        qnn.QuantConv2d(3, 4, 3, weight_quant=DAQWeightPerTensor, weight_bit_width=bits)


def test_non_integer_bit_width():
    with pytest.raises(TypeError, match="bit_width"):
        qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=2.5)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_act_bit_width(bits):
    with pytest.raises(ValueError, match="bit_width"):
        qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=bits)


@pytest.mark.parametrize("name,value", [("sigma", 0.0), ("sigma", -1.0), ("gamma", 0.0), ("gamma", float("inf"))])
def test_bad_dasr_hyperparameters(name, value):
    bad_weight = type("BadWeight", (DAQWeightPerChannel,), {name: value})
    with pytest.raises(ValueError, match=name):
        qnn.QuantConv2d(3, 4, 3, weight_quant=bad_weight, weight_bit_width=4)
    bad_act = type("BadAct", (DAQActPerTensor,), {name: value})
    with pytest.raises(ValueError, match=name):
        qnn.QuantReLU(act_quant=bad_act, bit_width=4)


def test_signed_quantizer_where_unsigned_was_asked():
    with pytest.raises(ValueError, match="signed=False"):
        qnn.QuantReLU(act_quant=DAQSignedActPerTensor, bit_width=4, signed=False)
    with pytest.raises(ValueError, match="signed=True"):
        qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=4, signed=True)


def test_quantize_model_bad_bits_named():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="weight_bit_width"):
        quantize_model(model, weight_bit_width=0)
    with pytest.raises(ValueError, match="act_bit_width"):
        quantize_model(model, act_bit_width=0)
    with pytest.raises(TypeError, match="model"):
        quantize_model("resnet18")


# ---------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------

def _trained_tiny(weight_bits=3, act_bits=3, seed=0):
    torch.manual_seed(seed)
    model = TinyDAQNet(weight_bits, act_bits)
    x = torch.randn(4, 3, 10, 10)
    model(x)  # first-batch initialisation
    qp, wp = quantizer_parameters(model)
    opt = torch.optim.Adam([{"params": qp, "lr": 1e-2}, {"params": wp, "lr": 1e-2}])
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


def test_state_dict_round_trip_reproduces_outputs_exactly():
    model = _trained_tiny()
    state = model.state_dict()
    assert any(k.endswith("scaling_impl.lower") for k in state) and any(k.endswith("scaling_impl.scale") for k in state)
    assert all(bool(v) for k, v in state.items() if k.endswith("initialized"))

    fresh = TinyDAQNet(3, 3).eval()  # different random weights, uninitialised quantizers
    fresh.load_state_dict(state)
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    # the loaded quantizers are not re-initialised by the first batch they see
    for a, b in zip(act_scalings(model), act_scalings(fresh)):
        assert torch.equal(a.upper, b.upper) and torch.equal(a.lower, b.lower)
    for a, b in zip(weight_scalings(model), weight_scalings(fresh)):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.lower, b.lower)


def test_state_dict_round_trip_through_file(tmp_path):
    model = _trained_tiny(seed=1)
    path = tmp_path / "daq.pt"
    torch.save(model.state_dict(), path)
    fresh = TinyDAQNet(3, 3).eval()
    fresh.load_state_dict(torch.load(path))
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_loading_other_bit_width_fails_clearly():
    state = _trained_tiny(weight_bits=3, act_bits=3).state_dict()
    with pytest.raises(ValueError, match="weight_bit_width=3.*weight_bit_width=2|saved with weight_bit_width=3"):
        TinyDAQNet(weight_bits=2, act_bits=3).load_state_dict(state)
    with pytest.raises(ValueError, match="bit_width=3"):
        TinyDAQNet(weight_bits=3, act_bits=4).load_state_dict(state)


def _small_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 4))


def test_quantize_model_state_dict_round_trip():
    qmodel = quantize_model(_small_net(2), weight_bit_width=2, act_bit_width=2, keep_first_last_float=False).eval()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        qmodel(x)
        ref = qmodel(x)
    other = quantize_model(_small_net(3), weight_bit_width=2, act_bit_width=2, keep_first_last_float=False).eval()
    other.load_state_dict(qmodel.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), ref)
    wrong = quantize_model(_small_net(3), weight_bit_width=4, act_bit_width=2, keep_first_last_float=False)
    with pytest.raises(ValueError, match="weight_bit_width"):
        wrong.load_state_dict(qmodel.state_dict())


# ---------------------------------------------------------------------------------------------
# parameter split for the paper's two optimizers
# ---------------------------------------------------------------------------------------------

def test_quantizer_parameters_split():
    model = TinyDAQNet(2, 2)
    model(torch.randn(2, 3, 10, 10))
    qp, wp = quantizer_parameters(model)
    ids_q, ids_w = {id(p) for p in qp}, {id(p) for p in wp}
    assert not ids_q & ids_w
    assert ids_q | ids_w == {id(p) for p in model.parameters()}
    # 3 weight quantizers x (l, u, s) + signed input (l, u) + 3 unsigned (u)
    assert len(qp) == 3 * 3 + 2 + 3
    assert {id(model.conv1.weight), id(model.fc.bias)} <= ids_w
    for s in weight_scalings(model):
        assert {id(s.lower), id(s.upper), id(s.scale)} <= ids_q
