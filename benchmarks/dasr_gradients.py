"""How DASR's gradient compares with the straight-through estimator's, layer by layer, in depth.

One batch, the same initialised model, two backward passes: DAQ with DASR (``rounding="dasr"``)
and the same quantizers with a straight-through backward (``rounding="ste"``; the forwards are
identical). Prints and writes, per quantized conv in execution order, ``|∂L/∂W|_dasr / |∂L/∂W|_ste``,
and per DAQ quantizer the same ratio for the gradients of its learned parameters (bounds ``l, u``,
weight output scale ``s``; ``quantizer_param_ratios``) for three quantization layouts of the CIFAR-10 ResNet-20:

* ``fx-all``: ``daq_fx`` with every activation at A bits, residual-add operands included (the
  accuracy benchmark's ``daq-fx`` / ``daq-ste`` rows);
* ``fx-res8``: the same with 8-bit residual-add operands (``--intermediate-act-bits 8``);
* ``paper``: the authors' layout (``recipes.daq_reference.prepare_reference_fx``: conv inputs and
  weights quantized, BN unfolded, shortcuts float), from the authors' float checkpoint.

DASR's ``dQ/dt`` is below 1 on most of the range (weights σ = 1: 0.36–0.60; activations σ = 2: 0.50
on a level, 2.2 at a transition, 0.92 on average over uniform distances), and the backward pass
multiplies the factors of every activation quantizer it crosses. Where every path from the loss to a
layer crosses quantizers, the factors compound with depth.

Usage::

    python -m benchmarks.dasr_gradients                 # W2A2, 128 training images; ~1 minute
    python -m benchmarks.dasr_gradients --bits W4A4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="W2A2", help="WxAy")
    p.add_argument("--images", type=int, default=128, help="batch size (training images, first per class)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "dasr_gradients.json"))
    return p.parse_args(argv)


def _images(per_class: int, mean, std):
    from recipes.data import read_cifar10_archive

    images, labels = read_cifar10_archive(SHARED / "cifar10-jpeg-train.tar.gz", per_class)
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, labels


#: the DAQ quantizer parameters compared, by kind: weight quantizers' bounds ``l, u`` and output
#: scale ``s``, activation quantizers' bounds ``l, u``
PARAM_KINDS = ("weight l", "weight u", "weight s", "activation l", "activation u")


def _quantizer_grads(qat) -> Dict[str, List[float]]:
    """|grad| of every DAQ quantizer parameter, by kind, in module order."""
    from torch.ao.quantization import FakeQuantizeBase

    out: Dict[str, List[float]] = {k: [] for k in PARAM_KINDS}
    for name, mod in qat.named_modules():
        if not isinstance(mod, FakeQuantizeBase):
            continue
        role = "weight" if name.endswith("weight_fake_quant") else "activation"
        for pname, short in (("lower_bound", "l"), ("upper_bound", "u"), ("output_scale", "s")):
            p = getattr(mod, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.requires_grad and f"{role} {short}" in out:
                out[f"{role} {short}"].append(float(p.grad.abs().sum()) if p.grad is not None else 0.0)
    return out


def _ratios(prepare, names: List[str], init_x, x, y):
    """Per conv ``|dL/dW|`` DASR/STE, and per quantizer-parameter kind the DASR/STE ratios of ``|grad|``."""
    norms, qgrads = {}, {}
    for rounding in ("dasr", "ste"):
        torch.manual_seed(0)
        qat = prepare(rounding)
        with torch.no_grad():
            qat(init_x)                       # first-batch initialisation (same for both)
        qat.zero_grad()
        F.cross_entropy(qat(x), y).backward()
        norms[rounding] = {n: float(qat.get_submodule(n).weight.grad.norm()) for n in names}
        qgrads[rounding] = _quantizer_grads(qat)
    weights = {n: norms["dasr"][n] / max(norms["ste"][n], 1e-30) for n in names}
    params = {k: [d / s if s > 0 else None for d, s in zip(qgrads["dasr"][k], qgrads["ste"][k])]
              for k in PARAM_KINDS if qgrads["ste"][k]}
    return weights, params


def _median(values):
    v = sorted(x for x in values if x is not None)
    return v[len(v) // 2] if v else None


def main(argv=None) -> int:
    args = parse_args(argv)
    import daq_fx
    from recipes import data, models
    from recipes import daq_reference as ref

    w, a = (int(v) for v in args.bits.upper()[1:].split("A"))
    per_class = (2 * args.images + 9) // 10
    out: Dict[str, Dict[str, float]] = {}
    params: Dict[str, Dict[str, List[float]]] = {}

    model = models.create_model("resnet20_cifar", 10, initial_checkpoint=str(SHARED / "resnet20-cifar10-12fca82f.th"))
    x, y = _images(per_class, data.CIFAR_MEAN, data.CIFAR_STD)
    init_x, x, y = x[:args.images], x[args.images:2 * args.images], y[args.images:2 * args.images]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][1:]
    for layout, inter in (("fx-all", None), ("fx-res8", 8)):
        def prepare(rounding, inter=inter):
            mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", w, a, rounding=rounding, intermediate_act_bits=inter,
                                                         float_module_names=daq_fx.first_and_last_layer_names(model))
            return daq_fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (x[:2],))
        out[layout], params[layout] = _ratios(prepare, names, init_x, x, y)

    fp = ref.load_reference_float(SHARED / "daq-reference" / "cifar10_fp.pth")
    rx, ry = _images(per_class, data.IMAGENET_MEAN, data.IMAGENET_STD)
    rinit, rx, ry = rx[:args.images], rx[args.images:2 * args.images], ry[args.images:2 * args.images]
    out["paper"], params["paper"] = _ratios(lambda r: ref.prepare_reference_fx(copy.deepcopy(fp), w, a, rounding=r),
                           fp.quantized_conv_names(), rinit, rx, ry)

    print(f"|dL/dW| DASR / STE per quantized conv, input to output ({args.bits}, {args.images} images):")
    for layout, ratios in out.items():
        print(f"{layout:8s} " + " ".join(f"{v:.3f}" for v in ratios.values()))
    print("|dL/dparam| DASR / STE of the quantizer parameters, median over quantizers (first .. last):")
    for layout, kinds in params.items():
        kept = {k: [x for x in v if x is not None] for k, v in kinds.items()}   # None: no gradient under either
        print(f"{layout:8s} " + "; ".join(f"{k} {_median(v):.3f} ({v[0]:.3f} .. {v[-1]:.3f})"
                                          for k, v in kept.items() if v))
    Path(args.output).write_text(json.dumps({"bits": args.bits, "images": args.images, "ratios": out,
                                             "quantizer_param_ratios": params,
                                             "command": "python -m benchmarks.dasr_gradients " + " ".join(
                                                 sys.argv[1:] if argv is None else argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
