"""Cost of DAQ in the torch.ao FX flow on a timm model (one run prints all ratios).

* training step time, DAQ QAT ÷ torch's default ``FakeQuantize`` QAT (target ≤ 1.25);
* peak training memory, DAQ ÷ default (target ≤ 1.25);
* converted int8 latency on x86, ``exact=True`` and ``exact=False``, ÷ float eager
  (targets for mobilenetv2_100: exact ≤ 0.4, fast ≤ 0.3); also all of them TorchScript-frozen
  (int8 frozen ÷ float frozen, reported beside the targets' eager ratios).

Both QAT models are prepared by ``daq_fx.prepare_qat_fx`` (same timm surgery, same
graph); only the qconfig mapping differs (``daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4)``,
fully quantized, against ``get_default_qat_qconfig_mapping("x86")``). Step timings
alternate DAQ / default so that load from other processes hits both alike; medians are
reported.

Memory method: freed heap memory is first returned to the OS (glibc ``malloc_trim``), then
a thread samples the process RSS (``/proc/self/statm``) every ~0.5 ms during one training
step (forward, backward, optimizer step) after warm-up; the figure is the peak RSS minus
the RSS just before the step, i.e. the step's transient working set (activations, saved
tensors, gradients), not the resident model and libraries. Each QAT
flavour is measured in its own subprocess.

Models are created by ``recipes.models.create_model`` (timm, plus the registered CIFAR
``resnet20_cifar``); :data:`MODELS` holds each one's default input size, batch and classes.
The measurements are functions (:func:`measure_train_step`, :func:`measure_peak_memory`,
:func:`measure_latency`, :func:`run`) that ``benchmarks/cost.py`` calls for several models.

Usage::

    python benchmarks/fx_cost.py            # mobilenetv2_100 224x224, batch 8, 2 threads, compiled DAQ kernels
    python benchmarks/fx_cost.py --quick    # 64x64, eager kernels, a few steps: seconds, for CI smoke
    python benchmarks/fx_cost.py --model resnet20_cifar   # 32x32, batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: default input size, batch and number of classes per model (full mode)
MODELS = {
    "mobilenetv2_100": {"size": 224, "batch": 8, "num_classes": 1000},
    "resnet20_cifar": {"size": 32, "batch": 128, "num_classes": 10},
}


def _num_classes(model_name: str, num_classes=None) -> int:
    return num_classes or MODELS.get(model_name, {}).get("num_classes", 1000)


def build(flavour: str, size: int, batch: int, model_name: str = "mobilenetv2_100", num_classes=None):
    """``flavour``: ``"float"`` (eager, timm surgery only), ``"daq"`` or ``"default"`` QAT (FX, initialised)."""
    import daq_fx
    from recipes.models import create_model
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    torch.manual_seed(0)
    model = create_model(model_name, _num_classes(model_name, num_classes), False, None)
    example = (torch.randn(1, 3, size, size),)
    if flavour == "float":
        daq_fx.prepare_timm_model(model)
        return model
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4) if flavour == "daq" \
        else get_default_qat_qconfig_mapping("x86")
    qat = daq_fx.prepare_qat_fx(model, mapping, example, backend="x86")
    with torch.no_grad():
        qat(torch.randn(batch, 3, size, size))   # first batch: DAQ initialisation / observers
    return qat


def train_step_fn(model, size: int, batch: int, num_classes: int = 1000):
    """One SGD training step (forward, backward, optimizer step) on a fixed random batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Hand memory the allocator keeps cached back to the OS, so the next step's RSS growth is its working set."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _peak_step_memory(step) -> int:
    _release_free_memory()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    base = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    step()
    stop.set()
    thread.join()
    return max(peak[0], _rss_bytes()) - base


def _memory_child(args) -> None:
    """Subprocess entry: print the transient memory of one training step of one flavour."""
    import daq_core
    torch.set_num_threads(args.threads)
    if args.compile:
        daq_core.use_compiled_kernels(True)
    num_classes = _num_classes(args.model, args.num_classes)
    model = build(args.memory_child, args.size, args.batch, args.model, num_classes)
    model.train()
    step = train_step_fn(model, args.size, args.batch, num_classes)
    for _ in range(2):
        step()
    print(json.dumps({"peak": min(_peak_step_memory(step) for _ in range(2))}))


