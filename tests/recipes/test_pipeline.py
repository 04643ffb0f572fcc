"""End-to-end behaviour of the shared training pipeline (tiny data, ResNet-20 at 16 px, DAQ via daq_fx)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from recipe_helpers import base_args, load_model_state, run_recipe

MODULE = "recipes.resnet20_cifar10"


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    res = run_recipe(MODULE, base_args(tiny_data, out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res


def test_run_writes_report_metrics_plot_checkpoint(reference_run):
    out, res = reference_run
    for name in ("report.md", "report.json", "metrics.jsonl", "curves.png", "checkpoint.pt", "float_model.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in ("float_acc", "after_prepare_acc", "qat_acc", "int_acc", "agreement", "int_latency_ms"):
        assert isinstance(report[key], float), key
    assert report["bits"] == "W4A4" and report["framework"] == "fx"
    assert report["float_layers"] == ["conv1", "linear"]
    assert 0 < report["size"]["total_bits"] < report["size"]["float_model_bits"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("float", 1), ("qat", 1), ("qat", 2)]
    assert all("val_acc" in r and "img_per_s" in r for r in records)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "converted int accuracy" in (out / "report.md").read_text()
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["stage"] == "qat" and ckpt["epoch"] == 2
    assert {"optimizers", "schedulers", "rng", "float_model", "daq_recipe"} <= set(ckpt)
    assert len(ckpt["optimizers"]) == 2  # SGD on weights, Adam on quantizer parameters (DAQ-SPEC §6)
    assert any(k.endswith("upper_bound") for k in ckpt["model"])  # quantizer state is in the checkpoint
    assert not list(out.glob(".*tmp*"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.slow
def test_kill_after_first_qat_checkpoint_then_resume_is_bitwise_identical(reference_run, tiny_data, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    # checkpoint 1 = end of the float epoch, 2 = end of QAT epoch 1: SIGKILL right after it
    res = run_recipe(MODULE, base_args(tiny_data, out), {"DAQ_RECIPE_KILL_AFTER_CHECKPOINT": "2"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["stage"], ckpt["epoch"]) == ("qat", 1)
    assert not (out / "report.json").exists()
    res = run_recipe(MODULE, base_args(tiny_data, out, "--resume"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming from" in res.stdout
    _assert_same_weights(load_model_state(ref_out / "checkpoint.pt"), load_model_state(out / "checkpoint.pt"))
    ref = json.loads((ref_out / "report.json").read_text())
    got = json.loads((out / "report.json").read_text())
    for key in ("float_acc", "after_prepare_acc", "qat_acc", "int_acc"):
        assert ref[key] == got[key], key
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("img_per_s", "epoch_time_s")}  # noqa
                       for l in p.read_text().splitlines()]
    assert strip(ref_out / "metrics.jsonl") == strip(out / "metrics.jsonl")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_keeps_last_checkpoint_and_resumes(reference_run, tiny_data, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "interrupted"
    # 6 steps per epoch (96 images / 16): QAT step 9 is in the middle of QAT epoch 2
    res = run_recipe(MODULE, base_args(tiny_data, out), {"DAQ_RECIPE_SIGINT_AT": "qat:9"})
    assert res.returncode == 130, res.stdout[-2000:] + res.stderr[-2000:]
    assert "interrupted during qat epoch 2" in res.stderr and "--resume" in res.stderr
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)  # not corrupt
    assert (ckpt["stage"], ckpt["epoch"]) == ("qat", 1)
    assert not list(out.glob(".*tmp*"))
    res = run_recipe(MODULE, base_args(tiny_data, out, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(load_model_state(ref_out / "checkpoint.pt"), load_model_state(out / "checkpoint.pt"))


@pytest.mark.slow
def test_torchrun_two_process_gloo_matches_single_process(reference_run, tiny_data, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "ddp"
    res = run_recipe(MODULE, base_args(tiny_data, out, "--device", "cpu"), torchrun_procs=2, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((out / "report.json").read_text())
    ref = json.loads((ref_out / "report.json").read_text())
    assert got["processes"] == 2 and ref["processes"] == 1
    # different data order and per-process batches: equal within noise, not bitwise
    for key in ("float_acc", "qat_acc", "int_acc"):
        assert abs(got[key] - ref[key]) <= 25.0, (key, got[key], ref[key])
    assert got["int_acc"] > 40.0  # 4 classes: well above chance
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("float", 1), ("qat", 1), ("qat", 2)]


@pytest.mark.slow
def test_brevitas_qonnx_export_with_distillation(tiny_data, tmp_path):
    out = tmp_path / "brevitas"
    args = base_args(tiny_data, out, "--framework", "brevitas", "--distill", "--epochs", "1",
                     "--onnx-eval-images", "8")
    res = run_recipe(MODULE, args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distill"] is True and report["framework"] == "brevitas"
    assert (out / "model.qonnx.onnx").is_file(), report["artifacts"]
    assert report["int_backend"] == "QONNX (qonnx executor)" and report["int_eval_images"] == 8
    assert report["agreement"] >= 75.0  # the exported file reproduces the QAT model's predictions
