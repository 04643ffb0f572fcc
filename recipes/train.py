"""The shared training pipeline of the recipes.

One run goes through up to three stages, each resumable from its per-epoch checkpoint:

1. ``float``: optional float training/fine-tuning (``--float-epochs``; the offline demo starts
   from random weights, the ResNet-20 recipe fine-tunes the pretrained model on JPEG images);
2. ``qat``: insert the quantizers (``--framework``), initialise them on one batch, train with
   SGD on the weights and Adam on the quantizer parameters (DAQ-SPEC §6), cosine schedules;
3. ``convert``: x86 int8 model (fx, stock) or QONNX export (brevitas), evaluated against the
   QAT model, then the report (Markdown + JSON), the metrics log (JSONL) and the curves (PNG).

Recipes (``recipes/mobilenetv2_w4a4.py``, ``recipes/resnet20_cifar10.py``) only set defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import data as data_mod
from . import models as models_mod
from . import quant as quant_mod

CHECKPOINT_NAME = "checkpoint.pt"
FLOAT_NAME = "float_model.pt"
STAGES = ("float", "qat")
CHECKPOINT_VERSION = 1


class RecipeError(RuntimeError):
    """A user-facing error: the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def parse_bits(text: str):
    t = text.upper().strip()
    if not (t.startswith("W") and "A" in t):
        raise argparse.ArgumentTypeError(f"--bits expects WxAy, e.g. W4A4 or W1A32, got {text!r}")
    w, a = t[1:].split("A", 1)
    try:
        return int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits expects WxAy with integers, got {text!r}") from None


def parse_target_bits(text: str):
    """``--target-avg-bits``: ``4`` (weights and activations), ``W3A4`` or ``3,4`` -> ``(weights, activations)``."""
    t = text.upper().replace(" ", "")
    try:
        if t.startswith("W") and "A" in t:
            w, a = t[1:].split("A", 1)
            return float(w), float(a)
        if "," in t:
            w, a = t.split(",", 1)
            return float(w), float(a)
        return float(t), float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-avg-bits expects a number (weights and activations), WxAy"
                                         f" or w,a (e.g. 4, W3A4, 3.5,4), got {text!r}") from None


def build_parser(description: str, defaults: Dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder root with train/ and val/, or cifar10, or fashion-mnist")
    g.add_argument("--data-root", default=None, help="where the named dataset lives (default: see recipes/data.py)")
    g.add_argument("--download", action="store_true", help="allow torchvision to download a named dataset")
    g.add_argument("--img-size", type=int, help="training/eval resolution")
    g.add_argument("--train-subset", type=int, default=None, help="use a class-balanced subset of N training images")
    g.add_argument("--qat-train-subset", type=int, default=None,
                   help="QAT stage: a class-balanced subset of the training images (default: same as float)")
    g.add_argument("--val-subset", type=int, default=None, help="use a class-balanced subset of N validation images")
    g.add_argument("--val-per-class", type=int, default=500,
                   help="cifar10 ImageFolder: images carved from the end of each class (tuning split, never trained on)")
    g.add_argument("--eval-split", default="auto", choices=data_mod.EVAL_SPLITS,
                   help="cifar10: evaluate on ROOT/test (unseen test images; auto = when it exists) or on the"
                        " carved split (for tuning only: never choose anything by the test split)")
    g.add_argument("--tune-eval", action="store_true",
                   help="cifar10 with --eval-split test: also evaluate the final QAT model on the carved split"
                        " (report: tune_acc), so a grid can be chosen on it and reported on the test images")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 in-memory, 4 ImageFolder)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm model name")
    g.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs internet)")
    g.add_argument("--initial-checkpoint", default=None, help="float weights to start from (state_dict, 'module.' ok)")
    g = p.add_argument_group("quantization")
    g.add_argument("--framework", choices=quant_mod.FRAMEWORKS, help="fx: daq_fx + x86 int8; brevitas: daq_brevitas"
                   " + QONNX; stock: torch.ao's stock STE fake-quant (baseline)")
    g.add_argument("--bits", type=parse_bits, help="WxAy, e.g. W4A4")
    g.add_argument("--float-layers", default=None,
                   help="comma-separated module names kept in float ('' = quantize every layer)")
    g.add_argument("--compile-kernels", action="store_true", help="torch.compile the DAQ element-wise kernels")
    g.add_argument("--calibrate-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="fx DAQ: fit the weight quantizers' output scales and the layer biases to the calibration"
                        " batch after initialisation (DAQ-SPEC §5, daq_fx.calibrate_output_scales); N2UQ: re-estimate the BN"
                        " statistics on it (recipes.quant.reestimate_batchnorm); default: on"
                        " with --freeze-bn (where it was measured), off when BN trains on batch statistics")
    g.add_argument("--intermediate-act-bits", type=int, default=None,
                   help="fx DAQ: bits for activations that are not a quantized layer's input (residual-add"
                        " operands, float layers' inputs), e.g. 8; 0: the --bits activation width")
    g.add_argument("--quantizer", default="daq", choices=quant_mod.QUANTIZERS,
                   help="quantizer family inside --framework fx/brevitas: daq, n2uq (learned non-uniform"
                        " thresholds; QAT accuracy only, no int conversion) or cpq (CPQ with DropBits,"
                        " reconstructed from the abstract; --learn-bits for per-layer bit-widths)")
    g.add_argument("--learn-bits", action="store_true",
                   help="cpq: learn every quantizer's bit-width (DropBits keep gates); --bits gives the largest ones")
    g.add_argument("--bit-regularization", type=float, default=0.0,
                   help="cpq --learn-bits: weight λ of the bit-gate regularizer (>= 0; the initial λ when a target"
                        " is given)")
    g.add_argument("--target-avg-bits", type=parse_target_bits, default=None,
                   help="cpq --learn-bits: target average bit-widths (size-weighted), reached by adjusting λ: 4"
                        " (weights and activations), W3A4 or 3,4")
    g.add_argument("--drop-rate", type=float, default=None,
                   help="cpq: DropBits's probability of dropping each droppable bit while training (0: off; with"
                        " --learn-bits the gates' initial drop probability); default: daq_core.cpq.DEFAULT_DROP_RATE")
    g.add_argument("--gate-lr", type=float, default=1e-2, help="cpq --learn-bits: Adam lr of the bit gates")
    g.add_argument("--gate-optimizer", default="adam", choices=("adam", "sgd"),
                   help="cpq --learn-bits: the bit gates' optimizer at --gate-lr. sgd keeps the gradients' sizes, so"
                        " the size-weighted regularizer and each layer's task sensitivity decide which bits go first;"
                        " adam moves every gate at about the same rate")
    g.add_argument("--bit-search-fraction", type=float, default=1.0,
                   help="cpq --learn-bits: the fraction of the QAT steps in which the bit gates learn; then every"
                        " layer's bit-width is fixed at its read-out (projected onto the targets) and training goes"
                        " on at those bit-widths without DropBits. 1: the gates learn to the end")
    g.add_argument("--rounding", default="dasr", choices=quant_mod.ROUNDINGS,
                   help="fx DAQ only: dasr (DAQ); the paper's ablations ste (DAQ with a straight-through gradient)"
                        " and soft (fixed-temperature soft argmax in training, rounding at test time; needs --beta)")
    g.add_argument("--beta", type=float, default=None, help="the fixed temperature of --rounding soft (paper: 4, 24)")
    g = p.add_argument_group("training (DAQ-SPEC §6)")
    g.add_argument("--epochs", type=int, help="QAT epochs")
    g.add_argument("--float-epochs", type=int, help="float epochs before QAT (0: start QAT from the given weights)")
    g.add_argument("--batch-size", type=int, help="global batch size (split over processes)")
    g.add_argument("--lr", type=float, help="SGD lr for weights in QAT")
    g.add_argument("--float-lr", type=float, help="SGD lr for the float stage")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--head-init-std", type=float, default=0.01,
                   help="from scratch only: re-initialise the classifier with this std (0: keep timm's init)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up steps of the float stage")
    g.add_argument("--weight-decay", type=float, help="SGD weight decay")
    g.add_argument("--quant-lr", type=float, default=1e-4, help="Adam lr for quantizer parameters (no weight decay)")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke tests)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="QAT: BatchNorm uses and keeps its running statistics (no batch statistics)")
    g.add_argument("--distill", action="store_true", help="knowledge distillation from the float model during QAT")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KD term (1-alpha on labels)")
    g.add_argument("--distill-temp", type=float, default=1.0, help="KD temperature")
    g = p.add_argument_group("run")
    g.add_argument("--output", help="output directory (checkpoint, metrics.jsonl, report.md/json, curves.png)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUTPUT/checkpoint.pt (or the given checkpoint)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (per-epoch lines are still printed)")
    g.add_argument("--onnx-eval-images", type=int, default=200,
                   help="brevitas: validation images run through the exported QONNX file (slow executor)")
    g.add_argument("--latency-batch", type=int, default=1, help="batch size for the int-model latency")
    g.add_argument("--demo", action="store_true", help="the small offline demo budget (see the recipe)")
    p.set_defaults(**defaults)
    return p


