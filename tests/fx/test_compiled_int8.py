"""Compiled int8 (issue 19, part 1): ``daq_fx.pt2e.compile_x86`` — torch.compile (Inductor, freezing)
of a converted DAQ pt2e model, lowered to fused oneDNN int8 kernels with the 4-bit clamps inside them.

Fast tests (no compilation): the float clamps written before each sub-8-bit quantize leave the q/dq
model's outputs unchanged; averages of codes are rounded alike in the QAT and the q/dq model
(exact ties half to even). Slow tests compile: the small net's kernels (every conv / linear a
oneDNN int8 kernel, every 4-bit output clamped by a fused ``hardtanh`` post-op) and its agreement;
the trained ResNet-20 is in ``test_trained_resnet20.py`` (it shares that module's pt2e QAT models).

Skipped without torchao (``pip install 'daq-quant[pt2e]'``).
"""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.quantization.pt2e",
                    reason="torchao is not installed: pip install 'daq-quant[pt2e]' (torchao>=0.15,<0.19)")

import daq_fx  # noqa: E402
from daq_fx import pt2e  # noqa: E402

from ._models import calibrate_batchnorm  # noqa: E402
from .test_pt2e import _SmallNet, _train  # noqa: E402

#: 16 px: 8x8 after the max pool, an even count for the global average (exact ties k + 1/2 occur)
SIZE = 16

aten = torch.ops.aten


class _PooledNet(_SmallNet):
    """_SmallNet with a 2x2 average pool too (averages of 4 codes: ties on a quarter of the outputs)."""

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        x = self.conv3(nn.functional.avg_pool2d(self.pool(x), 2))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _build(net, bits=(4, 4), steps=2):
    torch.manual_seed(0)
    model = calibrate_batchnorm(net(), lambda: torch.randn(8, 3, SIZE, SIZE))
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, SIZE, SIZE),)),
                                pt2e.DAQQuantizer(*bits))
    _train(qat, lambda: torch.randn(16, 3, SIZE, SIZE), 5, steps=steps)
    pt2e.move_exported_model_to_eval(qat)
    return qat, pt2e.convert_pt2e(qat)


_CACHE = {}


def _qat_and_converted(net=None):
    """(QAT model in eval, converted q/dq model), built once per net (pt2e export + prepare take
    seconds) and deep-copied for each test."""
    import copy
    net = net or _PooledNet
    if net not in _CACHE:
        _CACHE[net] = _build(net)
    return copy.deepcopy(_CACHE[net])


def test_float_clamps_keep_the_qdq_outputs():
    qat, converted = _qat_and_converted()
    x = torch.randn(64, 3, SIZE, SIZE)
    with torch.no_grad():
        before = converted(x)
    clamps = pt2e.insert_float_clamps(converted)
    assert clamps == 4                                        # conv1 (+ReLU6), conv2, conv3, fc: 4-bit outputs
    targets = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.clamp_min.default) == targets.count(aten.clamp_max.default) == 4
    assert aten.hardtanh.default not in targets               # the ReLU6 is merged into its clamp
    with torch.no_grad():
        assert torch.equal(converted(x), before)


def test_averages_round_alike_in_qat_and_qdq():
    """Averages of codes land on exact ties k + 1/2: the QAT model (AveragedActivationPT2E) and the
    q/dq model (exact_averages, computed on the codes) both round them half to even."""
    qat, converted = _qat_and_converted()
    pools = 2                                                 # the 2x2 average pool and the global one
    assert qat.meta["daq_averaged_activations"] == pools
    assert converted.meta["daq_exact_averages"] == pools
    assert sum(isinstance(m, pt2e.AveragedActivationPT2E) for m in qat.modules()) == pools
    x = torch.randn(256, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = qat(x), converted(x)
    r = daq_fx.output_agreement(expected, got)
    assert r["bit_exact_samples"] >= 0.99 and r["top1"] >= 0.99, r


def test_averaged_activation_survives_state_dict_and_training():
    qat, _ = _qat_and_converted()
    averaged = [m for m in qat.modules() if isinstance(m, pt2e.AveragedActivationPT2E)]
    assert len(averaged) == 2 and all(isinstance(m.source, pt2e.DAQFakeQuantizePT2E) for m in averaged)
    assert not any(k.endswith("_averaged_0.source.lower_bound") for k in qat.state_dict())   # shared, not copied
    pt2e.move_exported_model_to_train(qat)
    _train(qat, lambda: torch.randn(8, 3, SIZE, SIZE), 5, steps=1)


# --------------------------------------------------------------------------------------
# slow: Inductor compiles
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def x86_available():
    if not os.environ.get(pt2e.ONEDNN_ISA_ENV):
        works, message = pt2e.check_x86_lowering()
        if not works:
            pytest.skip(f"x86 int8 kernels unavailable here: {message}")


@pytest.mark.slow
def test_compile_x86_small_net(x86_available):
    qat, converted = _qat_and_converted()
    example = (torch.randn(64, 3, SIZE, SIZE),)
    compiled = pt2e.compile_x86(converted, example, check_isa=False)
    print(f"compiled in {compiled.compile_s:.1f} s: {compiled.kernels}")
    kernels = compiled.kernels
    assert kernels["qconv"] == 3 and kernels["qlinear"] == 1 and kernels["float_convs"] == 0
    # the 4-bit clamps run inside the int8 kernels (hardtanh post-op) — the linear returns float
    # logits after its own quantize, which Inductor generates as C++ with the clamp to 0..15
    assert compiled.activation_clamps == 4 and kernels["hardtanh_post_ops"] == 3
    x = example[0]
    with torch.no_grad():
        expected, reference = qat(x), converted(x)
    got = compiled(x)
    assert torch.equal(got, reference)                         # integer kernels == the q/dq model here
    r = daq_fx.output_agreement(expected, got)
    assert r["top1"] >= 0.99 and r["cosine"] >= 0.999, r
