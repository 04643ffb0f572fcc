"""benchmarks/accuracy.py --quick: every method runs and the results are well-formed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "recipes"))
from recipe_helpers import make_image_folder  # noqa: E402

sys.path.insert(0, str(REPO))
from benchmarks import accuracy  # noqa: E402


def test_plan_covers_the_table_floor_and_skips_what_cannot_run():
    rows = accuracy.plan(list(accuracy.METHODS), None)
    for method in accuracy.METHODS:
        assert (method, "W4A4") in rows and (method, "W2A2") in rows
    assert ("daq-fx", "W1A32") in rows and ("daq-fx", "W1A1") in rows
    # the baselines' signed 1-bit range is {-1, 0}: not run at W1
    assert not any(m in accuracy.ONLY_2BIT_UP and b.startswith("W1") for m, b in rows)
    explicit = accuracy.plan(["lsq", "daq-brevitas", "daq-fx"], ["W1A32", "W2A2"])
    assert explicit == [("daq-fx", "W1A32"), ("lsq", "W2A2"), ("daq-brevitas", "W2A2"), ("daq-fx", "W2A2")]


def test_unknown_method_is_named():
    with pytest.raises(SystemExit, match="unknown method nope"):
        accuracy.main(["--quick", "--methods", "daq-fx,nope"])


@pytest.mark.slow
def test_quick_mode_runs_every_method_and_writes_wellformed_results(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--quick", "--bits", "W2A2", "--data", str(data),
                        "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "accuracy.json").read_text())
    rows = summary["rows"]
    assert {row["method"] for row in rows} == set(accuracy.METHODS)
    for row in rows:
        assert row["rc"] == 0 and row["bits"] == "W2A2"
        assert 0.0 <= row["qat_acc"] <= 100.0 and 0.0 <= row["float_acc"] <= 100.0
        assert row["qat_minus_float"] == pytest.approx(row["qat_acc"] - row["float_acc"])
        assert row["qat_steps"] == 3
        if row["method"] == "n2uq-fx" or "brevitas" in row["method"]:
            assert row["int_acc"] is None              # QAT only / QONNX export, no int8 model
        else:
            assert 0.0 <= row["int_acc"] <= 100.0 and 0.0 <= row["agreement"] <= 100.0
    table = (out / "accuracy.md").read_text().splitlines()
    assert sum(1 for line in table if line.startswith("| W2A2 |")) == len(accuracy.METHODS)
    # the README table: one line per method, W2A2 cells filled, W4A4 not run
    compact = (out / "accuracy_compact.md").read_text().splitlines()
    for m in accuracy.METHODS:
        line = next(x for x in compact if x.startswith(f"| {accuracy.DESCRIPTIONS[m]} |"))
        assert line.split("|")[1:3] == [f" {accuracy.DESCRIPTIONS[m]} ", " not run yet "]
    assert sum(1 for x in compact if x.startswith("| ")) == len(accuracy.METHODS) + 2   # + header, float
    # a second run reuses the rows (resumable) and rewrites the same table
    r2 = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--quick", "--bits", "W2A2", "--data", str(data),
                         "--output", str(out), "--methods", "daq-fx"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((out / "accuracy.json").read_text())["rows"]
    assert again == [row for row in rows if row["method"] == "daq-fx"]
