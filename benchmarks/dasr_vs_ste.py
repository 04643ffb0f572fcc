"""DASR vs STE vs fixed-β soft rounding: the paper's W1A1 CIFAR-10 ResNet-20 setting, resumable.

Trains the DAQ authors' ResNet-20 from their float checkpoint (``cifar10_fp.pth``,
``../shared/docs/DAQ-REFERENCE.md``) in the paper's structure — every block conv's input and weight
quantized to 1 bit by DAQ quantizers (:func:`recipes.daq_reference.prepare_reference_fx`), BN
unfolded and in training mode, residual adds, stem and head float — with the reference recipe:
batch 256, random crop 32 (zero padding 4) + horizontal flip on the uint8 images, then the ImageNet
normalisation; SGD lr 0.1, momentum 0.9, weight decay 1e-4 on the network weights; Adam lr 1e-4 without
weight decay on the quantizer parameters; both cosine-annealed to 0 over the row's planned epochs
(stepped once per epoch); the paper's first-batch initialisation (weights ``l, u = ∓3`` on the
standardised weight, activations ``u = 3 std``, and the layer output scale matched to the float conv:
:func:`calibrate_output_scales`). One row per rounding:

* ``dasr``: DASR with the adaptive temperature (the paper's method);
* ``ste``: the same forward (rounding), straight-through backward (the paper's STE "combine" row);
* ``soft-b4``: the fixed-temperature kernel soft argmax (β = 4) while training; eval mode rounds.

Training images: ``DATA_ROOT/train`` minus the last ``--tune-per-class`` (500) images of each class
(kept aside as the tuning split, unused here); every epoch is evaluated (``model.eval()``) on the
unseen ``DATA_ROOT/test`` images. Before training, the "step 0" accuracy (right after prepare and
the first-batch initialisation) and the float model's accuracy are recorded.

Resumable: after every epoch the checkpoint (model, both optimizers and schedulers, RNG states,
epoch, the per-epoch records) is written atomically to ``WORK_DIR/<row>/checkpoint.pt`` and the row's
results to ``RESULTS_DIR/<row>-W1A1.json``. Rerunning the same command continues after the last
finished epoch exactly: each epoch's shuffling and augmentation draw from a generator seeded with
``(seed, epoch)`` alone. A non-finite loss stops the row (the message and the JSON name the row,
epoch and step); the other rows still run.

Usage::

    python -m benchmarks.dasr_vs_ste                          # the three rows, 10 epochs each
    python -m benchmarks.dasr_vs_ste --rows dasr --epochs 20  # one row
    python -m benchmarks.dasr_vs_ste --table-only             # table.md and curves.png from the JSONs
    # smoke run (a few steps; must write elsewhere):
    python -m benchmarks.dasr_vs_ste --rows dasr --epochs 1 --max-steps-per-epoch 3 --test-subset 500 \\
        --results-dir /tmp/dasr_smoke --work-dir /tmp/dasr_smoke/runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CHECKPOINT = REPO.parent / "shared" / "data" / "daq-reference" / "cifar10_fp.pth"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "dasr_vs_ste"
DEFAULT_WORK = REPO / "runs" / "dasr_vs_ste"
DEFAULT_SMOKE_WORK = REPO / "runs" / "dasr_vs_ste-smoke"
BITS = "W1A1"
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1

#: row -> rounding of every DAQ quantizer (``daq_fx.DAQFakeQuantize(rounding=, beta=)``)
ROWS: Dict[str, Dict] = {
    "dasr": {"rounding": "dasr", "beta": None,
             "method": "DASR (adaptive temperature; forward rounds, distance-aware soft backward)"},
    "ste": {"rounding": "ste", "beta": None,
            "method": "STE (the same rounding forward, straight-through backward)"},
    "soft-b4": {"rounding": "soft", "beta": 4.0,
                "method": "kernel soft argmax with fixed temperature beta=4 in training (eval mode rounds)"},
}
#: the paper's CIFAR-10 ResNet-20 W1A1 test accuracies (400 epochs, original PNG test set)
PAPER_EPOCHS = 400
PAPER = {"dasr": 85.8, "ste": 81.7, "annealing": 72.2, "soft-b4": 13.5}
PAPER_LABELS = {"dasr": "DASR", "ste": 'STE "combine"', "annealing": "annealing", "soft-b4": "fixed β=4"}

#: the reference recipe (DAQ-REFERENCE.md), recorded in every row's JSON
RECIPE = {
    "batch_size": 256,
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "params": "network weights (convs, BN, stem, head)"},
    "adam": {"lr": 1e-4, "weight_decay": 0.0, "params": "quantizer parameters (l, u, output scale s)"},
    "schedule": "cosine annealing to 0 over the planned epochs, stepped once per epoch, both optimizers",
    "augmentation": "random crop 32 with zero padding 4 + horizontal flip on uint8 images, then ImageNet mean/std",
    "loss": "cross-entropy",
    "structure": "prepare_reference_fx(weight_bits=1, act_bits=1): each block conv's input and weight quantized"
                 " (per-tensor DAQ, init='std'); BN unfolded, training mode; stem, residual adds, head float",
    "init": "first training batch (epoch 0's first batch), BN in training mode: weights l,u = -3,3 on the"
            " standardised weight; activations l=0, u=3 std (times daq_fx's off-lattice factor 1-1e-4);"
            " then per layer the output scale s so that mean|conv(a_q, s w_q)| = mean|conv(x, W)|"
            " (the paper's beta); BN running statistics left as the float model's",
    "eval": "model.eval() (BN running statistics; the soft row rounds) on DATA_ROOT/test after every epoch",
}


class RowStopped(RuntimeError):
    """A row stopped before its planned epochs (non-finite loss); the message names row, epoch and step."""


class RowLock:
    """``WORK_DIR/<row>/lock`` holding the pid of the process training the row: one process per row.

    A lock left by a process that no longer runs is taken over.
    """

    def __init__(self, work: Path, row: str):
        self.path, self.row = work / "lock", row

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)        # stale: its process is gone
                    continue
                except PermissionError:
                    pass
                raise SystemExit(f"row {self.row}: process {pid} is training it already ({self.path}); wait for it"
                                 f" or stop it (kill {pid}) before resuming")
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise SystemExit(f"row {self.row}: cannot take {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------

@dataclass
class Data:
    """uint8 ``N x 3 x H x W`` images and labels; ``train`` is the training split minus the tuning split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    description: str


