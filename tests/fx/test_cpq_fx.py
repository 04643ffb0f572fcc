"""CPQ through torch.ao FX: one adapter for every family, mixed-bit-width convert to the x86 int model."""

import pytest
import torch
from torch import nn

import daq_fx
from daq_core import cpq
from daq_core.cpq import CPQ
from daq_fx import CPQFakeQuantize, DAQFakeQuantize, FamilyFakeQuantize, N2UQFakeQuantize

from ._models import TinyNet, calibrate_batchnorm


def _prepared(**mapping_kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    calibrate_batchnorm(model, lambda: torch.randn(16, 3, 12, 12))
    mapping = daq_fx.get_cpq_qat_qconfig_mapping("x86", **mapping_kwargs)
    qat = daq_fx.prepare_qat_fx(model, mapping, (torch.randn(2, 3, 12, 12),))
    qat(torch.randn(16, 3, 12, 12))          # first batch: activation steps
    return qat


def _train(qat, steps=3, budget=None, gate_lr=0.05):
    quant, rest = daq_fx.quantizer_parameters(qat)
    gates = [p for p in quant if p.dim() == 1 and any(p is getattr(m, "gate_logits", None)
                                                       for m in qat.modules())]
    others = [p for p in quant if all(p is not g for g in gates)]
    groups = [{"params": rest, "lr": 1e-2, "momentum": 0.9}, {"params": others, "lr": 1e-3}]
    opt = torch.optim.SGD(groups)
    gate_opt = torch.optim.Adam(gates, lr=gate_lr) if gates else None
    for _ in range(steps):
        loss = nn.functional.cross_entropy(qat(torch.randn(8, 3, 12, 12)), torch.randint(0, 5, (8,)))
        if budget is not None:
            loss = loss + budget.penalty(qat)
        opt.zero_grad()
        if gate_opt:
            gate_opt.zero_grad()
        loss.backward()
        opt.step()
        if gate_opt:
            gate_opt.step()
        if budget is not None:
            budget.update(qat)


def _converted_and_max_error(qat):
    """Convert the eval-mode QAT model; the largest |int - QAT| output difference on a fresh batch."""
    qat.eval()
    x = torch.randn(32, 3, 12, 12)
    with torch.no_grad():
        expected = qat(x)
        int8 = daq_fx.convert_fx(qat)
        return int8, float((int8(x) - expected).abs().max())


def _assert_on_grid(int8, qat, name, bits):
    module = qat.get_submodule(name)
    ints = int8.get_submodule(name).weight().int_repr().to(torch.int32)
    assert int(ints.min()) >= -(1 << (bits - 1)) and int(ints.max()) <= (1 << (bits - 1)) - 1, name
    assert torch.equal(ints, module.weight_fake_quant.integers(daq_fx.prepare.folded_weight(module))), name


def test_one_adapter_serves_every_family():
    for cls in (DAQFakeQuantize, N2UQFakeQuantize, CPQFakeQuantize):
        assert issubclass(cls, FamilyFakeQuantize)
    assert CPQFakeQuantize(role="weight").family is CPQ
    generic = FamilyFakeQuantize(CPQ, role="weight", bits=3, ch_axis=0)
    assert (generic.quant_min, generic.quant_max) == (-4, 3)
    assert CPQFakeQuantize(role="activation", bits=3).quant_max == 7


def test_fixed_bits_converts_exactly_and_weights_lie_on_the_grid():
    qat = _prepared(weight_bits=4, act_bits=4)
    _train(qat)
    int8, error = _converted_and_max_error(qat)
    assert error < 1e-4
    for name in ("conv1", "conv2", "fc"):
        _assert_on_grid(int8, qat, name, 4)


def _set_bits(fq, bits):
    """Gate logits that read out as ``bits`` (nested: the lowest ``b_max - bits`` bits dropped)."""
    drop = fq.bits - bits
    with torch.no_grad():
        fq.gate_logits.copy_(torch.tensor([-6.0 if j < drop else 6.0 for j in range(fq.gate_logits.numel())]))


def test_mixed_bit_widths_convert_each_layer_at_its_learned_bit_width():
    qat = _prepared(weight_bits=8, act_bits=8, learn_bits=True)
    _train(qat, steps=2)
    chosen = {"conv1": 3, "conv2": 5, "fc": 2}
    for name, bits in chosen.items():
        _set_bits(qat.get_submodule(name).weight_fake_quant, bits)
    acts = [m for m in qat.modules() if isinstance(m, CPQFakeQuantize) and not m.is_weight]
    for fq, bits in zip(acts, (4, 6, 3, 7, 5)):
        _set_bits(fq, bits)
    layers = daq_fx.layer_bit_widths(qat)
    assert {name: v["weight"] for name, v in layers.items()} == chosen
    assert all(v["activation"] in (4, 6, 3, 7, 5) for v in layers.values())
    int8, error = _converted_and_max_error(qat)
    assert error < 1e-4
    for name, bits in chosen.items():
        _assert_on_grid(int8, qat, name, bits)      # b-bit signed codes of the layer's step 2^d α
        module = qat.get_submodule(name)
        scale = int8.get_submodule(name).weight().q_per_channel_scales()
        torch.testing.assert_close(scale.float(), (cpq.step_of(module.weight_fake_quant).detach()
                                                   * 2 ** (8 - bits)).float())


def test_learned_bits_train_and_the_gates_move_under_the_budget():
    qat = _prepared(weight_bits=8, act_bits=8, learn_bits=True)
    before = {n: cpq.keep_probability(m.gate_logits).detach().clone()
              for n, m in qat.named_modules() if isinstance(m, CPQFakeQuantize)}
    budget = cpq.BitBudget(0.5, target_weight_bits=4.0, target_act_bits=4.0, rate=0.5)
    _train(qat, steps=40, budget=budget, gate_lr=0.1)
    after = {n: cpq.keep_probability(m.gate_logits).detach()
             for n, m in qat.named_modules() if isinstance(m, CPQFakeQuantize)}
    assert all(bool((after[n] < before[n]).any()) for n in before)
    assert cpq.average_bits(qat, "weight") < 8 and cpq.average_bits(qat, "activation") < 8


def test_quantizer_parameters_hold_the_cpq_state():
    qat = _prepared(weight_bits=4, act_bits=4, learn_bits=True)
    quant, rest = daq_fx.quantizer_parameters(qat)
    ids = {id(p) for p in quant}
    for m in qat.modules():
        if isinstance(m, CPQFakeQuantize):
            assert {id(m.log_step), id(m.log_sigma), id(m.gate_logits)} <= ids
    assert not ids & {id(p) for p in rest}


def test_state_dict_round_trip_keeps_learned_bit_widths():
    qat = _prepared(weight_bits=6, act_bits=6, learn_bits=True)
    _set_bits(qat.conv1.weight_fake_quant, 2)
    other = _prepared(weight_bits=6, act_bits=6, learn_bits=True)
    other.load_state_dict(qat.state_dict())
    assert daq_fx.layer_bit_widths(other) == daq_fx.layer_bit_widths(qat)
    assert other.conv1.weight_fake_quant.log_step.shape == qat.conv1.weight_fake_quant.log_step.shape


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="drop_rate"):
        daq_fx.get_cpq_qat_qconfig_mapping("x86", 4, 4, drop_rate=-0.1).global_qconfig.weight()
    with pytest.raises(ValueError, match="weight_bits"):
        daq_fx.get_cpq_qat_qconfig_mapping("x86", 9, 4)
    with pytest.raises(ValueError, match="backend"):
        daq_fx.get_cpq_qat_qconfig_mapping("tensorrt", 4, 4)
    with pytest.raises(daq_fx.CPQBackendError, match="learned bit-widths cannot be held"):
        daq_fx.cpq.check_learned_bits_backend("torchao's pt2e flow")


def test_frozen_batchnorm_layers_evaluate_and_convert_without_dropbits():
    """torch.ao's frozen-BN ConvBn modules do not pass eval() to their weight fake-quant: CPQ follows the layer."""
    qat = _prepared(weight_bits=4, act_bits=4, drop_rate=0.5)
    for module in qat.modules():
        if hasattr(module, "freeze_bn") and hasattr(module, "bn"):   # as recipes' --freeze-bn does
            module.bn.eval()
            module.freeze_bn = True
    qat.eval()
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(qat(x), qat(x))                 # deterministic: no bits dropped in eval
    assert not qat.conv1.weight_fake_quant.training
    _, error = _converted_and_max_error(qat)
    assert error < 1e-4
