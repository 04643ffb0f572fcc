"""benchmarks/cpq_drop_rate.py: the DropBits rate is chosen on the carved split; rows are reused; bad rates refused."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import cpq_drop_rate  # noqa: E402


@pytest.mark.parametrize("rates", ["1", "-0.1", "0,x", ""])
def test_bad_rates_are_refused(rates, tmp_path):
    with pytest.raises(SystemExit, match="--rates must be comma-separated numbers in"):
        cpq_drop_rate.main(["--rates", rates, "--output", str(tmp_path / "out.json")])


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint .* not found"):
        cpq_drop_rate.main(["--checkpoint", str(tmp_path / "nope.th"), "--output", str(tmp_path / "o.json")])


def test_grid_runs_each_rate_once_and_picks_the_best_carved_row(monkeypatch, tmp_path):
    carved = {0.0: 85.1, 0.01: 82.6, 0.1: 61.0}
    calls = []

    def fake_run(rate, args, method="cpq"):
        calls.append(rate if method == "cpq" else method)
        return {"method": method, "drop_rate": rate, "bits": args.bits, "steps": args.steps,
                "after_prepare_acc": 69.0, "qat_acc": carved[rate] if method == "cpq" else 99.0,
                "train_acc_in_train_mode": 50.0}

    ckpt = tmp_path / "ckpt.th"
    ckpt.write_bytes(b"x")
    out = tmp_path / "grid.json"
    monkeypatch.setattr(cpq_drop_rate, "run_rate", fake_run)
    args = ["--rates", "0.1,0", "--baselines", "", "--checkpoint", str(ckpt), "--output", str(out)]
    first = cpq_drop_rate.main(args)
    assert calls == [0.1, 0.0] and first["best"]["drop_rate"] == 0.0
    # a rerun with one more rate runs only that one; the file keeps every row, sorted by rate
    second = cpq_drop_rate.main(["--rates", "0,0.01,0.1", "--checkpoint", str(ckpt), "--output", str(out)])
    assert calls == [0.1, 0.0, 0.01, "torchao-ste", "lsq"]          # the baselines on the same budget
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["drop_rate"]) for r in rows] == [("cpq", 0.0), ("cpq", 0.01), ("cpq", 0.1),
                                                             ("lsq", None), ("torchao-ste", None)]
    assert second["best"]["qat_acc"] == 85.1                        # the best CPQ rate, never a baseline
    with pytest.raises(SystemExit, match="--baselines takes"):
        cpq_drop_rate.main(["--baselines", "brevitas", "--checkpoint", str(ckpt), "--output", str(out)])
