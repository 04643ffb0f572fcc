"""DASR vs its STE backward at matched tuning: 1-epoch W2A2 / W4A4 fine-tuning, learning rate chosen per method.

The accuracy benchmark (``benchmarks.accuracy``) runs every method at one learning rate (0.01), and
there DAQ with a straight-through backward (``daq-ste``) beats DASR (``daq-fx``) at W2A2. DASR's
weight gradient is smaller than STE's (``benchmarks.dasr_gradients``), so at one fixed rate the two
train with different effective steps. This benchmark gives each method its own best rate:

* for each rounding (``dasr``: the ``daq-fx`` row, ``ste``: the ``daq-ste`` row), each bit-width and
  each weight learning rate of the grid, one run of the accuracy benchmark's recipe (same float model,
  same budget: 1 QAT epoch, batch 128, KD, BN frozen, quantizer lr 1e-3; only ``--lr`` differs), with
  ``--tune-eval``: the final QAT model is evaluated on the split carved from the training images
  (``tune_acc``) and on the unseen test images (``test_acc``);
* per (rounding, bit-width) the rate with the best **carved-split** accuracy is chosen (ties: the
  smaller rate); its **test** accuracy is the row's result. Nothing is chosen by the test split.

Writes ``RESULTS/grid/<rounding>-<bits>-lr<lr>.json`` per run (reused when present: the grid is
resumable, run by run), ``RESULTS/<rounding>-<bits>.json`` per row (``method``, ``bits``,
``epochs: [{"epoch": 1, "test_acc": ...}]``, the grid and the chosen rate) and ``RESULTS/table.md``.

Usage::

    python -m benchmarks.dasr_vs_ste_lr                       # the whole grid (W2A2 first)
    python -m benchmarks.dasr_vs_ste_lr --bits W2A2 --rows ste --lrs 0.04
    python -m benchmarks.dasr_vs_ste_lr --table-only          # rows and table.md from grid/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import accuracy as acc  # noqa: E402
from recipes.train import atomic_write_text  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results" / "dasr_vs_ste" / "matched_lr"
#: rounding -> the accuracy benchmark's method (recipe flags)
ROWS = {"dasr": "daq-fx", "ste": "daq-ste"}
ROW_NAMES = {"dasr": "DASR (adaptive temperature), every activation at A bits",
             "ste": "the same quantizer, straight-through backward (--rounding ste)"}
DEFAULT_LRS = (0.01, 0.04)
DEFAULT_BITS = ("W2A2", "W4A4")


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def grid_path(results: Path, row: str, bits: str, lr: float) -> Path:
    return results / "grid" / f"{row}-{bits}-lr{_lr_text(lr)}.json"


def _parse_lrs(text: str) -> List[float]:
    try:
        lrs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: --lrs must be comma-separated numbers, got {text!r}") from None
    if not lrs or any(not (0 < lr < 10) for lr in lrs):
        raise SystemExit(f"error: --lrs needs learning rates in (0, 10), got {text!r}")
    return lrs


def run_point(args, row: str, bits: str, lr: float, float_model: Path, results: Path) -> Dict:
    """One grid point: the accuracy benchmark's row ``ROWS[row]`` at ``bits`` with weight lr ``lr``."""
    path = grid_path(results, row, bits, lr)
    if path.is_file():
        return json.loads(path.read_text())
    run_dir = results / "runs" / path.stem
    common = acc.common_args(args)
    i = common.index("--lr")
    common = common[:i + 1] + [_lr_text(lr)] + common[i + 2:]
    argv = ["--data", args.data, "--eval-split", "test", "--tune-eval", "--bits", bits, "--epochs", "1",
            "--float-epochs", "0", "--initial-checkpoint", str(float_model), "--output", str(run_dir)] \
        + common + acc.METHODS[ROWS[row]]
    log = results / "grid" / f"{path.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    rc = acc.run_recipe(argv, log)
    if rc == 130:
        raise SystemExit(f"interrupted during {path.stem}; rerun the same command to continue")
    point = {"row": row, "method": ROWS[row], "bits": bits, "lr": lr, "rc": rc, "wall_s": round(time.time() - t, 1),
             "quick": args.quick, "recipe_args": argv, "threads": args.threads}
    report = run_dir / "report.json"
    if rc == 0 and report.is_file():
        rep = json.loads(report.read_text())
        point.update(tune_acc=rep.get("tune_acc"), test_acc=rep.get("qat_acc"), int_acc=rep.get("int_acc"),
                     float_acc=rep.get("float_acc"), eval_split=rep.get("eval_split"), data=rep.get("data"))
    else:
        point["error"] = log.read_text()[-2000:]
    shutil.rmtree(run_dir, ignore_errors=True)
    atomic_write_text(path, json.dumps(point, indent=2) + "\n")
    return point