# --------------------------------------------------------------------------------------
# Distributed / device / seeding
# --------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: the process-group backend ("nccl", "gloo") when running under torchrun, else None
    backend: Optional[str] = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """DDP: launched by torchrun (any number of processes, one included)."""
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """``torchrun`` (or another env:// launcher) set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_arg: str) -> (Dist, torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {device_arg} requested but CUDA is not available; use --device cpu")
    if world > 1 or launched_by_torchrun():   # torchrun with one process runs DDP too (a world of 1)
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        return Dist(rank, world, local, backend), device
    if want_cuda:
        return Dist(), torch.device(device_arg if device_arg.startswith("cuda") else "cuda")
    return Dist(), torch.device("cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: str, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + STAGES.index(stage) * 10_007 + epoch * 101 + rank


def rng_state() -> Dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------

def ensure_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"output directory {out} is not writable ({e.strerror or e}); pass --output DIR"
                          f" somewhere you can write") from e


def atomic_save(obj, path: Path):
    """Write to a temporary file in the same directory, fsync, then ``os.replace``: never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, stage: str, epoch: int):
        """Drop records past a checkpoint (stage, epoch) when resuming: the log matches the state."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        limit = (STAGES.index(stage), epoch)
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            pos = (STAGES.index(rec["stage"]), rec["epoch"]) if rec.get("stage") in STAGES else (-1, 0)
            if pos <= limit:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, rec: Dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def read(self) -> List[Dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def observers_frozen(model: nn.Module):
    """Evaluation must not feed validation statistics into torch.ao observers (stock FakeQuantize)."""
    saved = []
    for m in model.modules():
        buf = getattr(m, "observer_enabled", None)
        if isinstance(buf, torch.Tensor):
            saved.append((buf, buf.clone()))
            buf.zero_()
    try:
        yield
    finally:
        for buf, val in saved:
            buf.copy_(val)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, desc: str = "eval", progress: bool = False,
             return_preds: bool = False):
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    preds = []
    try:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
        with observers_frozen(model):
            for x, y in it:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
                p = out.argmax(1)
                correct += (p == y).sum().item()
                total += y.numel()
                if return_preds:
                    preds.append(p.cpu())
    finally:
        model.train(was_training)
    res = {"acc": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}
    if return_preds:
        res["preds"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return res


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm in eval mode inside a training model: running statistics are used and kept.

    For torch.ao ConvBn QAT modules this is the usual ``freeze_bn_stats`` behaviour (the fold
    uses the running statistics and the normalisation matches the eval/converted model); short
    fine-tunes of low-bit models are much more stable with it.
    """
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
        if hasattr(m, "freeze_bn") and hasattr(m, "bn"):
            m.freeze_bn = True


def kd_loss(student_logits, teacher_logits, temp: float):
    t = temp
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * t * t


