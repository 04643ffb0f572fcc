"""Choose CPQ's DropBits rate on the carved split (never on the test images).

The 1-epoch benchmark row of CPQ at W4A4 fell from 81.22% right after prepare to 52.52% after QAT
(``benchmarks/results/accuracy/cpq-fx-W4A4.json``, DropBits at the spec's ``p_j = 0.1``). This script
runs short QAT fine-tunings of the shared pretrained ResNet-20 with each drop rate of a grid and
evaluates on the split carved from the training images (the last 500 images per class; the
pretrained model saw them, so only the *ordering* of the rates means something), with the
accuracy benchmark's recipe otherwise (batch 128, SGD lr 0.01, Adam 1e-3 on the quantizer
parameters, frozen BN, KD from the float model).

    python -m benchmarks.cpq_drop_rate                       # p in 0, 0.01, 0.03, 0.1; 60 steps each
                                                             # (+ torchao-ste and lsq on the same budget)
    python -m benchmarks.cpq_drop_rate --rates 0,0.1 --steps 30

Writes ``benchmarks/results/cpq_drop_rate.json`` (one row per rate / baseline, rows already there
reused), each with CPQ-SPEC §7's clustering measure before and after training.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CHECKPOINT = REPO.parent / "shared" / "data" / "resnet20-cifar10-12fca82f.th"


#: the same budget for the STE baselines (CPQ-SPEC §7's clustering comparison): recipe --framework
BASELINES = {"torchao-ste": "stock", "lsq": "lsq"}


def run_rate(rate, args, method: str = "cpq") -> dict:
    """One short QAT run on the carved split: CPQ at DropBits ``rate``, or a baseline (``rate`` None)."""
    from recipes import resnet20_cifar10

    out = Path(args.work_dir) / (f"p{rate:g}" if method == "cpq" else method)
    quantizer = (["--framework", "fx", "--quantizer", "cpq", "--drop-rate", f"{rate:g}"] if method == "cpq"
                 else ["--framework", BASELINES[method]])
    argv = ["--data", "cifar10", "--eval-split", "carved", "--bits", args.bits, "--epochs", "1",
            "--float-epochs", "0", "--initial-checkpoint", str(args.checkpoint), "--output", str(out),
            "--batch-size", "128", "--lr", "0.01", "--quant-lr", "1e-3", "--freeze-bn", "--distill",
            "--eval-batch-size", "500", "--no-progress", "--onnx-eval-images", "0", *quantizer,
            "--val-subset", str(args.val_images), "--max-steps-per-epoch", str(args.steps), "--workers", "0"]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    t = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = resnet20_cifar10.main(argv)
    if rc != 0:
        raise SystemExit(f"error: the {method} {rate} run failed (rc {rc}):\n{buf.getvalue()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    qat = [m for m in metrics if m.get("stage") == "qat"][-1]
    return {"method": method, "drop_rate": rate, "bits": args.bits, "steps": args.steps, "carved_images": args.val_images,
            "after_prepare_acc": report["after_prepare_acc"], "qat_acc": report["qat_acc"],
            "int_acc": report["int_acc"], "float_acc": report["float_acc"],
            "train_acc_in_train_mode": qat["train_acc"], "wall_s": round(time.time() - t, 1),
            # CPQ-SPEC §7: mean distance of the weights to their nearest grid point, in steps (0.25: uniform)
            "clustering": report.get("clustering"),
            "command": "python -m benchmarks.cpq_drop_rate " + " ".join(args.argv)}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rates", default="0,0.01,0.03,0.1", help="DropBits rates p_j to compare")
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="STE baselines run on the same budget (for the clustering measure); '' for none")
    p.add_argument("--steps", type=int, default=60, help="QAT steps (batch 128) per rate")
    p.add_argument("--val-images", type=int, default=1000, help="class-balanced images of the carved split")
    p.add_argument("--checkpoint", default=str(SHARED_CHECKPOINT), help="the pretrained float ResNet-20")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/cpq_drop_rate")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cpq_drop_rate.json"))
    args = p.parse_args(argv)
    args.argv = argv
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"error: --rates must be comma-separated numbers in [0, 1), got {args.rates!r}")
    if not rates or any(not 0.0 <= r < 1.0 for r in rates):
        raise SystemExit(f"error: --rates must be comma-separated numbers in [0, 1), got {args.rates!r}")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"error: --checkpoint {args.checkpoint} not found (the shared pretrained ResNet-20)")
    baselines = [b for b in args.baselines.split(",") if b.strip()]
    if any(b not in BASELINES for b in baselines):
        raise SystemExit(f"error: --baselines takes {', '.join(BASELINES)}, got {args.baselines!r}")
    torch.set_num_threads(args.threads)
    path = Path(args.output)
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for method, rate in [("cpq", r) for r in rates] + [(b, None) for b in baselines]:
        if any(r["method"] == method and r["drop_rate"] == rate and r["bits"] == args.bits
               and r["steps"] == args.steps for r in rows):
            continue
        row = run_rate(rate, args, method)
        rows.append(row)
        rows.sort(key=lambda r: (r["bits"], r["steps"], r["method"], r["drop_rate"] or 0.0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        label = f"CPQ p = {rate:g}" if method == "cpq" else method
        print(f"{label}: carved top-1 after prepare {row['after_prepare_acc']:.2f}% -> after {args.steps} QAT steps"
              f" {row['qat_acc']:.2f}% (train-mode accuracy while training {row['train_acc_in_train_mode']:.1f}%)",
              flush=True)
    best = max((r for r in rows if r["method"] == "cpq" and r["bits"] == args.bits
                and r["steps"] == args.steps), key=lambda r: r["qat_acc"])
    print(f"best on the carved split: p = {best['drop_rate']:g} ({best['qat_acc']:.2f}%)")
    return {"rows": rows, "best": best}


if __name__ == "__main__":
    main()