def load_data(root, tune_per_class: int = 500, train_subset: Optional[int] = None,
              test_subset: Optional[int] = None, seed: int = 0) -> Data:
    """``root/train`` minus the last ``tune_per_class`` images of each class, and ``root/test``.

    Decoded with :func:`recipes.data.read_image_folder` (sharing :func:`recipes.data.load_cifar10`'s
    caches). ``train_subset``: a deterministic random subset (smoke runs); ``test_subset``: every
    k-th test image (all classes kept).
    """
    from recipes.data import DataError, read_image_folder

    root = Path(root).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} does not exist: extract the CIFAR-10 archives there, e.g. `mkdir -p {root}"
                            f" && tar xzf ../shared/data/cifar10-jpeg-train.tar.gz -C {root} && tar xzf"
                            f" ../shared/data/cifar10-jpeg-test-a.tar.gz -C {root}`, or pass --data-root")
    classes, images, labels = read_image_folder(root / "train", root / ".daq-cache-v1.pt")
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c in range(len(classes)):
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= tune_per_class:
            raise DataError(f"class {classes[c]} of {root / 'train'} has {len(idx)} images: cannot keep"
                            f" {tune_per_class} aside as the tuning split")
        if tune_per_class:
            keep[idx[-tune_per_class:]] = False
    train_images, train_labels = images[keep], labels[keep]
    test_classes, test_images, test_labels = read_image_folder(root / "test", root / ".daq-cache-test-v1.pt")
    if test_classes != classes:
        raise DataError(f"{root}/test and {root}/train have different class folders")
    text = (f"{root}/train minus the last {tune_per_class} images of each class ({len(train_labels)} images);"
            f" eval: {root}/test ({len(test_labels)} unseen test images)")
    if train_subset is not None and train_subset < len(train_labels):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(train_labels), generator=g)[:train_subset].sort().values
        train_images, train_labels = train_images[idx], train_labels[idx]
        text += f"; SMOKE: train subset of {train_subset}"
    if test_subset is not None and test_subset < len(test_labels):
        idx = torch.linspace(0, len(test_labels) - 1, test_subset).round().long()
        test_images, test_labels = test_images[idx], test_labels[idx]
        text += f"; SMOKE: test subset of {test_subset}"
    return Data(train_images, train_labels, test_images, test_labels, text)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``, the images' own size) and horizontal flip of uint8 images.

    All random numbers come from ``generator`` (crop offsets, then flips), so a seeded epoch is reproducible.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s shuffling and augmentation: depends on ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(data: Data, epoch: int, seed: int, batch_size: int, max_steps: Optional[int] = None):
    """Yield ``(normalised images, labels)`` of one epoch: a seeded shuffle, the last batch kept if partial."""
    from recipes.daq_reference import normalize_images

    g = epoch_generator(seed, epoch)
    perm = torch.randperm(len(data.train_labels), generator=g)
    steps = math.ceil(len(perm) / batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    for step in range(steps):
        idx = perm[step * batch_size:(step + 1) * batch_size]
        yield normalize_images(augment(data.train_images[idx], g)), data.train_labels[idx]


def steps_per_epoch(n_train: int, batch_size: int, max_steps: Optional[int] = None) -> int:
    steps = math.ceil(n_train / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


# --------------------------------------------------------------------------------------
# model, initialisation
# --------------------------------------------------------------------------------------

def build_model(checkpoint, row: str) -> torch.fx.GraphModule:
    """The authors' float ResNet-20 prepared as the W1A1 QAT model of ``row`` (train mode)."""
    from recipes.daq_reference import load_reference_float, prepare_reference_fx

    spec = ROWS[row]
    model = load_reference_float(checkpoint)
    return prepare_reference_fx(model, weight_bits=1, act_bits=1, rounding=spec["rounding"], beta=spec["beta"]).train()


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_output_scales(qat: torch.fx.GraphModule, images: torch.Tensor) -> Dict[str, float]:
    """The paper's output-scale init (Eq. 3): per quantized conv, ``mean|conv(a_q, s·w_q)| = mean|conv(x, W)|``.

    The paper initialises ``beta = mean|conv(x, W)| / mean|conv(A_q, W_q)|`` on the first batch. Here
    the weight quantizer's ``output_scale`` ``s`` multiplies the ±1 weights and activations stay in
    natural units, so ``s`` is multiplied by ``mean|conv(x, W)| / mean|conv(a_q, s·w_q)|`` with ``x`` the
    conv's float input (before its input quantizer) and ``W`` its float weight. One forward of
    ``images`` in the model's current mode; layers are calibrated in order, each seeing the outputs of
    the already calibrated layers before it (as in the reference, which initialises during its first
    forward). Run it after the quantizers' own first-batch initialisation.

    Returns:
        ``conv name -> s`` after calibration.
    """
    quantizers = qat.meta["daq_reference_quantizers"]
    float_inputs: Dict[str, torch.Tensor] = {}
    scales: Dict[str, float] = {}
    hooks = []

    def keep_input(conv):
        def hook(module, args):
            float_inputs[conv] = args[0].detach()
        return hook

    def match_output(conv):
        def hook(module, args, out):
            x = float_inputs.pop(conv)
            target = F.conv2d(x, module.weight, module.bias, module.stride, module.padding, module.dilation,
                              module.groups).abs().mean()
            ratio = target / out.abs().mean().clamp_min(1e-12)
            fq = module.weight_fake_quant
            fq.output_scale.mul_(ratio)
            scales[conv] = float(fq.output_scale.reshape(-1)[0])
            return out * ratio
        return hook

    try:
        for conv, (in_name, _) in quantizers.items():
            hooks.append(qat.get_submodule(in_name).register_forward_pre_hook(keep_input(conv)))
            hooks.append(qat.get_submodule(conv).register_forward_hook(match_output(conv)))
        qat(images)
    finally:
        for h in hooks:
            h.remove()
    return scales


@torch.no_grad()
def initialize(qat: torch.fx.GraphModule, images: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """The paper's first-batch initialisation on ``images`` (BN in training mode), BN statistics untouched.

    1. one forward: the activation quantizers' own first-batch init (``l = 0``, ``u = 3 std``; the weight
       quantizers' ``l, u = ∓3`` were set by ``prepare``);
    2. :func:`calibrate_output_scales`.

    The BN running statistics are restored afterwards (the first training step updates them as usual).

    Returns:
        ``{"act_upper": {conv: u}, "output_scale": {conv: s}}``.
    """
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in _batchnorms(qat) if bn.running_mean is not None]
    was_training = qat.training
    qat.train()
    try:
        qat(images)
        scales = calibrate_output_scales(qat, images)
    finally:
        for bn, mean, var, count in saved:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        qat.train(was_training)
    quantizers = qat.meta["daq_reference_quantizers"]
    uppers = {conv: float(qat.get_submodule(in_name).upper_bound.reshape(-1)[0])
              for conv, (in_name, _) in quantizers.items()}
    return {"act_upper": uppers, "output_scale": scales}


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device: str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on uint8 ``images`` (ImageNet-normalised here)."""
    from recipes.daq_reference import normalize_images

    was_training = model.training
    model.eval()
    correct = 0
    try:
        for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
            correct += int((model(normalize_images(xb).to(device)).argmax(1).cpu() == yb).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def make_optimizers(qat: nn.Module, epochs: int):
    import daq_fx

    quant, rest = daq_fx.quantizer_parameters(qat)
    sgd = torch.optim.SGD(rest, lr=RECIPE["sgd"]["lr"], momentum=RECIPE["sgd"]["momentum"],
                          weight_decay=RECIPE["sgd"]["weight_decay"])
    adam = torch.optim.Adam(quant, lr=RECIPE["adam"]["lr"], weight_decay=RECIPE["adam"]["weight_decay"])
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0) for opt in (sgd, adam)]
    return sgd, adam, scheds


def rounding_of(qat: nn.Module) -> Dict[str, tuple]:
    """``quantizer name -> (rounding, beta)`` of every enabled DAQ quantizer (what distinguishes the rows).

    The conv-output quantizers of :func:`recipes.daq_reference.prepare_reference_fx` (for the int
    backend, set by ``set_output_grids`` after training) are disabled while training: not listed.
    """
    from daq_fx.fake_quantize import DAQFakeQuantize

    return {name: (m.rounding, m.beta) for name, m in qat.named_modules()
            if isinstance(m, DAQFakeQuantize) and int(m.fake_quant_enabled[0]) == 1}


# --------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------

def _config(args, row: str, n_train: int, n_test: int) -> Dict:
    """What a checkpoint must match to be resumed (hyperparameters and data sizes, not paths)."""
    spec = ROWS[row]
    return {"row": row, "rounding": spec["rounding"], "beta": spec["beta"], "bits": BITS, "epochs": args.epochs,
            "seed": args.seed, "batch_size": args.batch_size, "tune_per_class": args.tune_per_class,
            "train_subset": args.train_subset, "test_subset": args.test_subset,
            "max_steps_per_epoch": args.max_steps_per_epoch, "n_train": n_train, "n_test": n_test,
            "version": CHECKPOINT_VERSION}


def _command(argv: Sequence[str]) -> str:
    return "python -m benchmarks.dasr_vs_ste" + "".join(" " + shlex.quote(a) for a in argv)


def _write_json(path: Path, obj: Dict) -> None:
    from recipes.train import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _row_json(row: str, args, argv, data: Data, state: Dict, finished: bool, stopped: Optional[str] = None) -> Dict:
    spec = ROWS[row]
    return {
        "method": spec["method"], "row": row, "bits": BITS, "rounding": spec["rounding"], "beta": spec["beta"],
        "model": "resnet20_daq_reference (the DAQ authors' ResNet-20) from cifar10_fp.pth",
        "planned_epochs": args.epochs, "epochs_done": len(state["epochs"]), "finished": finished,
        "stopped": stopped,
        "float_test_acc": state["float_test_acc"], "step0": state["step0"], "epochs": state["epochs"],
        "init": state["init"],
        "paper": {"epochs": PAPER_EPOCHS, "test_acc": PAPER.get(row), "test_set": "original PNG CIFAR-10 test set"},
        "recipe": dict(RECIPE, batch_size=args.batch_size, seed=args.seed),
        "steps_per_epoch": steps_per_epoch(len(data.train_labels), args.batch_size, args.max_steps_per_epoch),
        "smoke": _is_smoke(args), "data": data.description,
        "command": _command(argv), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "device": args.device, "host": platform.node(),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_row(row: str, args, argv: Sequence[str], data: Data, log=print) -> Dict:
    """Train (or resume) one row to its planned epochs; returns its JSON record.

    Raises:
        RowStopped: a non-finite loss (the JSON records it under ``"stopped"``).
    """
    work = Path(args.work_dir) / row
    work.mkdir(parents=True, exist_ok=True)
    with RowLock(work, row):
        return _run_row(row, args, argv, data, work, log)


def _refuse_to_overwrite(json_path: Path, ckpt_path: Path, row: str, restart: bool) -> None:
    """A row JSON that records finished epochs is never overwritten by a fresh start.

    Starting afresh happens when the row's checkpoint is missing (another machine, a cleaned work dir):
    without this check the first write of the new run replaced the recorded epochs with none.
    """
    if restart or not json_path.is_file():
        return
    try:
        done = len(json.loads(json_path.read_text()).get("epochs", []))
    except (ValueError, OSError):
        return
    if done:
        raise SystemExit(f"row {row}: {json_path} records {done} finished epoch(s) but its checkpoint {ckpt_path} is"
                         f" missing, so the row cannot resume. Starting afresh would overwrite those epochs: pass"
                         f" --work-dir where the checkpoint is, --results-dir elsewhere for a new run, or --restart"
                         f" to start this row again and replace its JSON")


def _run_row(row: str, args, argv: Sequence[str], data: Data, work: Path, log) -> Dict:
    from recipes.train import atomic_save, rng_state, set_rng_state

    ckpt_path = work / CHECKPOINT_NAME
    json_path = Path(args.results_dir) / f"{row}-{BITS}.json"
    config = _config(args, row, len(data.train_labels), len(data.test_labels))
    device = torch.device(args.device)

    ckpt = None
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(f"row {row}: {ckpt_path} was written with other settings ({shown}). Rerun the command"
                             f" that wrote it to resume, or start afresh with another --work-dir (or delete {work})")
        if ckpt["epoch"] >= args.epochs:
            log(f"[{row}] finished: {ckpt['epoch']}/{args.epochs} epochs ({ckpt_path})")
            record = _row_json(row, args, argv, data, ckpt["state"], finished=True)
            _write_json(json_path, record)
            return record

    qat = build_model(args.checkpoint, row).to(device)
    sgd, adam, scheds = make_optimizers(qat, args.epochs)
    if ckpt is not None:
        qat.load_state_dict(ckpt["model"])
        sgd.load_state_dict(ckpt["sgd"])
        adam.load_state_dict(ckpt["adam"])
        for sched, st in zip(scheds, ckpt["schedulers"]):
            sched.load_state_dict(st)
        set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        if ckpt.get("threads") != torch.get_num_threads():
            log(f"[{row}] note: the checkpoint was written with {ckpt.get('threads')} threads, this process uses"
                f" {torch.get_num_threads()}: float reductions differ, so the continuation is not bit-identical to"
                f" an uninterrupted run (pass --threads {ckpt.get('threads')} for that)")
        del ckpt
        log(f"[{row}] resuming after epoch {len(state['epochs'])}/{args.epochs} ({ckpt_path})")
    else:
        _refuse_to_overwrite(json_path, ckpt_path, row, getattr(args, "restart", False))
        t0 = time.time()
        float_acc = evaluate(load_float(args.checkpoint), data.test_images, data.test_labels, device="cpu")
        first_x, _ = next(epoch_batches(data, 0, args.seed, args.batch_size))
        init = initialize(qat, first_x.to(device))
        step0 = evaluate(qat, data.test_images, data.test_labels, device=device)
        state = {"epochs": [], "float_test_acc": float_acc, "init": init,
                 "step0": {"epoch": 0, "test_acc": step0, "wall_s": round(time.time() - t0, 2)}}
        log(f"[{row}] float model {float_acc:.2f}%; step 0 (after prepare + first-batch init) {step0:.2f}%")
        _write_json(json_path, _row_json(row, args, argv, data, state, finished=False))
    done = len(state["epochs"])
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, done + args.stop_after)
    total_steps = steps_per_epoch(len(data.train_labels), args.batch_size, args.max_steps_per_epoch)
    for epoch in range(done, stop_at):
        torch.manual_seed(args.seed * 1_000_003 + epoch)
        qat.train()
        t0, cpu0 = time.time(), time.process_time()
        loss_sum = correct = seen = 0
        lr = sgd.param_groups[0]["lr"]
        for step, (xb, yb) in enumerate(epoch_batches(data, epoch, args.seed, args.batch_size,
                                                      args.max_steps_per_epoch)):
            xb, yb = xb.to(device), yb.to(device)
            out = qat(xb)
            loss = F.cross_entropy(out, yb)
            if not torch.isfinite(loss):
                msg = (f"row {row}: the training loss is {float(loss.detach())} at epoch {epoch + 1}/{args.epochs}, step"
                       f" {step + 1}/{total_steps}; the row stops here (last finished epoch: {done})")
                _write_json(json_path, _row_json(row, args, argv, data, state, finished=False, stopped=msg))
                raise RowStopped(msg)
            sgd.zero_grad(set_to_none=True)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            adam.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(yb)
            if args.log_every and (step + 1) % args.log_every == 0:
                log(f"[{row}] epoch {epoch + 1}/{args.epochs} step {step + 1}/{total_steps} loss {float(loss.detach()):.4f}"
                    f" ({(time.time() - t0) / (step + 1):.2f} s/step, {(time.process_time() - cpu0) / (step + 1):.2f}"
                    f" CPU s/step)")
        train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0
        for sched in scheds:
            sched.step()
        test_acc = evaluate(qat, data.test_images, data.test_labels, device=device)
        wall = time.time() - t0
        state["epochs"].append({"epoch": epoch + 1, "test_acc": test_acc, "train_loss": loss_sum / max(seen, 1),
                                "train_acc": 100.0 * correct / max(seen, 1), "lr": lr, "steps": step + 1,
                                "train_s": round(train_s, 2), "train_cpu_s": round(train_cpu_s, 2),
                                "wall_s": round(wall, 2)})
        done = epoch + 1
        atomic_save({"config": config, "epoch": done, "model": qat.state_dict(), "sgd": sgd.state_dict(),
                     "adam": adam.state_dict(), "schedulers": [s.state_dict() for s in scheds], "rng": rng_state(),
                     "threads": torch.get_num_threads(), "state": state}, ckpt_path)
        _write_json(json_path, _row_json(row, args, argv, data, state, finished=done >= args.epochs))
        log(f"[{row}] epoch {done}/{args.epochs}: test {test_acc:.2f}%, train loss {loss_sum / max(seen, 1):.4f},"
            f" {train_s:.0f} s training + {wall - train_s:.0f} s eval")
    return _row_json(row, args, argv, data, state, finished=done >= args.epochs)


def load_float(checkpoint) -> nn.Module:
    from recipes.daq_reference import load_reference_float

    return load_reference_float(checkpoint)


# --------------------------------------------------------------------------------------
# report: table.md and curves.png from the JSONs alone
# --------------------------------------------------------------------------------------

def _read_rows(results_dir: Path) -> List[Dict]:
    rows = []
    for path in sorted(results_dir.glob(f"*-{BITS}.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(rows, key=lambda r: (order.get(r.get("row"), len(order)), str(r.get("row"))))


def _fmt(v, digits=2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def write_report(results_dir) -> Path:
    """``results_dir/table.md`` and ``curves.png`` from ``results_dir/*-W1A1.json``; returns the table's path."""
    from recipes.train import atomic_write_text

    results_dir = Path(results_dir)
    rows = _read_rows(results_dir)
    if not rows:
        raise SystemExit(f"no *-{BITS}.json in {results_dir}: run the rows first (python -m benchmarks.dasr_vs_ste)")
    paper = ", ".join(f"{PAPER_LABELS[k]} {v}" for k, v in PAPER.items())
    planned = sorted({r["planned_epochs"] for r in rows})
    done = sorted({r["epochs_done"] for r in rows})
    lines = [
        f"# DASR vs STE vs fixed-β soft rounding — CIFAR-10 ResNet-20 {BITS}",
        "",
        f"**The paper trains {PAPER_EPOCHS} epochs** ({paper} on the original PNG test set). These rows plan"
        f" {'/'.join(map(str, planned))} epochs and have done {'/'.join(map(str, done))}: that is"
        f" {100.0 * max(done) / PAPER_EPOCHS:.1f}% of the paper's schedule at most, with the cosine schedule compressed"
        f" into the planned epochs. Read them as early training curves, not as a reproduction of the paper's numbers.",
        "",
    ]
    floats = {r.get("float_test_acc") for r in rows if r.get("float_test_acc") is not None}
    if floats:
        f = max(floats)
        lines += [f"Test set: this project's JPEG copy of CIFAR-10 (5,000 unseen test images, quality 75). The authors'"
                  f" float model scores {f:.2f}% on it (91.4% on PNG in the paper): compare the rows with that, not"
                  f" with the paper's numbers.", ""]
    if any(r.get("smoke") for r in rows):
        lines += ["**Smoke run**: a few steps per epoch and/or a subset of the images; the accuracies mean nothing.", ""]
    lines += ["| row | method | epochs done / planned | step 0 | best (epoch) | last | mean wall s / epoch |"
              " paper, 400 ep (PNG) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = r.get("epochs", [])
        accs = [e["test_acc"] for e in eps]
        best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
        wall = sum(e["wall_s"] for e in eps) / len(eps) if eps else None
        status = "" if not r.get("stopped") else " (stopped: non-finite loss)"
        best_text = f"{accs[best]:.2f} ({eps[best]['epoch']})" if accs else "—"
        lines.append(f"| {r['row']} | {r['method']} | {r['epochs_done']} / {r['planned_epochs']}{status} |"
                     f" {_fmt(r.get('step0', {}).get('test_acc'))} | {best_text} |"
                     f" {_fmt(accs[-1] if accs else None)} | {_fmt(wall, 0)} | {_fmt(PAPER.get(r['row']), 1)} |")
    lines += [f"| (annealing) | the paper's temperature annealing (not run here) | | | | | | {PAPER['annealing']} |", ""]
    max_epochs = max((len(r.get("epochs", [])) for r in rows), default=0)
    lines += ["Test accuracy (%) per epoch (epoch 0 = right after prepare and the first-batch init):", "",
              "| epoch | " + " | ".join(r["row"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    lines.append("| 0 | " + " | ".join(_fmt(r.get("step0", {}).get("test_acc")) for r in rows) + " |")
    for k in range(max_epochs):
        cells = []
        for r in rows:
            eps = r.get("epochs", [])
            cells.append(_fmt(eps[k]["test_acc"]) if k < len(eps) else "")
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += [""]
    for r in rows:
        if r.get("stopped"):
            lines += [f"- {r['row']}: {r['stopped']}"]
    lines += ["", "Commands (per row):", ""] + [f"- {r['row']}: `{r['command']}` (torch {r.get('torch')},"
                                                 f" {r.get('threads')} threads, {r.get('device')})" for r in rows]
    lines += ["", f"Regenerate this table and `curves.png`: `python -m benchmarks.dasr_vs_ste --table-only"
              f"{'' if results_dir.resolve() == DEFAULT_RESULTS.resolve() else ' --results-dir ' + str(results_dir)}`",
              ""]
    table = results_dir / "table.md"
    atomic_write_text(table, "\n".join(lines))
    plot_curves(rows, results_dir / "curves.png")
    return table


def plot_curves(rows: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        colour = f"C{i}"
        xs = [0] + [e["epoch"] for e in r.get("epochs", [])]
        ys = [r.get("step0", {}).get("test_acc", float("nan"))] + [e["test_acc"] for e in r.get("epochs", [])]
        ax.plot(xs, ys, "o-", color=colour, ms=3, label=f"{r['row']} ({r['epochs_done']}/{r['planned_epochs']} ep)")
        if r.get("row") in PAPER:
            ax.axhline(PAPER[r["row"]], color=colour, ls=":", lw=1)
    floats = [r["float_test_acc"] for r in rows if r.get("float_test_acc") is not None]
    if floats:
        ax.axhline(max(floats), color="grey", ls="--", lw=1, label=f"float model, this test set ({max(floats):.1f})")
    ax.set_xlabel("epoch (0 = after prepare + first-batch init)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"ResNet-20 CIFAR-10 {BITS} (dotted: the paper at {PAPER_EPOCHS} epochs, PNG test set)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------

def _is_smoke(args) -> bool:
    return any(v is not None for v in (args.max_steps_per_epoch, args.train_subset, args.test_subset))


def parse_args(argv=None):
    from recipes.data import DEFAULT_CACHE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=10, help="planned epochs per row (the cosine schedules' length)")
    p.add_argument("--data-root", default=str(DEFAULT_CACHE / "cifar10-jpeg"),
                   help="holds train/<class>/*.jpg and test/<class>/*.jpg (both CIFAR-10 archives extracted)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the authors' float model cifar10_fp.pth")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="row JSONs, table.md, curves.png")
    p.add_argument("--work-dir", default=None,
                   help=f"checkpoints, one folder per row (default {DEFAULT_WORK.relative_to(REPO)}; smoke runs"
                        f" {DEFAULT_SMOKE_WORK.relative_to(REPO)})")
    p.add_argument("--table-only", "--report", dest="table_only", action="store_true",
                   help="only regenerate table.md and curves.png from the JSONs in --results-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--tune-per-class", type=int, default=500,
                   help="last images of each training class kept aside (the tuning split), not trained on")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="run at most N more epochs per row in this invocation (rerun the command to continue)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke runs: steps per epoch")
    p.add_argument("--train-subset", type=int, default=None, help="smoke runs: train on N images")
    p.add_argument("--test-subset", type=int, default=None, help="smoke runs: evaluate on N test images")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--restart", action="store_true",
                   help="start rows afresh even where their JSON records epochs but no checkpoint is found"
                        " (the JSON is replaced)")
    p.add_argument("--log-every", type=int, default=20, help="print a line every N steps (0: per epoch only)")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}: rows are {', '.join(ROWS)}")
    args.rows = rows
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if _is_smoke(args) and not args.table_only and Path(args.results_dir).resolve() == DEFAULT_RESULTS.resolve():
        p.error("--max-steps-per-epoch / --train-subset / --test-subset are for smoke runs: pass --results-dir"
                " elsewhere (e.g. /tmp/dasr_smoke) so they never mix with the real rows")
    if args.work_dir is None:
        args.work_dir = str(DEFAULT_SMOKE_WORK if _is_smoke(args) else DEFAULT_WORK)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.table_only:
        table = write_report(args.results_dir)
        print(f"wrote {table} and {table.with_name('curves.png')}")
        return 0
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    failed = []
    try:
        data = load_data(args.data_root, args.tune_per_class, args.train_subset, args.test_subset, args.seed)
        print(f"data: {data.description}", flush=True)
        for row in args.rows:
            try:
                run_row(row, args, argv, data, log=lambda m: print(m, flush=True))
            except RowStopped as e:
                print(f"STOPPED: {e}", file=sys.stderr, flush=True)
                failed.append(row)
    finally:
        torch.set_num_threads(threads)
    write_report(args.results_dir)
    print(f"wrote {Path(args.results_dir) / 'table.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