def _time(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_train_step(model_name: str, size: int, batch: int, steps: int = 5, num_classes=None,
                       warmup: int = 2) -> dict:
    """Median training-step time of DAQ QAT and default QAT, timed alternately.

    Returns a dict with ``daq_s``, ``default_s``, ``ratio``, ``build_warmup_s`` and the DAQ
    QAT model under ``"daq_model"`` (for :func:`measure_latency`) and both step closures
    under ``"step_fns"`` (popped by :func:`run`). Uses the DAQ kernels
    selected by ``daq_core.use_compiled_kernels``.
    """
    num_classes = _num_classes(model_name, num_classes)
    t0 = time.perf_counter()
    daq = build("daq", size, batch, model_name, num_classes).train()
    default = build("default", size, batch, model_name, num_classes).train()
    daq_step = train_step_fn(daq, size, batch, num_classes)
    default_step = train_step_fn(default, size, batch, num_classes)
    for _ in range(warmup):          # warm-up (includes torch.compile of the DAQ kernels)
        daq_step()
        default_step()
    build_warmup = time.perf_counter() - t0
    daq_times, default_times = [], []
    for _ in range(steps):
        daq_times += _time(daq_step, 1)
        default_times += _time(default_step, 1)
    t_daq, t_default = statistics.median(daq_times), statistics.median(default_times)
    return {"daq_s": t_daq, "default_s": t_default, "ratio": t_daq / t_default,
            "build_warmup_s": build_warmup, "steps": steps, "daq_model": daq,
            "step_fns": {"daq": daq_step, "default": default_step}}


def measure_peak_memory(model_name: str, size: int, batch: int, threads: int = 2, compile: bool = True,
                        num_classes=None, in_process_steps=None) -> dict:
    """Transient RSS of one training step, DAQ and default QAT, each in its own subprocess.

    ``in_process_steps``: ``{"daq": step, "default": step}`` (from :func:`measure_train_step`)
    to sample in this process instead: no subprocess start-up, for smoke runs only (the
    allocator's cached memory from earlier steps hides part of the working set).
    """
    peaks = {}
    for flavour in ("daq", "default"):
        if in_process_steps is not None:
            in_process_steps[flavour]()
            peaks[flavour] = _peak_step_memory(in_process_steps[flavour])
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", flavour, "--model", model_name,
               "--size", str(size), "--batch", str(batch), "--threads", str(threads)]
        if num_classes:
            cmd += ["--num-classes", str(num_classes)]
        if not compile:
            cmd.append("--no-compile")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"memory subprocess for {model_name}/{flavour} failed:\n{result.stderr[-3000:]}")
        peaks[flavour] = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    return {"daq_bytes": peaks["daq"], "default_bytes": peaks["default"],
            "ratio": peaks["daq"] / max(peaks["default"], 1),
            "method": "in-process RSS" if in_process_steps is not None else "RSS, one subprocess per flavour"}


