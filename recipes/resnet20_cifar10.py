"""CIFAR-10 ResNet-20 (option A) with DAQ — the paper's Table 5/6 setting.

First conv and last linear stay float; ``--bits`` W1A1, W1A32, W2A2 or W4A4. Start from a float
checkpoint (``--initial-checkpoint resnet20-cifar10-12fca82f.th``, keys prefixed ``module.`` are
fine). Paper schedule: 400 epochs, batch 256, SGD lr 1e-2 (wd 1e-4; 5e-5 at 1/1, 1/2, 2/2)::

    python -m recipes.resnet20_cifar10 --data cifar10 --initial-checkpoint resnet20-cifar10-12fca82f.th \\
        --bits W2A2 --output runs/r20-w2a2

``--float-epochs 1`` first fine-tunes the float model (e.g. to the JPEG copy of CIFAR-10).
"""

from __future__ import annotations

import sys

from .models import RESNET20_FLOAT_LAYERS
from .train import main as _main

DEFAULTS = dict(model="resnet20_cifar", data="cifar10", framework="fx", bits=(4, 4), epochs=400, float_epochs=0,
                batch_size=256, lr=1e-2, float_lr=1e-2, weight_decay=None, quant_lr=1e-4, img_size=32,
                intermediate_act_bits=8)   # the paper quantizes conv inputs; residual adds: 8 bits (0: A bits)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--weight-decay" or a.startswith("--weight-decay=") for a in args):
        import argparse
        from .train import parse_bits
        bits = (4, 4)
        for i, a in enumerate(args):
            text = args[i + 1] if a == "--bits" and i + 1 < len(args) else a[7:] if a.startswith("--bits=") else None
            if text is not None:
                try:
                    bits = parse_bits(text)
                except argparse.ArgumentTypeError:
                    pass  # the parser reports it
        args += ["--weight-decay", "5e-5" if bits in ((1, 1), (1, 2), (2, 2)) else "1e-4"]  # DAQ-SPEC §6
    return _main(args, "resnet20_cifar10", "CIFAR-10 ResNet-20 with DAQ (first/last layer float)", DEFAULTS,
                 float_layers=RESNET20_FLOAT_LAYERS)


if __name__ == "__main__":
    sys.exit(main())
