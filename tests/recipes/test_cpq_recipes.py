"""Recipes with --quantizer cpq: learned bit-widths towards a target average, the report's layer_bits, errors."""

from __future__ import annotations

import json

import pytest

from recipes import resnet20_cifar10

from recipe_helpers import base_args, run_recipe


def _cpq_args(data, out, *extra):
    args = base_args(data, out, "--quantizer", "cpq", *extra)
    return [a if a != "2" or args[i - 1] != "--epochs" else "10" for i, a in enumerate(args)]


@pytest.mark.slow
def test_learned_bit_widths_reach_the_target_average_on_resnet20(tiny_data, tmp_path):
    """ResNet-20, W8A8 largest, targets 4 / 4: within 0.25 bits; the x86 int model converts the mixed bit-widths."""
    out = tmp_path / "cpq"
    res = run_recipe("recipes.resnet20_cifar10",
                     _cpq_args(tiny_data, out, "--framework", "fx", "--bits", "W8A8", "--learn-bits",
                               "--target-avg-bits", "W4A4", "--bit-regularization", "0.1", "--gate-lr", "0.2"),
                     timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    layers = report["layer_bits"]
    assert len(layers) == 18                                  # ResNet-20 minus its float first conv and last linear
    assert all(set(v) == {"weight", "activation"} and 1 <= v["weight"] <= 8 and 1 <= v["activation"] <= 8
               for v in layers.values())
    assert len({v["weight"] for v in layers.values()}) > 1   # heterogeneous
    for role in ("weight", "activation"):
        assert abs(report["avg_bits"][role] - 4.0) <= 0.25, report["avg_bits"]
        # training (λ adjusted towards the target) did the work, not only the final projection
        assert report["bit_projection"]["avg_bits_before"][role] <= 5.0, report["bit_projection"]
    assert report["int_acc"] is not None and report["agreement"] >= 99.0
    assert (out / "layer_bits.png").is_file()
    assert "Learned bit-widths (CPQ, reconstructed from the abstract)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_bit_search_fraction_fixes_the_bit_widths_and_trains_on(tiny_data, tmp_path):
    """--bit-search-fraction 0.5: the gates learn for half the QAT steps, then every layer's bit-width is
    fixed at its read-out (projected onto the targets) and the rest of the steps train at it."""
    import torch

    from daq_core import cpq

    out = tmp_path / "cpq-search"
    res = run_recipe("recipes.resnet20_cifar10",
                     _cpq_args(tiny_data, out, "--framework", "fx", "--bits", "W8A8", "--learn-bits",
                               "--target-avg-bits", "W4A4", "--bit-regularization", "0.1", "--gate-lr", "0.2",
                               "--bit-search-fraction", "0.5", "--float-epochs", "0", "--gate-optimizer", "sgd"),
                     timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "qat"][-1]
    assert report["bit_search_fraction"] == 0.5 and report["gate_optimizer"] == "sgd"
    assert report["bit_projection"]["fixed_at_step"] == round(0.5 * steps)
    for role in ("weight", "activation"):
        assert abs(report["avg_bits"][role] - 4.0) <= 0.25, report["avg_bits"]
    assert "bit-width search ends" in res.stdout
    # the fixed gates are in the final checkpoint: P(z > 0) exactly 0 or 1 everywhere
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    gates = [v for k, v in state.items() if k.endswith("gate_logits")]
    assert len(gates) >= 36 and all(cpq.gates_fixed(g) for g in gates)   # every weight and activation
    assert report["int_acc"] is not None and report["agreement"] >= 99.0


def test_bit_search_fraction_is_checked(capsys, tiny_data, tmp_path):
    for extra, message in ((["--learn-bits", "--bit-search-fraction", "0"], "must be in (0, 1]"),
                           (["--bit-search-fraction", "0.5"], "applies to --quantizer cpq --learn-bits only")):
        rc = resnet20_cifar10.main(base_args(tiny_data, tmp_path / "out", "--quantizer", "cpq", "--bits", "W8A8",
                                             "--float-epochs", "0", *extra))
        assert rc != 0
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_brevitas_learned_bit_widths_export_per_layer_qonnx(tiny_data, tmp_path):
    pytest.importorskip("qonnx")
    out = tmp_path / "cpq-brevitas"
    args = base_args(tiny_data, out, "--framework", "brevitas", "--quantizer", "cpq", "--bits", "W6A6",
                     "--learn-bits", "--target-avg-bits", "W4A5", "--gate-lr", "0.2", "--onnx-eval-images", "4",
                     "--float-epochs", "0", "--max-steps-per-epoch", "4")
    res = run_recipe("recipes.resnet20_cifar10", args, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["layer_bits"]) == 18
    assert abs(report["avg_bits"]["weight"] - 4.0) <= 0.25 and abs(report["avg_bits"]["activation"] - 5.0) <= 0.25
    assert "qonnx" in report["artifacts"] and report["agreement"] == 100.0


def test_fixed_bit_cpq_fx_runs_and_converts(tiny_data, tmp_path):
    out = tmp_path / "cpq-fixed"
    rc = resnet20_cifar10.main(base_args(tiny_data, out, "--framework", "fx", "--quantizer", "cpq", "--bits", "W4A4",
                                         "--epochs", "1", "--max-steps-per-epoch", "2", "--float-epochs", "0"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["int_acc"] is not None and report["layer_bits"] and report["learn_bits"] is False
    assert all(v == {"weight": 4, "activation": 4} for v in report["layer_bits"].values())
    # CPQ-SPEC §7's clustering measure, in grid steps: 0 on the grid, 0.25 for uniform weights
    assert all(0.0 <= report["clustering"][k] <= 0.5 for k in ("after_prepare", "after_qat"))


@pytest.mark.parametrize("extra,message", [
    (["--learn-bits", "--target-avg-bits", "9"], r"must lie in [1, 8]"),
    (["--learn-bits", "--target-avg-bits", "W0.5A4"], r"must lie in [1, 8]"),
    (["--learn-bits", "--target-avg-bits", "W1.5A4"], "learned weight bit-widths stop at 2"),
    (["--learn-bits", "--bit-regularization", "-1"], "--bit-regularization must be a finite number >= 0"),
    (["--learn-bits", "--target-avg-bits", "W6A4", "--bits", "W4A4"], "learned bit-widths only drop bits"),
    (["--target-avg-bits", "4"], "add --learn-bits"),
    (["--drop-rate", "1.5"], "--drop-rate must be in [0, 1)"),
    (["--drop-rate", "-0.1"], "--drop-rate must be in [0, 1)"),
])
def test_bad_bit_width_settings_are_refused(capsys, tiny_data, tmp_path, extra, message):
    args = base_args(tiny_data, tmp_path / "out", "--framework", "fx", "--quantizer", "cpq", "--bits", "W8A8",
                     "--float-epochs", "0", *extra)
    rc = resnet20_cifar10.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_learned_bits_on_a_backend_that_cannot_hold_them(capsys, tiny_data, tmp_path):
    args = base_args(tiny_data, tmp_path / "out", "--framework", "stock", "--quantizer", "cpq", "--bits", "W8A8",
                     "--learn-bits", "--float-epochs", "0")
    assert resnet20_cifar10.main(args) == 2
    assert "cannot hold a learned bit-width" in capsys.readouterr().err
    args = base_args(tiny_data, tmp_path / "out2", "--framework", "fx", "--bits", "W8A8", "--learn-bits",
                     "--float-epochs", "0")
    assert resnet20_cifar10.main(args) == 2
    assert "--learn-bits needs --quantizer cpq" in capsys.readouterr().err


def test_drop_rate_is_refused_outside_cpq(capsys, tiny_data, tmp_path):
    args = base_args(tiny_data, tmp_path / "out", "--framework", "fx", "--bits", "W4A4", "--drop-rate", "0",
                     "--float-epochs", "0")
    assert resnet20_cifar10.main(args) == 2
    assert "--drop-rate sets CPQ's DropBits" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["fx", "brevitas"])
@pytest.mark.parametrize("drop_rate", [None, 0.0, 0.03])
def test_drop_rate_reaches_every_quantizer(framework, drop_rate):
    """--drop-rate sets DropBits's rate of every CPQ quantizer in both plugins (None: the library default)."""
    import torch
    from daq_core import cpq
    from daq_core.family import FamilyStateMixin
    from recipes import models, quant

    if framework == "brevitas":
        pytest.importorskip("brevitas")
    spec = quant.QuantSpec(framework, 4, 4, quantizer="cpq", drop_rate=drop_rate)
    qat = quant.prepare(models.create_model("resnet20_cifar", 10), spec, (torch.randn(1, 3, 32, 32),))
    rates = {m.drop_rate for m in qat.modules() if isinstance(m, FamilyStateMixin) and m.family is cpq.CPQ}
    assert rates == {cpq.DEFAULT_DROP_RATE if drop_rate is None else drop_rate}
