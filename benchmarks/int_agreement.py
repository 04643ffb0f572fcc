"""How closely the int8 model reproduces the QAT model, FX and pt2e, over several first batches.

On the shared pretrained CIFAR-10 ResNet-20 (first conv and last linear float) and the first
``--images / 10`` JPEG images of each class (read from the shared archive), for each of
``--starts``: prepare DAQ W{b}A{b} QAT, initialise the quantizers from the 128 images beginning
at that index, switch to eval, convert, and compare the converted model with the QAT model on all
the images (top-1 agreement, cosine similarity of the logits, fraction of samples whose logits
agree to 1e-4). FX: ``daq_fx.convert_fx`` (x86 int8 kernels);
pt2e: ``daq_fx.pt2e.convert_pt2e`` (the q/dq model; skipped without torchao).

The two models disagree only where float (QAT) and integer arithmetic round a value that lies
within ~1e-5 of a rounding point differently. Such values repeat: a conv output is an integer
combination of codes, and the same combination recurs at many positions and samples, so one
unlucky (channel, combination) pair near a tie flips on every occurrence. Which pairs are near
a tie depends on the learned grids, hence on the first batch: the spread over ``--starts`` shows
how much of the agreement is luck.

Usage::

    python -m benchmarks.int_agreement                  # W4A4, 4 first batches, 400 images (~3 min)
    python -m benchmarks.int_agreement --bits 2 --starts 0,100
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CHECKPOINT = SHARED_DATA / "resnet20-cifar10-12fca82f.th"
DEFAULT_ARCHIVE = SHARED_DATA / "cifar10-jpeg-train.tar.gz"


def _fx(model, bits, first, x):
    import daq_fx
    torch.backends.quantized.engine = "x86"
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", bits, bits,
                                                 float_module_names=daq_fx.first_and_last_layer_names(model))
    qat = daq_fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (x[:2],))
    with torch.no_grad():
        qat(first)
        qat.eval()
        return daq_fx.output_agreement(qat(x), daq_fx.convert_fx(qat)(x))


def _pt2e(model, bits, first, x):
    import daq_fx
    from daq_fx import pt2e
    quantizer = pt2e.DAQQuantizer(bits, bits, float_module_names=daq_fx.first_and_last_layer_names(model))
    qat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(copy.deepcopy(model).train(), (x[:2],)), quantizer)
    with torch.no_grad():
        qat(first)
    pt2e.move_exported_model_to_eval(qat)
    with torch.no_grad():
        return daq_fx.output_agreement(qat(x), pt2e.convert_pt2e(qat)(x))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="float ResNet-20 checkpoint")
    parser.add_argument("--archive", default=str(DEFAULT_ARCHIVE),
                        help="cifar10-jpeg-train.tar.gz (read, not extracted)")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits (default 4)")
    parser.add_argument("--starts", default="0,100,200,272",
                        help="comma-separated indices of the first-batch windows (128 images each)")
    parser.add_argument("--images", type=int, default=400, help="validation images compared (default 400)")
    parser.add_argument("--output", default=None, help="JSON results")
    args = parser.parse_args(argv)
    try:
        starts = [int(s) for s in args.starts.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--starts must be comma-separated integers, got {args.starts!r}")
    if not starts:
        parser.error("--starts: give at least one index")
    if args.images < 128:
        parser.error(f"--images must be >= 128 (one first batch), got {args.images}")
    if max(starts) + 128 > args.images or min(starts) < 0:
        parser.error(f"--starts: every window of 128 images must lie within the {args.images} images")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} not found: pass the float ResNet-20 checkpoint")

    from recipes.data import CIFAR_MEAN, CIFAR_STD, DataError, read_cifar10_archive
    from recipes.models import create_model, load_float_checkpoint
    try:
        images, _ = read_cifar10_archive(args.archive, -(-args.images // 10))
    except DataError as error:
        parser.error(f"--archive: {error}")
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (images[:args.images].float() / 255 - mean) / std
    model = create_model("resnet20_cifar", 10)
    load_float_checkpoint(model, args.checkpoint)
    try:
        import torchao.quantization.pt2e  # noqa: F401
        flows = {"fx": _fx, "pt2e": _pt2e}
    except ImportError:
        print("torchao not installed: pt2e skipped (pip install 'daq-quant[pt2e]')")
        flows = {"fx": _fx}

    rows = []
    print(f"W{args.bits}A{args.bits}, {len(x)} images; per first batch: top-1 agreement / cosine / bit-exact samples")
    for start in starts:
        row = {"start": start}
        for name, run in flows.items():
            row[name] = run(model, args.bits, x[start:start + 128], x)
        rows.append(row)
        print(f"  first batch {start:4d}: " + "   ".join(
            f"{name} {r['top1']:.4f} / {r['cosine']:.6f} / {r['bit_exact_samples']:.4f}"
            for name, r in row.items() if name != "start"), flush=True)
    results = {"bits": args.bits, "images": len(x), "rows": rows}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
