"""The DAQ authors' released CIFAR-10 ResNet-20 models, evaluated through both plugins.

Loads ``cifar10_fp.pth`` (float), ``cifar10_W1A1.pth`` and ``cifar10_W1A32.pth`` (the authors'
400-epoch DAQ models, ``../shared/data/daq-reference/``, layout and eval forward in
``../shared/docs/DAQ-REFERENCE.md``) with :mod:`recipes.daq_reference` and evaluates on the
ImageFolder ``DATA_ROOT/test/`` (the extracted ``cifar10-jpeg-test-a.tar.gz``):

* ``fp/float``: ``resnet20_daq_reference`` in float;
* ``W1A1/brevitas``, ``W1A32/brevitas``: ``daq_brevitas`` QAT models in eval mode;
* ``W1A1/fx``, ``W1A32/fx``: ``daq_fx`` QAT models in eval mode;
* ``W1A1/fx-int8``: the ``daq_fx`` model converted to an x86 int8 model.

The FX model's conv-output grids (8-bit, the accumulator lattice) are placed on
``--calibration-per-class`` images per class of ``DATA_ROOT/train/`` when it exists (never on the
test images). Writes ``--output`` (``reference.json`` and ``reference.md``: the table beside the
paper's numbers on the original PNG test set, with this JPEG copy's float drop stated) and, with
``--save-predictions FILE``, a JSON mapping each key above to the predicted class indices in
ImageFolder order, so anyone can compare predictions with another implementation.

Usage::

    python -m benchmarks.reference --data-root ~/.cache/daq/cifar10-jpeg
    python -m benchmarks.reference --data-root DIR --save-predictions preds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CHECKPOINTS = REPO.parent / "shared" / "data" / "daq-reference"
#: the paper's CIFAR-10 test accuracy (original PNG images), DAQ-REFERENCE.md
PAPER = {"fp": 91.4, "W1A1": 85.8, "W1A32": 91.2}
FILES = {"fp": "cifar10_fp.pth", "W1A1": "cifar10_W1A1.pth", "W1A32": "cifar10_W1A32.pth"}
DESCRIPTIONS = {
    "fp/float": "float model (resnet20_daq_reference)",
    "brevitas": "daq_brevitas, QAT model in eval mode",
    "fx": "daq_fx, QAT model in eval mode",
    "fx-int8": "daq_fx → x86 int8 model (torch.ao lowered)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="directory holding test/<class>/*.jpg (and train/ for the FX calibration)")
    p.add_argument("--checkpoints", default=str(DEFAULT_CHECKPOINTS),
                   help="directory with cifar10_fp.pth, cifar10_W1A1.pth, cifar10_W1A32.pth")
    p.add_argument("--save-predictions", default=None, metavar="FILE",
                   help="write {key: [predicted class, ...]} in ImageFolder order to this JSON file")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results"),
                   help="directory for reference.json and reference.md")
    p.add_argument("--calibration-per-class", type=int, default=100,
                   help="training images per class for the FX output grids (0: centred grids)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images (smoke runs)")
    p.add_argument("--batch-size", type=int, default=500)
    return p.parse_args(argv)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int) -> List[int]:
    from recipes.daq_reference import normalize_images

    model.eval()
    return torch.cat([model(normalize_images(xb)).argmax(1) for xb in images.split(batch_size)]).tolist()


def calibration_images(root: Path, per_class: int):
    """The first ``per_class`` images of each class of ``root/train`` (ImageNet-normalised), or None."""
    from recipes import data
    from recipes.daq_reference import normalize_images

    if per_class <= 0 or not (root / "train").is_dir():
        return None
    _, images, labels = data.read_image_folder(root / "train", root / ".daq-cache-v1.pt")
    idx = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique()])
    return normalize_images(images[idx])


def run(args) -> Dict:
    from recipes import data
    from recipes import daq_reference as ref

    root = Path(args.data_root).expanduser()
    if not (root / "test").is_dir():
        raise SystemExit(f"error: {root}/test does not exist: extract cifar10-jpeg-test-a.tar.gz into"
                         f" --data-root (tar xzf cifar10-jpeg-test-a.tar.gz -C {root})")
    ckpt = Path(args.checkpoints).expanduser()
    for f in FILES.values():
        if not (ckpt / f).is_file():
            raise SystemExit(f"error: {ckpt / f} not found: pass --checkpoints DIR holding the authors' files")
    classes, images, labels = data.read_image_folder(root / "test")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    calib = calibration_images(root, args.calibration_per_class)
    preds: Dict[str, List[int]] = {}
    wall: Dict[str, float] = {}

    def record(key, make):
        t = time.time()
        model = make()
        preds[key] = predict(model, images, args.batch_size)
        wall[key] = round(time.time() - t, 1)
        acc = 100.0 * (torch.tensor(preds[key]) == labels).float().mean().item()
        print(f"{key:16s} {acc:6.2f}%  ({wall[key]:.0f} s)", flush=True)
        return model

    record("fp/float", lambda: ref.load_reference_float(ckpt / FILES["fp"]))
    for kind in ("W1A1", "W1A32"):
        path = ckpt / FILES[kind]
        record(f"{kind}/brevitas", lambda: ref.to_brevitas(path))
        fx = record(f"{kind}/fx", lambda: ref.to_daq_fx(path, calibration=calib))
        if kind == "W1A1":
            record(f"{kind}/fx-int8", lambda: ref.convert_reference_fx(fx))
    acc = {k: 100.0 * (torch.tensor(v) == labels).float().mean().item() for k, v in preds.items()}
    agree = {}
    for kind in ("W1A1", "W1A32"):
        keys = [k for k in preds if k.startswith(kind + "/")]
        for a in keys:
            for b in keys:
                if a < b:
                    same = (torch.tensor(preds[a]) == torch.tensor(preds[b])).float().mean().item()
                    agree[f"{a} = {b}"] = 100.0 * same
    result = {"data": str(root / "test"), "images": len(labels), "classes": classes,
              "calibration_images": 0 if calib is None else len(calib), "accuracy": acc,
              "paper_png": PAPER, "float_drop_jpeg": PAPER["fp"] - acc["fp/float"], "agreement": agree,
              "wall_s": wall, "versions": {"torch": torch.__version__},
              "command": ("python -m benchmarks.reference " + " ".join(sys.argv[1:])).replace(str(Path.home()), "~")}
    return result, preds


def table(r: Dict) -> str:
    acc, paper = r["accuracy"], r["paper_png"]
    lines = [f"The DAQ authors' released ResNet-20 models on {r['images']} CIFAR-10 test images (this project's"
             f" JPEG copy, quality 75) against the paper's numbers on the original PNG test set. The JPEG copy"
             f" costs the float model **{r['float_drop_jpeg']:.1f} points** ({paper['fp']} → {acc['fp/float']:.2f});"
             f" compare the quantized rows with the float row of the same column, not with the paper.", "",
             "| model | paper (PNG) | float / brevitas (JPEG) | daq_fx QAT (JPEG) | daq_fx x86 int8 (JPEG) |",
             "|---|---|---|---|---|",
             f"| FP | {paper['fp']} | {acc['fp/float']:.2f} | | |"]
    for kind in ("W1A1", "W1A32"):
        cells = [f"{acc[f'{kind}/{p}']:.2f}" if f"{kind}/{p}" in acc else "—" for p in ("brevitas", "fx", "fx-int8")]
        lines.append(f"| {kind} | {paper[kind]} | " + " | ".join(cells) + " |")
    lines += ["", "Prediction agreement between the paths (same images):", ""]
    lines += [f"- {k}: {v:.2f}%" for k, v in r["agreement"].items()]
    lines += ["", f"Command: `{r['command']}` (FX output grids placed on {r['calibration_images']} training images)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result, preds = run(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    (out / "reference.md").write_text(md)
    if args.save_predictions:
        Path(args.save_predictions).write_text(json.dumps(preds) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
