"""benchmarks.op_cost --device: option parsing, and a clear error where CUDA is asked for but absent."""

import pytest
import torch

from benchmarks import op_cost


def test_device_defaults_to_cpu_and_accepts_cuda_when_available(monkeypatch):
    assert op_cost.parse_args([]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert op_cost.parse_args(["--device", "cuda", "--quick"]).device == "cuda"
    assert op_cost.parse_args(["--device", "cuda:1"]).device == "cuda:1"


def test_cuda_requested_without_cuda_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        op_cost.main(["--device", "cuda", "--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda requested but CUDA is not available" in err and "--device cpu" in err
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        op_cost.activation_op_cost((2, 2), device="cuda")


def test_unknown_device_is_refused(capsys):
    with pytest.raises(SystemExit):
        op_cost.parse_args(["--device", "meta"])
    assert "cpu or cuda" in capsys.readouterr().err


def test_cpu_timing_runs_eager_on_a_small_tensor():
    res = op_cost.activation_op_cost((2, 4, 8, 8), repeats=2, kernels="eager", device="cpu")
    assert res["device"] == "cpu" and res["daq_eager_s"] > 0 and res["ratio_eager"] > 0
