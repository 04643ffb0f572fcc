"""benchmarks/cost.py --quick: one run writes every ratio, finite and positive, for both models.

Timing targets are not asserted (the machines running the tests are shared and noisy).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import cost  # noqa: E402


def test_quick_run_writes_wellformed_ratios(tmp_path):
    out = tmp_path / "cost.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("DAQ_COMPILE", None)
    env["MALLOC_ARENA_MAX"] = "2"   # recorded, not interpreted
    r = subprocess.run([sys.executable, "-m", "benchmarks.cost", "--quick", "--output", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "target" in r.stdout
    results = json.loads(out.read_text())

    assert results["mode"] == "quick"
    assert results["malloc_env"].get("MALLOC_ARENA_MAX") == "2"
    assert set(results["models"]) == set(cost.MODEL_NAMES)
    for name in cost.MODEL_NAMES:
        model = results["models"][name]
        assert model["model"] == name
        for part in ("train_step", "memory", "latency"):
            assert part in model
    assert results["deploy_grid"] == {k: list(v) for k, v in cost.DEPLOY_GRID_QUICK.items()}
    expected = cost.ratio_keys(cost.MODEL_NAMES, cost.DEPLOY_GRID_QUICK)
    assert set(results["ratios"]) == set(expected)
    for key in expected:
        value = results["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        assert key in results["targets"] and key in results["meets_target"]
    # the targets are attached to their ratios (mobilenetv2's latency has targets, ResNet-20's not)
    assert results["targets"]["op/activation_per_tensor"] == 1.5
    assert results["targets"]["op/weight_per_channel"] == 1.5
    for name in cost.MODEL_NAMES:
        assert results["targets"][f"{name}/train_step"] == 1.25
        assert results["targets"][f"{name}/memory"] == 1.25
    assert results["targets"]["mobilenetv2_100/latency_exact"] == 0.4
    assert results["targets"]["mobilenetv2_100/latency_fast"] == 0.3
    assert results["targets"]["resnet20_cifar/latency_exact"] is None
    for op in ("activation_per_tensor", "weight_per_channel"):
        detail = results["op"][op]
        assert detail["builtin_s"] > 0 and detail["daq_eager_s"] > 0
    for name in cost.MODEL_NAMES:
        # latency is measured against the faster float layout (NCHW or channels_last), both reported
        lat = results["models"][name]["latency"]
        assert lat["float_s"] == min(lat["float_nchw_s"], lat["float_channels_last_s"])
        assert lat["float_layout"] in ("nchw", "channels_last")
        assert math.isclose(results["ratios"][f"{name}/latency_exact"], lat["exact_s"] / lat["float_s"])
        # TorchScript-frozen: like for like (int8 frozen ÷ float frozen), same int8 outputs, no target
        fz = lat["frozen"]
        assert fz["matches_eager"] is True
        assert fz["float_s"] == min(fz["float_nchw_s"], fz["float_channels_last_s"])
        assert math.isclose(results["ratios"][f"{name}/latency_fast_frozen"], fz["fast_s"] / fz["float_s"])
        assert results["targets"][f"{name}/latency_exact_frozen"] is None
    # deploy paths (issue 19): every path timed, ratios to the faster float eager layout and to float compile
    assert results["load_average"]["start"] and results["cpu"]
    for name in cost.DEPLOY_GRID_QUICK["models"]:
        deploy = results["deploy"][name]
        for key in ("fx_prepare_convert_s", "pt2e_export_prepare_convert_s", "onnx_export_integer_s",
                    "onnx_export_float_s", "float_compile_b1_s", "int8_compile_b1_s"):
            assert deploy["build_times"][key] > 0, key
        cell = deploy["cells"]["b1/t1"]
        lat = cell["latency_s"]
        assert lat["float_eager"] == min(lat["float_eager_nchw"], lat["float_eager_channels_last"])
        for variant in ("float_compiled", "fx_int8", "compiled_int8", "ort_int8", "ort_int8_qlinear", "ort_float"):
            key = f"deploy/{name}/b1/t1/{variant}/float_eager"
            assert math.isclose(results["ratios"][key], lat[variant] / lat["float_eager"]), key
        assert cell["agreement"]["ort_int8_equals_fx_int8"] is True       # the exact ONNX path
        assert deploy["int8_kernels"]["qconv"] == 19 and deploy["int8_kernels"]["hardtanh_post_ops"] == 19
    assert results["targets"]["deploy/resnet20_cifar/b1/t1/best_exact_int8/float_eager"] is None
    assert cost.target_of("deploy/mobilenetv2_100/b8/t2/best_exact_int8/float_eager") == 0.25
    assert cost.target_of("deploy/mobilenetv2_100/b8/t2/best_exact_int8/float_compiled") == 0.5
    markdown = (tmp_path / "cost_deploy.md").read_text()
    assert "| resnet20_cifar | 1 | 1 |" in markdown and "load average" in markdown
