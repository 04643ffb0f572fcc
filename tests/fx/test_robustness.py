"""What a sweep over 30 timm families broke (issue 18), on small models (fast).

* functional dropout traced as ``dropout(..., training=True)`` kept dropping in eval (FX), and
  torchao's ``move_exported_model_to_eval`` / ``_train`` reset every dropout rate to 0.5 (pt2e);
* a first-batch activation range of ~1e-7 (ConvNeXt's layer scale) was crossed by the first Adam
  step of the learned bounds: ``lower must be < upper`` on every later call;
* modules with shape-dependent Python control flow (timm's ``ConvMlp``, the VGG head) could not be
  traced;
* a NaN / Inf in the first batch turned the bounds into NaN.

The same models at timm scale: ``tests/fx/test_timm_models.py::test_issue18_timm_models`` (slow).
"""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import daq_core
import daq_fx
from daq_fx import DAQFakeQuantize

from ._models import TinyNet


def _mapping():
    return daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4)


class FunctionalDropoutNet(nn.Module):
    """Conv-BN-ReLU, global pool, functional dropouts the way timm heads call them, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = F.dropout2d(x, p=0.1, training=self.training)
        x = F.dropout(x.mean((2, 3)), p=0.5, training=self.training)
        x = F.dropout(x, p=0.3, training=False)          # off in both modes: stays off
        return self.fc(x)


def test_functional_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    qat = daq_fx.prepare_qat_fx(FunctionalDropoutNet(), _mapping(), (torch.randn(2, 3, 8, 8),))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        first, second = qat(x), qat(x)                # train mode: dropout is on
        assert not torch.equal(first, second)
        qat.eval()
        first, second = qat(x), qat(x)                # eval: off (before the fix: still on)
    assert torch.equal(first, second)
    qat.train()
    with torch.no_grad():
        assert not torch.equal(qat(x), qat(x))
    qat.eval()
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        assert torch.allclose(int8(x), qat(x), atol=1e-5)
    assert "training = True" not in qat.code
    assert len(qat.meta["daq_functional_dropouts"]) == 2


def test_pt2e_dropout_keeps_its_rate_across_eval_and_train():
    pytest.importorskip("torchao.quantization.pt2e", reason="needs torchao (pip install 'daq-quant[pt2e]')")
    from daq_fx import pt2e
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 8, 8),)
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(FunctionalDropoutNet(), example), pt2e.DAQQuantizer(4, 4))
    qat(torch.randn(8, 3, 8, 8))

    def states():
        return [tuple(node.args[1:3]) for node in qat.graph.nodes if node.op == "call_function"
                and node.target in (torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default)]

    assert states() == [(0.1, True), (0.5, True), (0.3, False)]
    pt2e.move_exported_model_to_eval(qat)
    assert states() == [(0.1, False), (0.5, False), (0.3, False)]
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qat(x), qat(x))
    pt2e.move_exported_model_to_train(qat)
    # torchao's own functions: every aten.dropout at p = 0.5 and the dropout exported off switched on
    assert states() == [(0.1, True), (0.5, True), (0.3, False)]


class ShapeHead(nn.Module):
    """timm's ``ConvMlp`` pattern: Python control flow on the input's spatial size."""

    def __init__(self, channels=8, kernel_size=3):
        super().__init__()
        self.kernel_size = kernel_size
        self.fc1 = nn.Conv2d(channels, 16, kernel_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        if x.shape[-2] < self.kernel_size or x.shape[-1] < self.kernel_size:
            x = F.adaptive_avg_pool2d(x, (max(self.kernel_size, x.shape[-2]), max(self.kernel_size, x.shape[-1])))
        batch, channels = x.shape[:2]
        x = self.fc2(self.act(self.fc1(x)))
        return x.reshape(batch, -1, x.shape[-2] * x.shape[-1]).mean(-1)


def test_shape_dependent_head_is_traced_at_the_example_shapes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ShapeHead())
    with pytest.raises(Exception):
        torch.ao.quantization.quantize_fx.prepare_qat_fx(model, _mapping(), (torch.randn(2, 3, 8, 8),))
    qat = daq_fx.prepare_qat_fx(model, _mapping(), (torch.randn(2, 3, 8, 8),))
    assert "adaptive_avg_pool2d" in qat.code          # the branch taken at 2x2 features
    assert isinstance(qat.get_submodule("3.fc1").weight_fake_quant, DAQFakeQuantize)   # quantized, not float
    qat(torch.randn(8, 3, 8, 8))
    qat.eval()
    x = torch.randn(5, 3, 8, 8)                       # another batch size: the batch stays symbolic
    int8 = daq_fx.convert_fx(qat)
    with torch.no_grad():
        expected = qat(x)
        assert expected.shape == (5, 5)
        assert torch.allclose(qat(x[:2]), expected[:2], atol=1e-6)
        assert torch.allclose(int8(x), expected, atol=1e-4)
    assert qat.meta["daq_static_shape_modules"] == ["3"]


def test_value_dependent_control_flow_is_still_reported():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.shape[-1] > 2 and x.sum() > 0:   # a size, then a value: not specialised
                return x
            return -x

    model = nn.Sequential(nn.Conv2d(3, 4, 1), DataDependent(), nn.Conv2d(4, 2, 1))
    with pytest.raises(daq_fx.DAQPrepareError, match=r"'1' \(DataDependent\)"):
        daq_fx.prepare_qat_fx(model, _mapping(), (torch.randn(1, 3, 4, 4),))


def test_nan_first_batch_is_refused_before_the_quantizer_changes():
    fq = DAQFakeQuantize("activation", 4)
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    x = torch.randn(64)
    x[3] = float("nan")
    x[7] = float("inf")
    with pytest.raises(ValueError, match=r"1 NaN and 1 Inf"):
        fq(x)
    for key, value in fq.state_dict().items():          # untouched (before: NaN bounds, initialized=1)
        assert torch.equal(value, state[key]), key
    y = fq(torch.randn(64))                             # a finite batch initialises as usual
    assert torch.isfinite(y).all() and fq.initialized.item() == 1
    assert bool(fq.upper_bound > fq.lower_bound)


def test_nan_weight_is_refused_with_the_layer_name():
    model = TinyNet()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"conv2\.weight_fake_quant.*1 NaN"):
        daq_fx.prepare_qat_fx(model, _mapping(), (torch.randn(2, 3, 8, 8),))


def test_nan_first_batch_leaves_the_prepared_model_untouched():
    torch.manual_seed(0)
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4, float_module_names=["conv1"])   # BN before a quantizer
    qat = daq_fx.prepare_qat_fx(TinyNet(), mapping, (torch.randn(2, 3, 8, 8),))
    state = {k: v.clone() for k, v in qat.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model input 0 of the first \(initialising\) batch contains 1 NaN"):
        qat(x)
    for key, value in qat.state_dict().items():          # BN statistics and quantizers alike
        assert torch.equal(value, state[key]), key
    qat(torch.randn(4, 3, 8, 8))
    bounds = [p for m in qat.modules() if isinstance(m, DAQFakeQuantize) for p in (m.lower_bound, m.upper_bound)]
    assert all(torch.isfinite(b).all() for b in bounds)


def test_degenerate_first_batch_range_gets_a_usable_grid_and_a_warning():
    torch.manual_seed(0)
    fq = DAQFakeQuantize("activation", 4)
    fq.name = "branch_quantizer"
    x = torch.randn(256) * 1e-7                       # ConvNeXt's layer scale (1e-6) times its branch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fq(x)
    opt = torch.optim.Adam(fq.parameters(), lr=1e-4)   # DAQ-SPEC §6: Adam lr 1e-4 for l, u
    for _ in range(3):      # shrink the output: u moves down, l up (before: crossed by the first step,
        loss = fq(torch.randn(256) * 1e-6).pow(2).sum()      # and the next call failed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fq.upper_bound.item() > fq.lower_bound.item()
    messages = [str(w.message) for w in caught if issubclass(w.category, daq_core.DAQInitWarning)]
    assert len(messages) == 1 and "branch_quantizer" in messages[0] and "widened" in messages[0]
    fresh = DAQFakeQuantize("activation", 4)
    with pytest.warns(daq_core.DAQInitWarning):
        fresh(x)
    lower, upper = fresh.lower_bound.item(), fresh.upper_bound.item()
    assert upper - lower >= daq_core.MIN_ACTIVATION_RANGE * (1 - 1e-6)
    assert lower < 0 < upper


def test_normal_ranges_are_not_widened():
    fq = DAQFakeQuantize("activation", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", daq_core.DAQInitWarning)
        fq(torch.randn(256) * 1e-2)


class DropPathNet(nn.Module):
    """A residual block with timm's stochastic depth (``drop_path_rate > 0`` in timm models)."""

    def __init__(self):
        super().__init__()
        from timm.layers import DropPath
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop_path = DropPath(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.drop_path(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_drop_path_follows_train_and_eval():
    torch.manual_seed(0)
    qat = daq_fx.prepare_qat_fx(DropPathNet(), _mapping(), (torch.randn(2, 3, 8, 8),))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        qat(x)                                        # before: "'tuple' object has no attribute 'detach'"
        qat.eval()
        expected = qat(x)
        assert torch.equal(expected, qat(x))          # before: bernoulli_ traced in, still dropping
        int8 = daq_fx.convert_fx(qat)
        assert torch.allclose(int8(x), expected, atol=1e-5)
        qat.train()
        assert not torch.equal(qat(x), qat(x))


def test_pt2e_drop_path_follows_train_and_eval():
    pytest.importorskip("torchao.quantization.pt2e", reason="needs torchao (pip install 'daq-quant[pt2e]')")
    from daq_fx import pt2e
    torch.manual_seed(0)
    model = DropPathNet()
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(model, (torch.randn(2, 3, 8, 8),)), pt2e.DAQQuantizer(4, 4))
    assert type(model.drop_path).__name__ == "DropPath"      # the user's model is left as it was
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        qat(x)
        assert not torch.equal(qat(x), qat(x))
        pt2e.move_exported_model_to_eval(qat)
        assert torch.equal(qat(x), qat(x))            # before: bernoulli_ exported, still dropping