def choose(points: Sequence[Dict]) -> Optional[Dict]:
    """The grid point with the best carved-split accuracy (ties: the smaller lr); never looks at test."""
    ok = [p for p in points if p.get("tune_acc") is not None]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["tune_acc"], -p["lr"]))


def build_rows(results: Path, lrs: Optional[Sequence[float]] = None) -> List[Dict]:
    """Row JSONs ``RESULTS/<rounding>-<bits>.json`` from the grid points present; returns the rows."""
    points: Dict[tuple, List[Dict]] = {}
    for path in sorted((results / "grid").glob("*.json")):
        p = json.loads(path.read_text())
        if lrs is None or any(abs(p["lr"] - lr) < 1e-12 for lr in lrs):
            points.setdefault((p["row"], p["bits"]), []).append(p)
    rows = []
    for (row, bits), pts in sorted(points.items(), key=lambda kv: (kv[0][1], list(ROWS).index(kv[0][0]))):
        pts = sorted(pts, key=lambda p: p["lr"])
        best = choose(pts)
        record = {
            "method": ROW_NAMES[row], "row": row, "benchmark_method": ROWS[row], "bits": bits,
            "lr_grid": [{"lr": p["lr"], "tune_acc": p.get("tune_acc"), "test_acc": p.get("test_acc"),
                         "int_acc": p.get("int_acc"), "wall_s": p.get("wall_s"),
                         **({"error": p["error"][-300:]} if "error" in p else {})} for p in pts],
            "chosen_by": "best accuracy on the split carved from the training images (tune_acc); ties: smaller lr",
            "chosen_lr": best["lr"] if best else None,
            "epochs": [{"epoch": 1, "test_acc": best["test_acc"], "tune_acc": best["tune_acc"],
                        "int_acc": best.get("int_acc")}] if best else [],
            "float_acc": next((p.get("float_acc") for p in pts if p.get("float_acc") is not None), None),
            "budget": "quick smoke (--quick: 3 steps of batch 16 at 16 px); not a result" if any(p.get("quick") for p in pts)
            else "1 QAT epoch (351 steps of batch 128 on 45,000 training images), KD from the float model,"
                      " BN frozen, quantizer Adam lr 1e-3; the accuracy benchmark's recipe with --lr from the grid",
            "quick": any(p.get("quick") for p in pts),
        }
        (results / f"{row}-{bits}.json").write_text(json.dumps(record, indent=2) + "\n")
        rows.append(record)
    return rows


