"""benchmarks/dasr_vs_ste_lr.py: the learning rate is chosen on the carved split, reported on the test split."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import dasr_vs_ste_lr as lr_bench  # noqa: E402


def _point(row, bits, lr, tune, test, **extra):
    return {"row": row, "method": lr_bench.ROWS[row], "bits": bits, "lr": lr, "rc": 0, "wall_s": 1.0,
            "tune_acc": tune, "test_acc": test, "int_acc": test, "float_acc": 86.5, "quick": False, **extra}


def test_choice_uses_the_carved_split_never_the_test_split():
    pts = [_point("dasr", "W2A2", 0.01, tune=60.0, test=70.0), _point("dasr", "W2A2", 0.04, tune=65.0, test=61.0)]
    assert lr_bench.choose(pts)["lr"] == 0.04          # best carved, although its test figure is lower
    tie = [_point("ste", "W2A2", 0.04, 70.0, 71.0), _point("ste", "W2A2", 0.01, 70.0, 69.0)]
    assert lr_bench.choose(tie)["lr"] == 0.01          # ties go to the smaller rate
    failed = [dict(_point("ste", "W4A4", 0.01, None, None), rc=1, error="boom")]
    assert lr_bench.choose(failed) is None


def test_rows_and_table_from_the_grid(tmp_path):
    grid = tmp_path / "grid"
    grid.mkdir()
    pts = [_point("dasr", "W2A2", 0.01, 58.0, 59.4), _point("dasr", "W2A2", 0.04, 62.5, 62.8),
           _point("ste", "W2A2", 0.01, 70.1, 69.8), _point("ste", "W2A2", 0.04, 68.0, 70.5),
           dict(_point("ste", "W4A4", 0.01, None, None), rc=1, error="nan")]
    for p in pts:
        lr_bench.grid_path(tmp_path, p["row"], p["bits"], p["lr"]).write_text(json.dumps(p))
    rows = lr_bench.build_rows(tmp_path)
    by = {(r["row"], r["bits"]): r for r in rows}
    dasr = json.loads((tmp_path / "dasr-W2A2.json").read_text())
    assert dasr == by[("dasr", "W2A2")]
    assert dasr["bits"] == "W2A2" and dasr["method"] and dasr["chosen_lr"] == 0.04
    assert dasr["epochs"] == [{"epoch": 1, "test_acc": 62.8, "tune_acc": 62.5, "int_acc": 62.8}]
    assert by[("ste", "W2A2")]["chosen_lr"] == 0.01 and by[("ste", "W2A2")]["epochs"][0]["test_acc"] == 69.8
    assert by[("ste", "W4A4")]["chosen_lr"] is None and by[("ste", "W4A4")]["epochs"] == []
    md = lr_bench.table(rows)
    assert "| W2A2 | dasr:" in md and "62.50 / 62.80" in md and "failed" in md
    assert "W2A2: DASR − STE backward at matched tuning = -7.00 points" in md


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--lrs"):
        lr_bench.main(["--lrs", "0.01,abc", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--lrs"):
        lr_bench.main(["--lrs", "-1", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown row nope"):
        lr_bench.main(["--rows", "dasr,nope", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="no grid points"):
        lr_bench.main(["--table-only", "--output", str(tmp_path)])
