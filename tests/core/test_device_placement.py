"""Quantizer state lands on the input's / model's device (issue 19, GPU readiness), checked without a GPU.

Two techniques, both CPU-only and fast:

* **first batch under a ``meta`` default device**: quantizers and inputs on the CPU, the first
  forward + backward run inside ``with torch.device("meta")``. A tensor created without
  ``device=`` (``torch.tensor(...)``, ``torch.zeros(...)``, ...) lands on ``meta`` and either
  fails when mixed with the CPU tensors ("Tensor on device meta is not on the expected device
  cpu") or is left in the state, which the test then finds. On a GPU the same tensor would land on
  the CPU next to CUDA inputs.
* **quantizers built for another device**: ``factory_kwargs={"device": "meta"}`` (what torch.ao
  passes) must put *all* state there, the ``fake_quant_enabled`` / ``observer_enabled`` switches
  of torch.ao's base class included; an ``AveragedActivation`` (added by ``daq_fx.prepare_qat_fx``
  after mean / adaptive-average-pool) must sit on its source's device. Before the fix these
  switches stayed on the CPU when a model was prepared on the GPU.
"""

import pytest
import torch
from torch import nn

from daq_fx.fake_quantize import AveragedActivation, DAQFakeQuantize
from daq_fx.n2uq import N2UQFakeQuantize


def _state(module: nn.Module):
    return list(module.named_parameters()) + list(module.named_buffers())


def _assert_on(module: nn.Module, device_type: str):
    state = _state(module)
    assert state
    off = [(name, t.device.type) for name, t in state if t.device.type != device_type]
    assert not off, f"state not on {device_type}: {off}"


def _first_batch_under_meta_default(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.device("meta"):
        y = module(x)
        y.float().sum().backward()
    assert y.device.type == "cpu" and x.grad is not None and x.grad.device.type == "cpu"
    _assert_on(module, "cpu")
    assert bool(torch.isfinite(y).all())
    return y


def _weight():
    return torch.randn(8, 4, 3, 3) * 0.1


def _signed():
    return torch.randn(4, 8, 5, 5)


def _relu():
    return torch.randn(4, 8, 5, 5).relu()


@pytest.mark.parametrize("make, data", [
    (lambda: DAQFakeQuantize("weight", 4, ch_axis=0), _weight),
    (lambda: DAQFakeQuantize("weight", 2), _weight),
    (lambda: DAQFakeQuantize("activation", 4), _signed),
    (lambda: DAQFakeQuantize("activation", 4), _relu),
    (lambda: DAQFakeQuantize("activation", 4, init="std", rounding="ste"), _signed),
    (lambda: N2UQFakeQuantize("weight", 4, ch_axis=0), _weight),
    (lambda: N2UQFakeQuantize("activation", 4), _signed),
    (lambda: N2UQFakeQuantize("activation", 4), _relu),
], ids=["daq-w-per-channel", "daq-w-per-tensor", "daq-act-signed", "daq-act-unsigned", "daq-act-std-ste",
        "n2uq-w", "n2uq-act-signed", "n2uq-act-unsigned"])
def test_fx_first_batch_creates_no_default_device_tensors(make, data):
    torch.manual_seed(0)
    fq = make()
    _first_batch_under_meta_default(fq, data())
    with torch.device("meta"):
        scale, zero_point = fq.calculate_qparams()
    assert scale.device.type == "cpu" and zero_point.device.type == "cpu"


def test_fx_averaged_activation_first_batch_creates_no_default_device_tensors():
    source = DAQFakeQuantize("activation", 4)
    source(_relu())
    avg = AveragedActivation(source)
    x = _relu().mean(dim=(2, 3)).requires_grad_(True)
    with torch.device("meta"):
        y = avg(x)
        y.sum().backward()
    assert y.device.type == "cpu" and x.grad.device.type == "cpu"


def test_brevitas_first_batch_creates_no_default_device_tensors():
    qnn = pytest.importorskip("brevitas.nn")
    import daq_brevitas as db
    torch.manual_seed(0)
    for wq, aq, sq in ((db.DAQWeightPerChannel, db.DAQActPerTensor, db.DAQSignedActPerTensor),
                       (db.N2UQWeightPerChannel, db.N2UQActPerTensor, db.N2UQSignedActPerTensor)):
        model = nn.Sequential(qnn.QuantIdentity(act_quant=sq, bit_width=4),
                              qnn.QuantConv2d(8, 8, 3, weight_quant=wq, weight_bit_width=4, bias=False),
                              qnn.QuantReLU(act_quant=aq, bit_width=4))
        _first_batch_under_meta_default(model, _signed())


@pytest.mark.parametrize("make", [
    lambda kw: DAQFakeQuantize("weight", 4, ch_axis=0, factory_kwargs=kw),
    lambda kw: DAQFakeQuantize("activation", 4, factory_kwargs=kw),
    lambda kw: N2UQFakeQuantize("weight", 4, ch_axis=0, factory_kwargs=kw),
    lambda kw: N2UQFakeQuantize("activation", 4, factory_kwargs=kw),
], ids=["daq-w", "daq-act", "n2uq-w", "n2uq-act"])
def test_fx_quantizers_built_for_a_device_hold_all_their_state_there(make):
    _assert_on(make({"device": torch.device("meta")}), "meta")


def test_averaged_activation_sits_on_its_source_device():
    source = DAQFakeQuantize("activation", 4, factory_kwargs={"device": torch.device("meta")})
    _assert_on(AveragedActivation(source), "meta")


def test_convert_fx_refuses_a_model_off_the_cpu_and_moves_recorded_example_inputs():
    import daq_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    example = (torch.randn(2, 3, 6, 6),)
    qat = daq_fx.prepare_qat_fx(model, daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4), example)
    qat(torch.randn(8, 3, 6, 6))
    with pytest.raises(ValueError, match="move the trained QAT model to the CPU"):
        daq_fx.convert_fx(__import__("copy").deepcopy(qat).to("meta"))
    # inputs recorded by prepare on another device are taken to the CPU (a GPU in practice)
    from daq_fx.convert import _on_cpu
    moved = _on_cpu((torch.zeros(1), [torch.ones(2)], {"a": 1}))
    assert moved[0].device.type == "cpu" and moved[1][0].device.type == "cpu" and moved[2] == {"a": 1}
    int8 = daq_fx.convert_fx(qat.eval())
    assert int8(example[0]).shape == (2, 3)
