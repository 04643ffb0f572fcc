"""DAQ against the quantizers users would pick instead: CIFAR-10 ResNet-20, one budget for all.

Every row runs the ResNet-20 recipe (``recipes/resnet20_cifar10.py``: first conv and last linear
float) from the same float model with the same training budget and recipe — SGD on the weights,
Adam on the quantizer parameters, cosine, knowledge distillation from the float model, BN frozen
at its float statistics — and only the quantizer differs:

==================  ====================================================================
``daq-fx``          DAQ through ``daq_fx`` (torch.ao FX), converted to an x86 int8 model; every
                    activation the int model quantizes (residual-add operands too) at A bits
``daq-fx-res8``     the same with ``--intermediate-act-bits 8``: conv/linear inputs at A bits (the
                    paper's quantization points), residual-add operands at 8 bits
``daq-brevitas``    DAQ through ``daq_brevitas`` (BN unfolded, residual adds float)
``torchao-ste``     torch.ao's default QAT ``FakeQuantize`` (min/max observers, STE)
``lsq``             torch.ao's ``_LearnableFakeQuantize`` (LSQ), LSQ-paper initialisation
``brevitas-ste``    Brevitas's stock STE quantizers of the same bit-width
``daq-soft-b4``     ablation: fixed-temperature soft argmax (β = 4) in training, rounding at test
``daq-soft-b24``    ablation: the same with β = 24
``daq-ste``         ablation: DAQ with a straight-through gradient instead of DASR's
``n2uq-fx``         N2UQ (learned non-uniform thresholds, G-STE) through ``daq_fx``
``cpq-fx``          CPQ (reconstructed from the abstract) at fixed W/A bits through ``daq_fx``
``cpq-fx-p0``       the same with DropBits off (``--drop-rate 0``, chosen on the carved split)
``cpq-fx-learned``  CPQ with learned per-layer bit-widths (largest W8A8) whose size-weighted
                    average is held at the row's W/A bits (``--target-avg-bits``)
``cpq-fx-learned-p001`` the same, gates starting at a 0.01 drop rate (``--drop-rate 0.01``)
``cpq-fx-learned-sgd`` the same, the gates trained by SGD at lr 1.0 (``--gate-optimizer sgd``)
==================  ====================================================================

The float model is the shared pretrained checkpoint fine-tuned for ``--float-epochs`` on the
JPEG training images (made once, reused by every row). Training uses the training images minus a
split carved from them (the last 500 images of each class); accuracy is top-1 on the **unseen
CIFAR-10 test images** (``ROOT/test/``, the extracted ``cifar10-jpeg-test-a.tar.gz``;
``--eval-split test``, the default). ``--eval-split carved`` evaluates on the carved split instead
(for tuning only: the shared pretrained ResNet-20 was trained on those images, which flatters the
float model by ~5 points; the old carved-split table is kept in ``results/accuracy_carved/``). Results: one JSON per row
under ``--output`` (rows already there are reused: the run is resumable), ``accuracy.json`` with
all rows, and ``accuracy.md`` with the table for the README.

Usage::

    python -m benchmarks.accuracy                       # full: 1 QAT epoch per row (see README for the wall time)
    python -m benchmarks.accuracy --bits W4A4 --methods daq-fx,lsq
    python -m benchmarks.accuracy --quick --data DIR    # smoke: tiny budget, any ImageFolder, minutes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED_CHECKPOINT = REPO.parent / "shared" / "data" / "resnet20-cifar10-12fca82f.th"

#: method -> recipe flags (everything else is the common budget)
METHODS: Dict[str, List[str]] = {
    "daq-fx": ["--framework", "fx", "--intermediate-act-bits", "0"],
    "daq-fx-res8": ["--framework", "fx", "--intermediate-act-bits", "8"],
    "daq-brevitas": ["--framework", "brevitas"],
    "torchao-ste": ["--framework", "stock"],
    "lsq": ["--framework", "lsq"],
    "brevitas-ste": ["--framework", "brevitas-stock"],
    "daq-soft-b4": ["--framework", "fx", "--rounding", "soft", "--beta", "4", "--intermediate-act-bits", "0"],
    "daq-soft-b24": ["--framework", "fx", "--rounding", "soft", "--beta", "24", "--intermediate-act-bits", "0"],
    "daq-ste": ["--framework", "fx", "--rounding", "ste", "--intermediate-act-bits", "0"],
    "n2uq-fx": ["--framework", "fx", "--quantizer", "n2uq"],
    "cpq-fx": ["--framework", "fx", "--quantizer", "cpq"],
    # DropBits's rate chosen on the carved split (python -m benchmarks.cpq_drop_rate): 0 of 0, 0.01, 0.03, 0.1
    "cpq-fx-p0": ["--framework", "fx", "--quantizer", "cpq", "--drop-rate", "0"],
    # {bits}: the row's bit-widths become the target averages; W8A8 the largest bit-widths
    "cpq-fx-learned": ["--framework", "fx", "--quantizer", "cpq", "--learn-bits", "--bits", "W8A8",
                       "--target-avg-bits", "{bits}", "--gate-lr", "0.05"],
    # the gates dropping at P(z > 0) (not at a hard-concrete sample) and starting at a 0.01 drop rate: the
    # smallest non-zero rate of the carved-split grid (benchmarks.cpq_drop_rate; 0 is not a gate)
    "cpq-fx-learned-p001": ["--framework", "fx", "--quantizer", "cpq", "--learn-bits", "--bits", "W8A8",
                            "--target-avg-bits", "{bits}", "--gate-lr", "0.05", "--drop-rate", "0.01"],
    # the gates trained by plain SGD (lr 1.0): the regulariser's size weighting and each layer's task
    # sensitivity then decide which bits go (Adam moved every gate at about its lr); chosen on the carved
    # split against Adam with and without a fixed-bit tail (docs/cpq.md)
    "cpq-fx-learned-sgd": ["--framework", "fx", "--quantizer", "cpq", "--learn-bits", "--bits", "W8A8",
                           "--target-avg-bits", "{bits}", "--gate-optimizer", "sgd", "--gate-lr", "1.0",
                           "--drop-rate", "0.01"],
}
DESCRIPTIONS = {
    "daq-fx": "DAQ (daq_fx, torch.ao FX → x86 int8)",
    "daq-fx-res8": "DAQ (daq_fx) with 8-bit residual-add operands",
    "daq-brevitas": "DAQ (daq_brevitas, BN unfolded)",
    "torchao-ste": "torch.ao default QAT (FakeQuantize, min/max, STE)",
    "lsq": "LSQ (torch.ao _LearnableFakeQuantize)",
    "brevitas-ste": "Brevitas stock STE quantizers",
    "daq-soft-b4": "ablation: fixed β = 4 soft argmax, rounding at test",
    "daq-soft-b24": "ablation: fixed β = 24 soft argmax, rounding at test",
    "daq-ste": "ablation: DAQ with an STE gradient",
    "n2uq-fx": "N2UQ (daq_fx; QAT only, no int conversion)",
    "cpq-fx": "CPQ (reconstructed from the abstract; daq_fx → x86 int8)",
    "cpq-fx-p0": "CPQ, DropBits off (p = 0, chosen on the carved split)",
    "cpq-fx-learned": "CPQ, learned per-layer bit-widths at that average (reconstructed; daq_fx → x86 int8)",
    "cpq-fx-learned-p001": "CPQ, learned bit-widths, gates starting at a 0.01 drop rate",
    "cpq-fx-learned-sgd": "CPQ, learned bit-widths, gates trained by SGD (chosen on the carved split)",
}
#: the baselines' signed weight range has no 1-bit grid ({-1, 0}); A32 = float activations (fx only)
ONLY_2BIT_UP = ("torchao-ste", "lsq", "brevitas-ste")
FULL_BITS = ("W4A4", "W2A2", "W1A32", "W1A1")
#: methods run at every bit-width of FULL_BITS; the rest at W4A4 and W2A2 (the table's floor)
LOW_BIT_METHODS = ("daq-fx", "daq-fx-res8")

#: the common QAT budget and recipe (DAQ-SPEC §6 learning rates, tuned quantizer lr, KD, frozen BN)
COMMON = ["--batch-size", "128", "--lr", "0.01", "--quant-lr", "1e-3", "--freeze-bn", "--distill",
          "--eval-batch-size", "500", "--no-progress", "--onnx-eval-images", "0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--bits", default=None, help="comma-separated WxAy (default: W4A4,W2A2 for every method, plus"
                                                " W1A32,W1A1 for " + ", ".join(LOW_BIT_METHODS) + ")")
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs per row (the budget)")
    p.add_argument("--float-epochs", type=int, default=1, help="float fine-tuning epochs of the shared checkpoint")
    p.add_argument("--data", default="cifar10", help="cifar10 (the shared JPEG copy) or an ImageFolder root")
    p.add_argument("--eval-split", default="test", choices=("test", "carved"),
                   help="cifar10: evaluate on the unseen test images (ROOT/test) or on the carved training split")
    p.add_argument("--checkpoint", default=str(SHARED_CHECKPOINT), help="pretrained float ResNet-20 weights")
    p.add_argument("--float-model", default=None, help="reuse this fine-tuned float model (recipe float_model.pt)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "accuracy"),
                   help="directory for the per-row results (rows already there are reused)")
    p.add_argument("--rerun", action="store_true", help="ignore rows already in --output")
    p.add_argument("--compile-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the DAQ kernels (full mode)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: random-init model, tiny subsets, a few steps per row (for the test suite)")
    p.add_argument("--keep-runs", action="store_true", help="keep each row's recipe output (checkpoints, models)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: rebuild accuracy.json/.md from the rows already in --output (e.g. after"
                        " several runs with disjoint --methods in parallel)")
    return p.parse_args(argv)


def _parse_list(text: str, allowed, what: str) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"error: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def plan(methods: List[str], bits: Optional[List[str]]):
    rows = []
    for bw in (bits or FULL_BITS):
        for m in methods:
            if bits is None and bw not in ("W4A4", "W2A2") and m not in LOW_BIT_METHODS:
                continue
            if bw.startswith("W1A") and m in ONLY_2BIT_UP:
                continue
            if bw.endswith("A32") and not METHODS[m][1] == "fx":
                continue
            rows.append((m, bw))
    return rows


def run_recipe(argv: List[str], log_path: Path) -> int:
    """Run the ResNet-20 recipe in this process, its output captured in ``log_path``."""
    from recipes import resnet20_cifar10

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = resnet20_cifar10.main(argv)
        except SystemExit as e:   # argparse errors
            rc = int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
            import traceback
            traceback.print_exc()
            rc = 1
    log_path.write_text(buf.getvalue())
    return rc


def common_args(args) -> List[str]:
    if args.quick:
        return ["--batch-size", "16", "--lr", "0.01", "--quant-lr", "1e-3", "--freeze-bn", "--distill",
                "--eval-batch-size", "64", "--no-progress", "--onnx-eval-images", "0", "--img-size", "16",
                "--max-steps-per-epoch", "3", "--workers", "0"]
    return COMMON + (["--compile-kernels"] if args.compile_kernels else [])


def make_float_model(args, out: Path) -> Path:
    """The float starting point, made once: the shared checkpoint fine-tuned ``--float-epochs``."""
    target = out / "float_model.pt"
    if args.float_model:
        return Path(args.float_model)
    if target.is_file() and not args.rerun:
        return target
    run_dir = out / "runs" / "float"
    argv = ["--data", args.data, "--eval-split", args.eval_split, "--bits", "W4A4", "--framework", "fx", "--epochs", "0",
            "--float-epochs", str(args.float_epochs), "--output", str(run_dir)] + common_args(args)
    if not args.quick:
        if not Path(args.checkpoint).is_file():
            raise SystemExit(f"error: --checkpoint {args.checkpoint} not found (the shared pretrained ResNet-20);"
                             f" pass --checkpoint PATH or --float-model PATH")
        argv += ["--initial-checkpoint", args.checkpoint]
    run_dir.mkdir(parents=True, exist_ok=True)
    rc = run_recipe(argv, out / "float.log")
    if rc != 0 or not (run_dir / "float_model.pt").is_file():
        raise SystemExit(f"error: the float fine-tuning failed (rc {rc}); see {out / 'float.log'}")
    shutil.copyfile(run_dir / "float_model.pt", target)
    return target


def run_row(args, method: str, bits: str, float_model: Path, out: Path) -> Dict:
    row_file = out / f"{method}-{bits}.json"
    if row_file.is_file() and not args.rerun:
        return json.loads(row_file.read_text())
    run_dir = out / "runs" / f"{method}-{bits}"
    argv = ["--data", args.data, "--eval-split", args.eval_split, "--bits", bits, "--epochs", str(args.epochs),
            "--float-epochs", "0",
            "--initial-checkpoint", str(float_model), "--output", str(run_dir)] + common_args(args) + \
        [flag.replace("{bits}", bits) for flag in METHODS[method]]
    t = time.time()
    rc = run_recipe(argv, out / f"{method}-{bits}.log")
    if rc == 130:   # Ctrl-C / SIGTERM inside the row: stop here, record nothing (rerun resumes this row)
        raise SystemExit(f"interrupted during {method} {bits}; rerun the same command to continue")
    row = {"method": method, "description": DESCRIPTIONS[method], "bits": bits, "rc": rc,
           "wall_s": round(time.time() - t, 1), "epochs": args.epochs, "quick": args.quick,
           "recipe_args": argv}
    report = run_dir / "report.json"
    if rc == 0 and report.is_file():
        rep = json.loads(report.read_text())
        for key in ("float_acc", "after_prepare_acc", "qat_acc", "int_acc", "agreement", "qat_minus_float",
                    "train_images", "val_images", "batch_size", "lr", "quant_lr", "data", "eval_split", "tune_acc",
                    "layer_bits", "avg_bits", "bit_projection", "clustering"):
            row[key] = rep.get(key)
        row["qat_steps"] = _qat_steps(run_dir)
    else:
        row["error"] = (out / f"{method}-{bits}.log").read_text()[-2000:]
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    row_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _qat_steps(run_dir: Path) -> Optional[int]:
    path = run_dir / "metrics.jsonl"
    steps = None
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("stage") == "qat":
                    steps = rec.get("step", steps)
    return steps


def _f(v, signed=False):
    if v is None:
        return "n/a"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _split_words(row: Dict) -> str:
    n = row.get("val_images", "n/a")
    split = row.get("eval_split", "carved")   # rows from before the split was recorded were carved
    if split == "test":
        return f"**{n} unseen CIFAR-10 test images** (test split)"
    return (f"{n} images carved from the training set (**carved split, seen by the pretrained model**:"
            f" it flatters the float model by ~5 points)")


def table(rows: List[Dict], args, planned=()) -> str:
    float_acc = next((r["float_acc"] for r in rows if r.get("float_acc") is not None), None)
    all_bits = {r["bits"] for r in rows} | {b for _, b in planned}
    bits_order = [b for b in FULL_BITS if b in all_bits] + sorted(all_bits - set(FULL_BITS))
    lines = ["| bits | method | QAT top-1 (%) | Δ vs float | int8 model top-1 (%) | int = QAT predictions (%) |",
             "|---|---|---|---|---|---|"]
    for b in bits_order:
        for m in METHODS:
            r = next((x for x in rows if x["bits"] == b and x["method"] == m), None)
            if r is None:
                if (m, b) in planned:
                    lines.append(f"| {b} | {DESCRIPTIONS[m]} | not run yet | | | |")
                continue
            if r.get("rc") != 0:
                lines.append(f"| {b} | {DESCRIPTIONS[m]} | failed (see {m}-{b}.log) | | | |")
                continue
            mark = "" if r.get("float_acc") == float_acc else " ¹"
            lines.append(f"| {b} | {DESCRIPTIONS[m]} | {_f(r.get('qat_acc'))}{mark} | {_f(r.get('qat_minus_float'), True)} |"
                         f" {_f(r.get('int_acc'))} | {_f(r.get('agreement'))} |")
    any_row = next((r for r in rows if r.get("rc") == 0), {})
    head = [f"Float model: {_f(float_acc)}% top-1 (the shared checkpoint fine-tuned {args.float_epochs} epoch(s) on"
            f" the JPEG images). Budget per row: {args.epochs} QAT epoch(s)"
            f" ({any_row.get('qat_steps', 'n/a')} steps of batch {any_row.get('batch_size', 'n/a')},"
            f" {any_row.get('train_images', 'n/a')} training images). Evaluated on {_split_words(any_row)}.", ""]
    others = sorted({r["float_acc"] for r in rows if r.get("rc") == 0 and r.get("float_acc") not in (None, float_acc)})
    if others:
        head[-1:] = [f"¹ started from a float model re-made by the same command on another machine"
                     f" ({', '.join(_f(v) + '%' for v in others)}: CPU float training is not bitwise reproducible"
                     f" across machines); Δ is against that row's own float model.", ""]
    return "\n".join(head + lines) + "\n"


def compact_table(rows: List[Dict], bits=("W4A4", "W2A2")) -> str:
    """One line per method, QAT and int8 top-1 per bit-width (the README's results table)."""
    float_acc = next((r["float_acc"] for r in rows if r.get("float_acc") is not None), None)
    head = "| method | " + " | ".join(f"{b} QAT | {b} int8" for b in bits) + " |"
    lines = [head, "|---|" + "---|---|" * len(bits), "| float model | " + " | ".join(f"{_f(float_acc)} | " for _ in bits) + " |"]
    for m in METHODS:
        cells, seen = [], False
        for b in bits:
            r = next((x for x in rows if x["bits"] == b and x["method"] == m), None)
            if r is None:
                cells += ["not run yet", ""]
            elif r.get("rc") != 0:
                cells += ["failed", ""]
                seen = True
            else:
                cells += [_f(r.get("qat_acc")), _f(r.get("int_acc")) if r.get("int_acc") is not None else "—"]
                seen = True
        if seen:
            lines.append(f"| {DESCRIPTIONS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = _parse_list(args.methods, METHODS, "method")
    bits = _parse_list(args.bits, [f"W{w}A{a}" for w in range(1, 9) for a in (*range(1, 9), 32)], "bits") \
        if args.bits else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile_kernels and not args.quick:
        import daq_core
        daq_core.use_compiled_kernels(True)
    t0 = time.time()
    todo = plan(methods, bits)
    rows = []
    if args.table_only:
        rows = [json.loads((out / f"{m}-{b}.json").read_text()) for m, b in todo if (out / f"{m}-{b}.json").is_file()]
        todo = []
        float_model = args.float_model or out / "float_model.pt"
    else:
        float_model = make_float_model(args, out)
    for i, (m, b) in enumerate(todo, 1):
        row = run_row(args, m, b, float_model, out)
        rows.append(row)
        status = (f"QAT {_f(row.get('qat_acc'))}%  int {_f(row.get('int_acc'))}%" if row.get("rc") == 0
                  else f"FAILED (rc {row.get('rc')})")
        print(f"[{i}/{len(todo)}] {m:13s} {b:6s} {status}  ({row['wall_s']:.0f} s)", flush=True)
    summary = {"rows": rows, "float_model": str(float_model), "epochs": args.epochs,
               "float_epochs": args.float_epochs, "quick": args.quick, "wall_s": round(time.time() - t0, 1),
               "command": "python -m benchmarks.accuracy " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(rows, args, plan(methods, bits))
    (out / "accuracy.md").write_text(md)
    (out / "accuracy_compact.md").write_text(compact_table(rows))
    print(md)
    return 0 if all(r.get("rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