def _f(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def table(rows: Sequence[Dict]) -> str:
    lrs = sorted({g["lr"] for r in rows for g in r["lr_grid"]})
    out = ["# DASR vs its STE backward at matched learning rates (1 epoch, CIFAR-10 ResNet-20)", "",
           "Each method's weight learning rate is chosen from the grid by its accuracy on the split carved from the"
           " training images (5,000 images; the pretrained model saw them, so these figures run high); the"
           " reported figure is the chosen run's QAT accuracy on the 5,000 unseen test images. Budget: "
           + (rows[0]["budget"] if rows else "") + ".", "",
           "| bits | method | chosen lr | test top-1 (chosen) | int8 top-1 | "
           + " | ".join(f"lr {_lr_text(lr)}: carved / test" for lr in lrs) + " |",
           "|---|---|---|---|---|" + "---|" * len(lrs)]
    for r in rows:
        by_lr = {g["lr"]: g for g in r["lr_grid"]}
        e = r["epochs"][0] if r["epochs"] else {}
        cells = []
        for lr in lrs:
            g = by_lr.get(lr)
            cells.append("not run" if g is None else ("failed" if "error" in g else
                                                     f"{_f(g['tune_acc'])} / {_f(g['test_acc'])}"))
        out.append(f"| {r['bits']} | {r['row']}: {r['method']} | {_lr_text(r['chosen_lr']) if r['chosen_lr'] else '—'}"
                   f" | {_f(e.get('test_acc'))} | {_f(e.get('int_acc'))} | " + " | ".join(cells) + " |")
    pairs = {}
    for r in rows:
        if r["epochs"]:
            pairs.setdefault(r["bits"], {})[r["row"]] = r["epochs"][0]["test_acc"]
    out.append("")
    for bits, d in sorted(pairs.items()):
        if "dasr" in d and "ste" in d:
            out.append(f"- {bits}: DASR − STE backward at matched tuning = {d['dasr'] - d['ste']:+.2f} points"
                       f" on the test images.")
    out += ["", "Regenerate: `python -m benchmarks.dasr_vs_ste_lr --table-only`; one grid point:"
            " `python -m benchmarks.dasr_vs_ste_lr --bits W2A2 --rows ste --lrs 0.04`.", ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--bits", default=",".join(DEFAULT_BITS), help="comma-separated WxAy")
    p.add_argument("--lrs", default=",".join(_lr_text(x) for x in DEFAULT_LRS), help="weight learning-rate grid")
    p.add_argument("--data", default="cifar10", help="cifar10 (the shared JPEG copy, train/ and test/ in one root)")
    p.add_argument("--float-model", default=None,
                   help="the fine-tuned float model (default: the accuracy benchmark's float_model.pt, made if absent)")
    p.add_argument("--checkpoint", default=str(acc.SHARED_CHECKPOINT),
                   help="pretrained float ResNet-20, used only when the float model has to be made")
    p.add_argument("--output", default=str(RESULTS_DIR), help="results directory")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile-kernels", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help="smoke mode (accuracy benchmark's --quick recipe flags)")
    p.add_argument("--table-only", action="store_true", help="run nothing: rows and table.md from grid/*.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = acc._parse_list(args.rows, ROWS, "row")
    bits = acc._parse_list(args.bits, [f"W{w}A{a}" for w in range(1, 9) for a in range(1, 9)], "bits")
    lrs = _parse_lrs(args.lrs)
    results = Path(args.output)
    results.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        args.float_epochs = 1
        args.rerun = False
        args.eval_split = "test"
        float_model = acc.make_float_model(args, REPO / "benchmarks" / "results" / "accuracy")
        for b in bits:
            for lr in lrs:
                for row in rows:
                    p = run_point(args, row, b, lr, float_model, results)
                    print(f"{row} {b} lr {_lr_text(lr)}: carved {_f(p.get('tune_acc'))}  test {_f(p.get('test_acc'))}"
                          f"  ({p['wall_s']:.0f} s){'  FAILED: see ' + str(grid_path(results, row, b, lr).with_suffix('.log')) if p.get('rc') else ''}",
                          flush=True)
    built = build_rows(results)
    if not built:
        raise SystemExit(f"no grid points in {results / 'grid'}: run the grid first (python -m benchmarks.dasr_vs_ste_lr)")
    (results / "table.md").write_text(table(built))
    print(table(built))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