def _frozen(model, example):
    """``torch.jit.freeze(torch.jit.trace(model, example))`` (deprecated in torch 2.14: warnings muted)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(model.eval(), example).eval())


def measure_latency(daq_qat_model, model_name: str, size: int, batch: int, repeats: int = 20,
                    num_classes=None, frozen: bool = True) -> dict:
    """Converted int8 (x86) latency, ``exact=True`` and ``exact=False``, against the float eager model.

    The float baseline is the faster of the eager model in the default (NCHW) layout and in
    ``channels_last`` (model and input): on CPU the two differ by up to 2x (mkldnn's depthwise
    convolutions are much faster in ``channels_last``), so comparing with NCHW alone would
    flatter the int8 model. Both float times are reported.

    ``frozen=True`` also times every model TorchScript-traced and frozen (the classic deployment
    form of a torch.ao int8 model: no Python between ops) and reports int8 frozen ÷ float frozen
    in its faster layout, like for like, under ``"frozen"``; ``["frozen"]["matches_eager"]``
    records that the frozen int8 models return exactly the eager int8 models' outputs.
    """
    import daq_fx

    daq_qat_model.eval()
    exact = daq_fx.convert_fx(daq_qat_model, exact=True)
    fast = daq_fx.convert_fx(daq_qat_model, exact=False)
    float_model = build("float", size, batch, model_name, num_classes).eval()
    float_cl = copy.deepcopy(float_model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    samples = {}
    runs = [("float_nchw", float_model, x), ("float_channels_last", float_cl, x_cl), ("exact", exact, x),
            ("fast", fast, x)]
    with torch.no_grad():
        if frozen:
            frozen_models = {name: _frozen(model, inp) for name, model, inp in runs}
            frozen_matches = all(torch.equal(frozen_models[name](x), model(x))
                                 for name, model in (("exact", exact), ("fast", fast)))
            runs += [(f"frozen_{name}", frozen_models[name], inp) for name, _, inp in list(runs)]
        for name, model, inp in runs:
            _time(lambda: model(inp), 3)
        for _ in range(repeats):   # interleaved
            for name, model, inp in runs:
                samples.setdefault(name, []).extend(_time(lambda: model(inp), 1))
    lat = {k: statistics.median(v) for k, v in samples.items()}
    out = _latency_figures(lat)
    out.update(activation_clamps=exact.meta.get("daq_activation_clamps"), repeats=repeats)
    if frozen:
        out["frozen"] = _latency_figures(lat, "frozen_")
        out["frozen"]["matches_eager"] = frozen_matches
    return out


def _latency_figures(lat: dict, prefix: str = "") -> dict:
    """Medians of one form (eager, or ``prefix="frozen_"``) -> times and int8 ÷ faster-float ratios."""
    nchw, channels_last = lat[f"{prefix}float_nchw"], lat[f"{prefix}float_channels_last"]
    float_s = min(nchw, channels_last)
    exact, fast = lat[f"{prefix}exact"], lat[f"{prefix}fast"]
    return {"float_s": float_s, "float_layout": "nchw" if nchw <= channels_last else "channels_last",
            "float_nchw_s": nchw, "float_channels_last_s": channels_last, "exact_s": exact, "fast_s": fast,
            "ratio_exact": exact / float_s, "ratio_fast": fast / float_s}


def run(model_name: str, size: int, batch: int, *, steps: int = 5, threads: int = 2, compile: bool = True,
        latency_repeats: int = 20, num_classes=None, memory_subprocess: bool = True, latency: bool = True,
        log=print) -> dict:
    """All three measurements for one model; ``log`` gets one human-readable line per figure.

    The caller sets ``torch.set_num_threads``, the quantized engine and the DAQ kernels.
    ``memory_subprocess=False`` samples memory in this process (see :func:`measure_peak_memory`).
    Latency is measured last; ``latency=False`` skips it and leaves the QAT model in
    ``result["train_step"]["daq_model"]`` for the caller to measure later (``benchmarks/cost.py``
    times every model's training first, then every model's latency).
    """
    log(f"{model_name} {size}x{size}, batch {batch}, {threads} threads,"
        f" DAQ kernels {'compiled' if compile else 'eager'}; torch {torch.__version__}")
    step = measure_train_step(model_name, size, batch, steps, num_classes)
    log(f"build + warm-up: {step['build_warmup_s']:.1f} s")
    log(f"train step: DAQ {step['daq_s'] * 1e3:.0f} ms, default FakeQuantize {step['default_s'] * 1e3:.0f} ms"
        f" -> ratio {step['ratio']:.2f} (target <= 1.25)")
    step_fns = step.pop("step_fns")
    mem = measure_peak_memory(model_name, size, batch, threads, compile, num_classes,
                              None if memory_subprocess else step_fns)
    del step_fns
    log(f"peak training-step memory (RSS above pre-step): DAQ {mem['daq_bytes'] / 2**20:.0f} MiB,"
        f" default {mem['default_bytes'] / 2**20:.0f} MiB -> ratio {mem['ratio']:.2f} (target <= 1.25)")
    if not latency:
        return {"model": model_name, "size": size, "batch": batch, "train_step": step, "memory": mem}
    lat = measure_latency(step.pop("daq_model"), model_name, size, batch, latency_repeats, num_classes)
    log_latency(lat, batch, log)
    return {"model": model_name, "size": size, "batch": batch, "train_step": step, "memory": mem, "latency": lat}


def log_latency(lat: dict, batch: int, log=print) -> None:
    """One human-readable line per latency figure of :func:`measure_latency`."""
    log(f"inference batch {batch}: float eager {lat['float_nchw_s'] * 1e3:.1f} ms (NCHW),"
        f" {lat['float_channels_last_s'] * 1e3:.1f} ms (channels_last),"
        f" int8 x86 exact {lat['exact_s'] * 1e3:.1f} ms ({lat['activation_clamps']} clamps),"
        f" fast {lat['fast_s'] * 1e3:.1f} ms")
    log(f"latency ratio vs float eager ({lat['float_layout']}, the faster): exact {lat['ratio_exact']:.2f}"
        f" (target <= 0.4), fast {lat['ratio_fast']:.2f} (target <= 0.3)")
    if "frozen" in lat:
        fz = lat["frozen"]
        log(f"TorchScript-frozen: float {fz['float_s'] * 1e3:.1f} ms ({fz['float_layout']}), int8 exact"
            f" {fz['exact_s'] * 1e3:.1f} ms, fast {fz['fast_s'] * 1e3:.1f} ms -> ratio exact"
            f" {fz['ratio_exact']:.2f}, fast {fz['ratio_fast']:.2f}; same outputs as eager int8:"
            f" {fz['matches_eager']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 input, eager kernels, few repeats")
    parser.add_argument("--model", default="mobilenetv2_100", help="timm model name (default mobilenetv2_100)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per flavour")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager DAQ kernels (about 4x slower training; compiled is the default)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = MODELS.get(args.model, {"size": 224, "batch": 8})
    if args.quick:
        args.size = args.size or min(64, defaults["size"])
        args.steps = args.steps or 2
        args.compile = False
    args.size = args.size or defaults["size"]
    args.batch = args.batch or defaults["batch"]
    args.steps = args.steps or 5
    if args.memory_child:
        _memory_child(args)
        return {}

    import daq_core

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    if args.compile:
        args.compile = daq_core.use_compiled_kernels(True)
    return run(args.model, args.size, args.batch, steps=args.steps, threads=args.threads, compile=args.compile,
               latency_repeats=5 if args.quick else 20, num_classes=args.num_classes)


if __name__ == "__main__":
    main()
