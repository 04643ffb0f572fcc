"""Helpers for the recipe tests: a tiny synthetic ImageFolder dataset and a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def make_image_folder(root: Path, classes: int = 4, train_per_class: int = 24, val_per_class: int = 8,
                      size: int = 16, seed: int = 0) -> Path:
    """ImageNet-layout folder whose classes are easy to tell apart (a bright quadrant, a colour, noise)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                h = size // 2
                y0, x0 = (c // 2 % 2) * h, (c % 2) * h
                img[y0:y0 + h, x0:x0 + h, :] = 120   # a bright quadrant ...
                img[:, :, c % 3] += 120               # ... and a class colour
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def base_args(data: Path, out: Path, *extra: str):
    return ["--data", str(data), "--model", "resnet20_cifar", "--img-size", "16", "--batch-size", "16",
            "--float-epochs", "1", "--float-lr", "0.1", "--epochs", "2", "--lr", "0.01", "--no-progress",
            "--eval-batch-size", "64", "--workers", "0", "--output", str(out), *extra]


def run_recipe(module: str, args, env_extra=None, timeout=300, torchrun_procs: int = 0):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # robust on busy CI machines; the runs are tiny
    env.update(env_extra or {})
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def load_model_state(ckpt: Path):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