class Interrupted(Exception):
    pass


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, args, recipe: str, float_layers: Sequence[str] = ()):
        self.args = args
        self.recipe = recipe
        self.float_layers = tuple(float_layers)
        self.t0 = time.time()

    # ---- setup ------------------------------------------------------------------
    def meta(self) -> Dict:
        a = self.args
        return {"recipe": self.recipe, "model": a.model, "framework": a.framework, "weight_bits": a.bits[0],
                "act_bits": a.bits[1], "num_classes": self.data.num_classes, "img_size": a.img_size,
                "float_layers": list(self.float_layers), "quantizer": a.quantizer, "rounding": a.rounding,
                "beta": a.beta, "intermediate_act_bits": a.intermediate_act_bits,
                "learn_bits": bool(getattr(a, "learn_bits", False)),
                "version": CHECKPOINT_VERSION}

    def log(self, msg: str):
        if self.dist.main:
            print(msg, flush=True)

    def setup(self):
        a = self.args
        if not a.data:
            raise RecipeError("--data is required (an ImageFolder root, cifar10 or fashion-mnist)")
        if not a.output:
            raise RecipeError("--output is required")
        self.dist, self.device = init_distributed(a.device)
        self.out = Path(a.output)
        if self.dist.main:
            ensure_writable(self.out)
        w, ab = a.bits
        if not (1 <= w <= 8 and 1 <= ab <= 32):
            raise RecipeError(f"--bits W{w}A{ab} is out of range (weights 1..8, activations 1..8 or 32 for float)")
        if a.batch_size % self.dist.world:
            raise RecipeError(f"--batch-size {a.batch_size} is not divisible by the {self.dist.world} processes")
        frac = getattr(a, "bit_search_fraction", 1.0)
        if not 0.0 < frac <= 1.0:
            raise RecipeError(f"--bit-search-fraction must be in (0, 1] (the share of the QAT steps in which the bit"
                              f" gates learn), got {frac!r}")
        if frac != 1.0 and not getattr(a, "learn_bits", False):
            raise RecipeError("--bit-search-fraction applies to --quantizer cpq --learn-bits only")
        if a.compile_kernels:
            import daq_core
            daq_core.use_compiled_kernels(True)
        self.data = data_mod.build_data(a.data, a.img_size, a.data_root, a.download, a.val_per_class,
                                         a.eval_split)
        self.float_train_set = data_mod.subset(self.data.train, a.train_subset, a.seed)
        self.qat_train_set = data_mod.subset(self.float_train_set, a.qat_train_subset, a.seed + 1)
        self.train_set = self.float_train_set
        self.val_set = data_mod.subset(self.data.val, a.val_subset, a.seed)
        if getattr(a, "tune_eval", False) and self.data.tune is None:
            raise RecipeError(f"--tune-eval needs a split carved from the training images; --data {a.data} has none"
                              f" (it applies to --data cifar10 with an ImageFolder copy)")
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise RecipeError("the training or validation set is empty")
        # validate the model name (and the initial checkpoint) before any training; random init is seeded
        seed_everything(a.seed)
        self.float_model = models_mod.create_model(a.model, self.data.num_classes, a.pretrained,
                                                   a.initial_checkpoint)
        if not (a.pretrained or a.initial_checkpoint) and a.float_epochs > 0 and a.head_init_std > 0:
            # from scratch: timm's fan-out init of a 10-way head gives logits of std ~10 (loss ~7) and
            # unstable first steps; a small head starts at loss ln(C)
            head = self.float_model.get_classifier() if hasattr(self.float_model, "get_classifier") else None
            if isinstance(head, nn.Linear):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(a.seed)
                    nn.init.normal_(head.weight, std=a.head_init_std)
                    nn.init.zeros_(head.bias)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.dist.main)
        self.results: Dict = {}
        self.workers = a.workers if a.workers is not None else (
            0 if self.data.in_memory else min(4, max(1, (os.cpu_count() or 1) - 1)))

    def loader(self, ds, train: bool, epoch: int = 0, stage: str = "float"):
        a = self.args
        per_proc = a.batch_size // self.dist.world if train else a.eval_batch_size
        if train:
            if self.dist.enabled:
                sampler = DistributedSampler(ds, self.dist.world, self.dist.rank, shuffle=True, seed=a.seed,
                                             drop_last=True)
                sampler.set_epoch(epoch + 1000 * STAGES.index(stage))
            else:
                g = torch.Generator().manual_seed(epoch_seed(a.seed, stage, epoch, 0))
                sampler = RandomSampler(ds, generator=g)
            drop_last = len(ds) // self.dist.world >= per_proc
            g = torch.Generator().manual_seed(epoch_seed(a.seed, stage, epoch, self.dist.rank))
            return DataLoader(ds, per_proc, sampler=sampler, num_workers=self.workers, drop_last=drop_last,
                              generator=g, pin_memory=self.device.type == "cuda")
        return DataLoader(ds, per_proc, sampler=SequentialSampler(ds), num_workers=self.workers,
                          pin_memory=self.device.type == "cuda")

    def steps_per_epoch(self) -> int:
        n = len(self.loader(self.train_set, True))
        if self.args.max_steps_per_epoch:
            n = min(n, self.args.max_steps_per_epoch)
        return max(n, 1)

    # ---- checkpoints --------------------------------------------------------------
    def save_checkpoint(self, stage: str, epoch: int, model, optimizers, schedulers, step: int):
        if not self.dist.main:
            return
        ckpt = {
            "daq_recipe": self.meta(), "stage": stage, "epoch": epoch, "global_step": step,
            "model": unwrap(model).state_dict(),
            "float_model": (unwrap(model).state_dict() if stage == "float" else self.float_state),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": rng_state(), "results": self.results, "world_size": self.dist.world,
            "bit_budget": self.budget.state_dict() if getattr(self, "budget", None) is not None else None,
        }
        atomic_save(ckpt, self.out / CHECKPOINT_NAME)
        self._checkpoints_written = getattr(self, "_checkpoints_written", 0) + 1
        # test hook: die like a killed process right after the N-th checkpoint (tests/recipes)
        if int(os.environ.get("DAQ_RECIPE_KILL_AFTER_CHECKPOINT", "0")) == self._checkpoints_written:
            os.kill(os.getpid(), signal.SIGKILL)

    def load_resume(self) -> Optional[Dict]:
        a = self.args
        if a.resume is None:
            return None
        path = self.out / CHECKPOINT_NAME if a.resume == "auto" else Path(a.resume)
        if not path.is_file():
            raise RecipeError(f"--resume: no checkpoint at {path} (nothing to resume; run without --resume)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise RecipeError(f"--resume: cannot read {path} ({type(e).__name__}: {e}); it is not a checkpoint"
                              f" written by this recipe") from e
        if not isinstance(ckpt, dict) or "daq_recipe" not in ckpt:
            raise RecipeError(f"--resume: {path} is not a recipe checkpoint (for float weights use"
                              f" --initial-checkpoint)")
        theirs, ours = ckpt["daq_recipe"], self.meta()
        for key in ("model", "framework", "weight_bits", "act_bits", "num_classes", "img_size", "float_layers",
                    "quantizer", "rounding", "beta", "intermediate_act_bits", "learn_bits"):
            if theirs.get(key, ours[key] if key in ("quantizer", "rounding", "beta", "intermediate_act_bits",
                                                    "learn_bits")
                          else None) != ours.get(key):
                raise RecipeError(f"--resume: checkpoint {path} is for {key}={theirs.get(key)!r} but this run has"
                                  f" {key}={ours.get(key)!r} (checkpoint: {theirs['model']} W{theirs['weight_bits']}"
                                  f"A{theirs['act_bits']} {theirs['framework']}); use a fresh --output or the same"
                                  f" settings")
        return ckpt

    # ---- one stage ------------------------------------------------------------------
    def train_stage(self, stage: str, model: nn.Module, epochs: int, lr: float, wd: float,
                    qparams: Sequence[nn.Parameter], ckpt: Optional[Dict], teacher: Optional[nn.Module]):
        a = self.args
        self.train_set = self.qat_train_set if stage == "qat" else self.float_train_set
        qids = {id(p) for p in qparams}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qids]
        budget = getattr(self, "budget", None) if stage == "qat" else None
        gate_ids = {id(p) for p in quant_mod.gate_parameters(model)} if budget is not None else set()
        qp = [p for p in qparams if p.requires_grad and id(p) not in gate_ids]
        gates = [p for p in qparams if id(p) in gate_ids]
        optimizers = [torch.optim.SGD(weights, lr=lr, momentum=a.momentum, weight_decay=wd)]
        if qp:
            optimizers.append(torch.optim.Adam(qp, lr=a.quant_lr, weight_decay=0.0))
        if gates:   # CPQ bit gates: their own, faster Adam group (CPQ-SPEC §6)
            if getattr(a, "gate_optimizer", "adam") == "sgd":
                optimizers.append(torch.optim.SGD(gates, lr=a.gate_lr, momentum=0.0, weight_decay=0.0))
            else:
                optimizers.append(torch.optim.Adam(gates, lr=a.gate_lr, weight_decay=0.0))
        spe = self.steps_per_epoch()
        total = max(epochs * spe, 1)
        warm = min(a.warmup_steps if stage == "float" else 0, total - 1)

        def lr_lambda(i, total=total, warm=warm):  # linear warm-up (float stage), then cosine to 0
            w = min(1.0, (i + 1) / warm) if warm > 0 else 1.0
            return w * 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total))

        # the bit gates keep a constant lr: they track the target average until the end (CPQ-SPEC §6)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, (lambda i: 1.0) if gates and k == len(optimizers) - 1
                                                        else lr_lambda) for k, o in enumerate(optimizers)]
        start_epoch, step = 0, 0
        if ckpt is not None and ckpt["stage"] == stage:
            for o, s in zip(optimizers, ckpt["optimizers"]):
                o.load_state_dict(s)
            for sch, s in zip(schedulers, ckpt["schedulers"]):
                sch.load_state_dict(s)
            start_epoch, step = ckpt["epoch"], ckpt["global_step"]
            set_rng_state(ckpt["rng"])
            if budget is not None and ckpt.get("bit_budget"):
                budget.load_state_dict(ckpt["bit_budget"])
        if self.dist.enabled:
            ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            train_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=stage == "qat", **ddp_kw)
        else:
            train_model = model
        # CPQ learned bit-widths: the gates learn for the first search_steps QAT steps, then the bit-widths are
        # fixed (cpq.fix_bit_widths: the fixed gates persist in the model, so a resumed run sees them)
        search_steps = None
        if budget is not None and getattr(a, "bit_search_fraction", 1.0) < 1.0:
            search_steps = max(1, int(round(a.bit_search_fraction * total)))
        searching = False           # the gates learn and λ is adjusted (until the bit-widths are fixed)
        if budget is not None:
            from daq_core import cpq
            searching = not cpq.bit_widths_fixed(unwrap(model))
        from tqdm import tqdm
        for epoch in range(start_epoch, epochs):
            seed_everything(epoch_seed(a.seed, stage, epoch, self.dist.rank))
            train_model.train()
            if stage == "qat" and a.freeze_bn:
                freeze_batchnorm(model)
            loader = self.loader(self.train_set, True, epoch, stage)
            bar = tqdm(total=spe, desc=f"{stage} {epoch + 1}/{epochs}", disable=a.no_progress or not self.dist.main,
                       dynamic_ncols=True, leave=False)
            loss_sum = correct = seen = 0.0
            t_ep = time.time()
            self._in_epoch = (stage, epoch)
            for i, (x, y) in enumerate(loader):
                if i >= spe:
                    break
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                out = train_model(x)
                loss = F.cross_entropy(out, y)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = (1 - a.distill_alpha) * loss + a.distill_alpha * kd_loss(out, t_out, a.distill_temp)
                task_loss = loss
                if searching:
                    loss = loss + budget.penalty(model).to(loss.device)
                if not torch.isfinite(loss):
                    raise RecipeError(f"{stage} epoch {epoch + 1} step {i}: loss is {loss.item()}; lower --lr /"
                                      f" --quant-lr or check the data")
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in optimizers:
                    o.step()
                for s in schedulers:
                    s.step()
                if searching:
                    budget.update(model)
                step += 1
                if searching and search_steps is not None and step >= search_steps:
                    self._fix_bit_widths(model, step)
                    searching = False
                if os.environ.get("DAQ_RECIPE_SIGINT_AT") == f"{stage}:{step}":  # test hook: Ctrl-C mid-epoch
                    os.kill(os.getpid(), signal.SIGINT)
                bs = y.numel()
                loss_sum += task_loss.item() * bs
                correct += (out.argmax(1) == y).sum().item()
                seen += bs
                el = time.time() - t_ep
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                                img_s=f"{seen * self.dist.world / max(el, 1e-9):.0f}")
                bar.update(1)
            bar.close()
            ep_time = time.time() - t_ep
            stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            if self.dist.enabled:
                # nccl reduces CUDA tensors only (a CPU tensor fails: no backend for device type cpu)
                stats = stats.to(self.device)
                dist.all_reduce(stats)
            loss_sum, correct, seen = stats.tolist()
            rec = {"stage": stage, "epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                   "train_acc": 100 * correct / max(seen, 1), "lr": optimizers[0].param_groups[0]["lr"],
                   "quant_lr": optimizers[1].param_groups[0]["lr"] if len(optimizers) > 1 else None,
                   "img_per_s": seen / max(ep_time, 1e-9), "epoch_time_s": ep_time}
            if budget is not None:
                from daq_core import cpq
                rec.update(avg_weight_bits=cpq.average_bits(model, "weight"),
                           avg_act_bits=cpq.average_bits(model, "activation"),
                           bit_lambda=dict(budget.strength))
            if self.dist.main:
                ev = evaluate(model, self.loader(self.val_set, False), self.device, f"val ({stage})",
                              not a.no_progress)
                rec.update(val_acc=ev["acc"], val_loss=ev["loss"])
            self._in_epoch = None
            # log first: a resume truncates the log to its checkpoint, so a kill between the two
            # lines can neither lose nor duplicate a record
            self.metrics.write(rec)
            self.save_checkpoint(stage, epoch + 1, model, optimizers, schedulers, step)
            self.log(f"[{stage}] epoch {epoch + 1}/{epochs}  train loss {rec['train_loss']:.4f} acc"
                     f" {rec['train_acc']:.2f}%  val acc {rec.get('val_acc', float('nan')):.2f}%"
                     f"  {rec['img_per_s']:.0f} img/s  {ep_time:.1f}s")
            if self.dist.enabled:
                dist.barrier()
        return model

    # ---- main -------------------------------------------------------------------------
    def calibration_batch(self):
        """A fixed batch for quantizer initialisation, drawn without touching the global RNG."""
        a = self.args
        ds = self.qat_train_set
        n = min(a.batch_size // self.dist.world, len(ds))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed + 12345)
            idx = torch.randperm(len(ds))[:n].tolist()
            xs = [ds[i][0] for i in idx]
        return torch.stack(xs).to(self.device)

    def prepare_qat(self, float_model: nn.Module) -> nn.Module:
        a = self.args
        spec = self.spec
        model = copy.deepcopy(float_model).to(self.device)
        calib = self.calibration_batch()
        try:
            qat = quant_mod.prepare(model, spec, (calib[:1],))
        except quant_mod.QuantError as e:
            raise RecipeError(str(e)) from e
        qat = qat.to(self.device)
        # initialise the quantizers (DAQ-SPEC §4-5: first batch) without moving BN statistics
        bn_bufs = {k: v.clone() for k, v in qat.state_dict().items()
                   if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        qat.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            qat(calib)
        sd = qat.state_dict()
        with torch.no_grad():
            for k, v in bn_bufs.items():
                sd[k].copy_(v)
        if a.calibrate_scales:
            quant_mod.calibrate(qat, spec, calib, correct_bias=a.freeze_bn)
        return qat

    def run(self):
        a = self.args
        self.setup()
        w, ab = a.bits
        try:
            if a.intermediate_act_bits and (a.framework != "fx" or a.quantizer != "daq"):
                self.log(f"note: --intermediate-act-bits applies to --framework fx with DAQ only; {a.framework}"
                         f" {a.quantizer} quantizes every activation at A{ab}")
                a.intermediate_act_bits = None
            a.intermediate_act_bits = a.intermediate_act_bits or None     # 0: the --bits activation width
            if a.calibrate_scales is None:
                # measured with frozen BN (the demo, the ResNet-20 benchmark); with BN training on batch
                # statistics a tiny from-scratch ResNet-20 stayed at chance in eval after calibration
                a.calibrate_scales = bool(a.freeze_bn)
            target = a.target_avg_bits or (None, None)
            self.spec = quant_mod.QuantSpec(a.framework, w, ab, self.float_layers, rounding=a.rounding, beta=a.beta,
                                            quantizer=a.quantizer, intermediate_act_bits=a.intermediate_act_bits,
                                            learn_bits=a.learn_bits, bit_regularization=a.bit_regularization,
                                            target_weight_bits=target[0], drop_rate=a.drop_rate,
                                            target_act_bits=None if ab >= 32 else target[1])
            self.budget = quant_mod.bit_budget(self.spec)
        except quant_mod.QuantError as e:
            raise RecipeError(str(e)) from e
        ckpt = self.load_resume()
        if ckpt is not None:
            self.results = dict(ckpt.get("results", {}))
            self.metrics.truncate_after(ckpt["stage"], ckpt["epoch"])
            self.log(f"resuming from {self.out / CHECKPOINT_NAME if a.resume == 'auto' else a.resume}:"
                     f" stage {ckpt['stage']}, epoch {ckpt['epoch']}")
            if ckpt.get("world_size", 1) != self.dist.world:
                self.log(f"warning: checkpoint written with {ckpt.get('world_size')} processes, resuming with"
                         f" {self.dist.world}: the result will not match an uninterrupted run exactly")
        elif self.dist.main:
            self.metrics.truncate_after("float", -1)  # a fresh run starts a fresh log
        seed_everything(a.seed)
        self.log(f"data: {self.data.description}: {len(self.train_set)} train"
                 f"{f' ({len(self.qat_train_set)} in QAT)' if len(self.qat_train_set) != len(self.train_set) else ''}"
                 f" / {len(self.val_set)} val images,"
                 f" {self.data.num_classes} classes, {a.img_size}px; device {self.device}"
                 f"{f', DDP ({self.dist.backend}), {self.dist.world} process(es)' if self.dist.enabled else ''}")
        self.wall = dict(self.results.get("wall_s", {}))
        float_model = self.float_model.to(self.device)

        # ---- stage 1: float -------------------------------------------------------------
        if ckpt is not None and ckpt["stage"] == "qat":
            float_model.load_state_dict(ckpt["float_model"])
        else:
            if ckpt is not None:
                float_model.load_state_dict(ckpt["model"])
            if a.float_epochs > 0:
                t = time.time()
                self.float_state = None
                self.train_stage("float", float_model, a.float_epochs, a.float_lr, a.weight_decay, [], ckpt, None)
                self.wall["float_train"] = self.wall.get("float_train", 0.0) + time.time() - t
            if self.dist.main:
                ev = evaluate(float_model, self.loader(self.val_set, False), self.device, "val (float)",
                              not a.no_progress)
                self.results["float_acc"] = ev["acc"]
                self.log(f"float model: val acc {ev['acc']:.2f}%")
        self.float_state = {k: v.detach().cpu().clone() for k, v in unwrap(float_model).state_dict().items()}
        if self.dist.main:
            atomic_save({"daq_recipe": self.meta(), "float_model": self.float_state}, self.out / FLOAT_NAME)

        # ---- stage 2: QAT --------------------------------------------------------------
        t = time.time()
        qat = self.prepare_qat(float_model)
        if ckpt is not None and ckpt["stage"] == "qat":
            qat.load_state_dict(ckpt["model"])
        elif self.dist.main:
            ev = evaluate(qat, self.loader(self.val_set, False), self.device, "val (after prepare)",
                          not a.no_progress)
            self.results["after_prepare_acc"] = ev["acc"]
            self.results["grid_distance_after_prepare"] = quant_mod.grid_distance(qat, self.spec)
            self.log(f"{a.framework} W{w}A{ab} right after prepare: val acc {ev['acc']:.2f}%")
        qparams = quant_mod.quantizer_parameters(qat, self.spec)
        teacher = None
        if a.distill:
            teacher = copy.deepcopy(float_model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.wall["prepare"] = self.wall.get("prepare", 0.0) + time.time() - t
        t = time.time()
        qat = self.train_stage("qat", qat, a.epochs, a.lr, a.weight_decay, qparams,
                               ckpt if ckpt is not None and ckpt["stage"] == "qat" else None, teacher)
        self.wall["qat_train"] = self.wall.get("qat_train", 0.0) + time.time() - t
        self.qat_model = qat
        if self.dist.enabled:
            dist.barrier()
        if not self.dist.main:
            return None
        return self.finish(qat)

    def _eval_qonnx(self, qat, path, example):
        """Brevitas: run the exported QONNX file (qonnx executor) on the first val images vs the QAT model."""
        a = self.args
        try:
            runner = quant_mod.QONNXRunner(path)
        except Exception as e:  # noqa: BLE001 - qonnx missing or unreadable file: reported
            self.results["artifacts"]["qonnx_eval_error"] = f"{type(e).__name__}: {e}"
            return
        n = min(a.onnx_eval_images, len(self.val_set))
        qm = unwrap(qat).eval()
        correct = agree = qat_correct = 0
        with torch.no_grad(), observers_frozen(qm):
            for i in range(n):
                x, y = self.val_set[i]
                x = x.unsqueeze(0).expand(example.shape[0], *x.shape).contiguous()
                p_onnx = runner(x)[0].argmax().item()
                p_qat = qm(x.to(self.device))[0].argmax().item()
                correct += int(p_onnx == y)
                agree += int(p_onnx == p_qat)
                qat_correct += int(p_qat == y)
        self.results["int_acc"] = 100.0 * correct / max(n, 1)
        self.results["agreement"] = 100.0 * agree / max(n, 1)
        self.results["int_eval_images"] = n
        self.results["qat_acc_same_images"] = 100.0 * qat_correct / max(n, 1)
        self.results["int_backend"] = "QONNX (qonnx executor)"

    # ---- CPQ learned bit-widths ---------------------------------------------------------------
    def _project_bits(self, model: nn.Module, **extra) -> Dict:
        """:meth:`daq_core.cpq.BitBudget.project` onto the targets, recorded in ``results["bit_projection"]``."""
        from daq_core import cpq

        before = {role: cpq.average_bits(model, role) for role in ("weight", "activation")}
        self.results["bit_projection"] = {"flipped": self.budget.project(model), "avg_bits_before": before,
                                          "lambda": dict(self.budget.strength), **extra}
        return self.results["bit_projection"]

    def _fix_bit_widths(self, qat: nn.Module, step: int):
        """End of the bit-width search (--bit-search-fraction): project onto the targets, fix the gates."""
        from daq_core import cpq

        model = unwrap(qat)
        proj = self._project_bits(model, fixed_at_step=step)
        cpq.fix_bit_widths(model)
        after = {role: cpq.average_bits(model, role) for role in ("weight", "activation")}
        self.log(f"[qat] step {step}: bit-width search ends (--bit-search-fraction {self.args.bit_search_fraction});"
                 f" average bits {proj['avg_bits_before']} -> {after} ({proj['flipped']} flipped); training goes on"
                 f" at these bit-widths")

    def _learned_bits(self, qat: nn.Module):
        """Meet the target averages (:meth:`daq_core.cpq.BitBudget.project`), record every layer's bit-widths."""
        from daq_core import cpq

        model = unwrap(qat)
        if self.budget is not None and not cpq.bit_widths_fixed(model):
            self._project_bits(model)
        self.results["layer_bits"] = quant_mod.layer_bits(model, self.spec)
        self.results["avg_bits"] = {role: cpq.average_bits(model, role) for role in ("weight", "activation")}

    # ---- stage 3: convert, evaluate, report ----------------------------------------------
    def finish(self, qat: nn.Module):
        a = self.args
        t = time.time()
        if self.spec.quantizer == "cpq":
            self._learned_bits(qat)
        val_loader = self.loader(self.val_set, False)
        ev_q = evaluate(qat, val_loader, self.device, "val (QAT)", not a.no_progress, return_preds=True)
        self.results["qat_acc"] = ev_q["acc"]
        if getattr(a, "tune_eval", False):
            tune_set = data_mod.subset(self.data.tune, a.val_subset, a.seed)
            self.results["tune_acc"] = evaluate(qat, self.loader(tune_set, False), self.device, "tune (QAT)",
                                                not a.no_progress)["acc"]
        example = torch.stack([self.val_set[i][0] for i in range(min(a.latency_batch, len(self.val_set)))])
        try:
            int_model, artifacts = quant_mod.convert(qat, self.spec, self.out, (example,))
        except quant_mod.QuantError as e:
            raise RecipeError(str(e)) from e
        self.results["artifacts"] = artifacts
        if int_model is None and "qonnx" in artifacts and a.onnx_eval_images > 0:
            t_onnx = time.time()
            self._eval_qonnx(qat, artifacts["qonnx"], example)
            self.results["onnx_eval_s"] = time.time() - t_onnx
        if int_model is not None:
            ev_i = evaluate(int_model, val_loader, torch.device("cpu"), "val (int)", not a.no_progress,
                            return_preds=True)
            self.results["int_acc"] = ev_i["acc"]
            self.results["agreement"] = 100.0 * (ev_i["preds"] == ev_q["preds"]).float().mean().item()
            n_threads = torch.get_num_threads()
            self.results["int_latency_ms"] = quant_mod.latency_ms(int_model, example)
            self.results["latency_setup"] = f"batch {example.shape[0]}, {a.img_size}px, CPU, {n_threads} threads"
            self.results["float_latency_ms"] = quant_mod.latency_ms(
                copy.deepcopy(unwrap(self.float_model)).cpu().eval(), example)
            try:
                path = self.out / "int_model.pt"
                atomic_save(int_model.state_dict(), path)
                artifacts["int_state_dict"] = str(path)
            except Exception:  # noqa: BLE001
                pass
        self.results["grid_distance"] = quant_mod.grid_distance(qat, self.spec)
        self.results["size"] = quant_mod.model_size_bits(qat, self.spec)
        self.results["size"]["float_model_bits"] = quant_mod.float_size_bits(self.float_model)
        self.wall["convert_eval"] = time.time() - t
        self.results["wall_s"] = self.wall
        return write_report(self)


# --------------------------------------------------------------------------------------
# Report and plot
# --------------------------------------------------------------------------------------

def _fmt(v, unit="%"):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def write_report(p: Pipeline) -> Dict:
    a, r = p.args, p.results
    w, ab = a.bits
    fa, qa, ia = r.get("float_acc"), r.get("qat_acc"), r.get("int_acc")
    report = {
        "recipe": p.recipe, "command": " ".join(shlex.quote(x) for x in sys.argv),
        "model": a.model, "framework": a.framework, "bits": f"W{w}A{ab}", "float_layers": list(p.float_layers),
        "quantizer": a.quantizer, "rounding": a.rounding, "beta": a.beta,
        "intermediate_act_bits": a.intermediate_act_bits,
        "data": p.data.description, "eval_split": p.data.eval_split, "train_images": len(p.float_train_set), "qat_train_images": len(p.qat_train_set), "val_images": len(p.val_set),
        "img_size": a.img_size, "float_epochs": a.float_epochs, "qat_epochs": a.epochs, "batch_size": a.batch_size,
        "lr": a.lr, "quant_lr": a.quant_lr, "weight_decay": a.weight_decay, "distill": a.distill,
        "freeze_bn": a.freeze_bn, "calibrate_scales": a.calibrate_scales,
        "processes": p.dist.world, "distributed": p.dist.backend, "device": str(p.device), "seed": a.seed,
        "float_acc": fa, "after_prepare_acc": r.get("after_prepare_acc"), "qat_acc": qa, "int_acc": ia,
        "agreement": r.get("agreement"), "tune_acc": r.get("tune_acc"),
        "qat_minus_float": None if fa is None or qa is None else qa - fa,
        "int_minus_qat": None if ia is None or qa is None else ia - r.get("qat_acc_same_images", qa),
        "int_eval_images": r.get("int_eval_images", p.results.get("val_n")), "int_backend": r.get("int_backend", "x86 int8 (torch.ao lowered)" if ia is not None else None),
        "size": r.get("size"), "int_latency_ms": r.get("int_latency_ms"),
        "float_latency_ms": r.get("float_latency_ms"), "latency_setup": r.get("latency_setup"),
        "artifacts": r.get("artifacts", {}), "wall_s": r.get("wall_s", {}),
        "learn_bits": bool(getattr(a, "learn_bits", False)), "bit_regularization": getattr(a, "bit_regularization", 0.0),
        "drop_rate": getattr(a, "drop_rate", None),
        "bit_search_fraction": getattr(a, "bit_search_fraction", 1.0) if getattr(a, "learn_bits", False) else None,
        "gate_optimizer": getattr(a, "gate_optimizer", "adam") if getattr(a, "learn_bits", False) else None,
        "target_avg_bits": ({"weight": a.target_avg_bits[0], "activation": a.target_avg_bits[1]}
                            if getattr(a, "target_avg_bits", None) else None),
        "layer_bits": r.get("layer_bits"), "avg_bits": r.get("avg_bits"), "bit_projection": r.get("bit_projection"),
        # CPQ-SPEC §7: mean distance of the full-precision weights to the nearest grid point (steps)
        "clustering": {"after_prepare": r.get("grid_distance_after_prepare"), "after_qat": r.get("grid_distance")},
        "total_wall_s": time.time() - p.t0,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    try:
        import timm
        report["versions"]["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        pass
    atomic_write_text(p.out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    size = report["size"] or {}
    mb = lambda bits: f"{bits / 8 / 2 ** 20:.3f} MiB" if bits else "n/a"  # noqa: E731
    lines = [
        f"# {p.recipe}: {a.model} {a.framework} W{w}A{ab}", "",
        f"- data: {report['data']} — {report['train_images']} train / {report['val_images']} eval images"
        f" (eval split: {report['eval_split']}),"
        f" {a.img_size}px",
        f"- schedule: {a.float_epochs} float epochs, {a.epochs} QAT epochs, batch {a.batch_size}, lr {a.lr},"
        f" quantizer lr {a.quant_lr}, wd {a.weight_decay}{', KD from float' if a.distill else ''}"
        f"{', BN frozen in QAT' if a.freeze_bn else ''}",
        f"- float layers: {', '.join(p.float_layers) or 'none (every layer quantized)'}",
        f"- device: {report['device']}, {p.dist.world} process(es); total wall time {report['total_wall_s']:.0f} s",
        "", "| metric | value |", "|---|---|",
        f"| float accuracy | {_fmt(fa)} |",
        f"| right after prepare | {_fmt(r.get('after_prepare_acc'))} |",
        f"| QAT (fake-quant) accuracy | {_fmt(qa)} |",
        *([f"| QAT accuracy on the carved tuning split (--tune-eval) | {_fmt(r['tune_acc'])} |"]
          if r.get("tune_acc") is not None else []),
        (f"| exported QONNX accuracy (qonnx executor, first {r['int_eval_images']} val images; QAT on the same:"
         f" {_fmt(r.get('qat_acc_same_images'))}) | {_fmt(ia)} |" if r.get("int_eval_images") else
         f"| converted int accuracy (x86 int8 model) | {_fmt(ia)} |"),
        f"| int vs QAT prediction agreement | {_fmt(r.get('agreement'))} |",
        f"| QAT − float | {_fmt(report['qat_minus_float'], ' pt')} |",
        f"| int − QAT | {_fmt(report['int_minus_qat'], ' pt')} |",
        f"| model size (W{w} weights + 32-bit rest) | {size.get('total_bits', 0):,} bits ({mb(size.get('total_bits'))}) |",
        f"| float model size | {size.get('float_model_bits', 0):,} bits ({mb(size.get('float_model_bits'))}) |",
        f"| int model latency ({r.get('latency_setup', 'n/a')}) | {_fmt(r.get('int_latency_ms'), ' ms')} |",
        f"| float model latency (same setup) | {_fmt(r.get('float_latency_ms'), ' ms')} |",
        "", f"Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_s"].items()),
        "", f"Artifacts: " + (", ".join(f"{k}: {v}" for k, v in report["artifacts"].items()) or "none"),
        "", "Command: `" + report["command"] + "`", "",
    ]
    if r.get("layer_bits"):
        lines += _layer_bits_lines(report)
        plot_layer_bits(r["layer_bits"], p.out / "layer_bits.png", f"{a.model} {a.framework} CPQ (reconstructed"
                        f" from the abstract), largest W{w}A{ab}")
    atomic_write_text(p.out / "report.md", "\n".join(lines))
    plot_curves(p.metrics.read(), p.out / "curves.png", f"{a.model} {a.framework} W{w}A{ab}")
    p.log("\n".join(lines))
    p.log(f"report: {p.out / 'report.md'}  ({p.out / 'report.json'}, {p.out / 'curves.png'},"
          f" {p.out / 'metrics.jsonl'})")
    return report


def _layer_bits_lines(report: Dict) -> List[str]:
    avg = report.get("avg_bits") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["## Learned bit-widths (CPQ, reconstructed from the abstract)", "",
             f"Average (size-weighted): weights {fmt(avg.get('weight'))}, activations {fmt(avg.get('activation'))}"
             + (f"; targets {report['target_avg_bits']}" if report.get("target_avg_bits") else ""), ""]
    proj = report.get("bit_projection")
    if proj:
        lines += [f"Before the final projection onto the targets: {proj['avg_bits_before']}; bits flipped"
                  f" by it: {proj['flipped']}", ""]
    lines += ["| layer | weight bits | activation bits (its input) |", "|---|---|---|"]
    lines += [f"| {name} | {v['weight']} | {v['activation'] if v['activation'] is not None else 'float'} |"
              for name, v in report["layer_bits"].items()]
    return lines + [""]


def plot_layer_bits(layer_bits: Dict[str, Dict], path: Path, title: str):
    """Bar chart of every layer's learned weight and input-activation bit-width (``layer_bits.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layer_bits)
    xs = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [layer_bits[n]["weight"] for n in names], width=0.4, label="weight")
    ax.bar([x + 0.2 for x in xs], [layer_bits[n]["activation"] or 0 for n in names], width=0.4, label="activation")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_ylim(0, 8.5)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(records: List[Dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(1, len(records) + 1))
    labels = [f"{r['stage']}{r['epoch']}" for r in records]
    ax1.plot(xs, [r["train_loss"] for r in records], "o-", label="train loss")
    if any("val_loss" in r for r in records):
        ax1.plot(xs, [r.get("val_loss", float("nan")) for r in records], "s--", label="val loss")
    ax2.plot(xs, [r["train_acc"] for r in records], "o-", label="train acc")
    ax2.plot(xs, [r.get("val_acc", float("nan")) for r in records], "s--", label="val acc")
    n_float = sum(1 for r in records if r["stage"] == "float")
    for ax in (ax1, ax2):
        if 0 < n_float < len(records):
            ax.axvline(n_float + 0.5, color="grey", ls=":", label="float → QAT")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=45, fontsize=7)
        ax.set_xlabel("epoch (stage)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("loss")
    ax2.set_ylabel("accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def main(argv, recipe: str, description: str, defaults: Dict, float_layers: Sequence[str] = (),
         demo_defaults: Optional[Dict] = None) -> int:
    parser = build_parser(description, defaults)
    args = parser.parse_args(argv)
    if args.demo and demo_defaults:
        # the demo budget replaces defaults, not values given on the command line
        given = {a.dest for a in parser._actions for s in a.option_strings if any(
            x == s or x.startswith(s + "=") for x in (argv if argv is not None else sys.argv[1:]))}
        for k, v in demo_defaults.items():
            if k not in given:
                setattr(args, k, v)
    if args.float_layers is not None:
        float_layers = tuple(x.strip() for x in args.float_layers.split(",") if x.strip())
    for req in ("model", "framework", "bits", "epochs", "batch_size", "lr", "img_size", "output"):
        if getattr(args, req) is None:
            parser.error(f"--{req.replace('_', '-')} is required")
    if args.float_epochs is None:
        args.float_epochs = 0
    if args.float_lr is None:
        args.float_lr = args.lr
    pipe = Pipeline(args, recipe, float_layers)
    old = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C must interrupt even when started from a shell that ignores SIGINT (nohup, `&`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pipe.run()
    except KeyboardInterrupt:
        where = getattr(pipe, "_in_epoch", None)
        ck = Path(args.output) / CHECKPOINT_NAME
        msg = "interrupted" + (f" during {where[0]} epoch {where[1] + 1}" if where else "")
        if ck.is_file():
            msg += (f"; the last complete checkpoint {ck} is intact (written atomically). Continue with the"
                    f" same command plus --resume")
        else:
            msg += "; no checkpoint was written yet (one is written at the end of every epoch)"
        print(f"\n{msg}", file=sys.stderr, flush=True)
        return 130
    except (RecipeError, data_mod.DataError, models_mod.ModelError, quant_mod.QuantError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
