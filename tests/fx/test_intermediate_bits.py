"""intermediate_act_bits: activations that are not a quantized layer's input get more bits."""

import pytest
import torch

import daq_fx
from daq_fx import DAQFakeQuantize

from ._models import TinyNet, calibrate_batchnorm


def _prepared(intermediate_act_bits):
    torch.manual_seed(0)
    model = TinyNet()
    calibrate_batchnorm(model, lambda: torch.randn(32, 3, 8, 8))
    model.train()
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", 2, 2, intermediate_act_bits=intermediate_act_bits)
    return daq_fx.prepare_qat_fx(model, mapping, (torch.randn(2, 3, 8, 8),))


def _act_bits_by_consumer(qat):
    """{fake-quant node name: bits} for every activation DAQ fake-quant call in the graph."""
    return {n.target: qat.get_submodule(n.target).bits for n in qat.graph.nodes
            if n.op == "call_module" and isinstance(qat.get_submodule(n.target), DAQFakeQuantize)
            and not qat.get_submodule(n.target).is_weight}


def test_only_non_layer_inputs_are_widened_and_conversion_stays_exact():
    plain, wide = _prepared(None), _prepared(8)
    assert plain.meta["daq_intermediate_activations"] == []
    assert set(_act_bits_by_consumer(plain).values()) == {2}
    widened = wide.meta["daq_intermediate_activations"]
    bits = _act_bits_by_consumer(wide)
    assert widened and all(bits[name] == 8 for name in widened)
    # every quantized layer's input keeps 2 bits: the fake-quant node right before conv1/conv2/fc
    for node in wide.graph.nodes:
        if node.op == "call_module" and hasattr(wide.get_submodule(node.target), "weight_fake_quant"):
            src = node.args[0]
            while not (src.op == "call_module" and isinstance(wide.get_submodule(src.target), DAQFakeQuantize)):
                src = src.args[0]       # through qparam-sharing ops (pool, flatten, dropout)
            assert wide.get_submodule(src.target).bits == 2, node.target
    # the BN output before the residual add is an add operand only: widened
    assert any(bits[name] == 8 for name in bits)
    x = torch.randn(64, 3, 8, 8)
    wide.train()
    with torch.no_grad():
        wide(x)
    wide.eval()
    torch.backends.quantized.engine = "x86"
    int8 = daq_fx.convert_fx(wide)
    with torch.no_grad():
        assert torch.allclose(int8(x), wide(x), atol=1e-5)


def test_bad_intermediate_bits_is_named():
    with pytest.raises(ValueError, match="intermediate_act_bits"):
        daq_fx.get_daq_qat_qconfig_mapping("x86", 2, 2, intermediate_act_bits=0)
