"""Cost of DAQ in the torch.ao FX flow on timm mobilenetv2_100 (one run prints all ratios).

* training step time, DAQ QAT ÷ torch's default ``FakeQuantize`` QAT (target ≤ 1.25);
* peak training memory, DAQ ÷ default (target ≤ 1.25);
* converted int8 latency on x86, ``exact=True`` and ``exact=False``, ÷ float eager
  (targets: exact ≤ 0.4, fast ≤ 0.3).

Both QAT models are prepared by ``daq_fx.prepare_qat_fx`` (same timm surgery, same
graph); only the qconfig mapping differs. Step timings alternate DAQ / default so that
load from other processes hits both alike; medians are reported.

Memory method: a thread samples the process RSS (``/proc/self/statm``) every ~0.5 ms
during one training step (forward, backward, optimizer step) after warm-up; the figure is
the peak RSS minus the RSS just before the step, i.e. the step's transient working set
(activations, saved tensors, gradients), not the resident model and libraries. Each QAT
flavour is measured in its own subprocess.

Usage::

    python benchmarks/fx_cost.py            # 224x224, batch 8, 2 threads, compiled DAQ kernels
    python benchmarks/fx_cost.py --quick    # 64x64, eager kernels, a few steps: seconds, for CI smoke
"""

from __future__ import annotations

import argparse
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


def _build(flavour: str, size: int, batch: int):
    import timm

    import daq_core
    import daq_fx
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", pretrained=False)
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


def _train_step_fn(model, size, batch):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_step_memory(step) -> int:
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
    model = _build(args.memory_child, args.size, args.batch)
    model.train()
    step = _train_step_fn(model, args.size, args.batch)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 input, eager kernels, few repeats")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per flavour")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager DAQ kernels (about 4x slower training; compiled is the default)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size = args.size or 64
        args.steps = args.steps or 2
        args.compile = False
    args.size = args.size or 224
    args.steps = args.steps or 5
    if args.memory_child:
        _memory_child(args)
        return

    import daq_core
    import daq_fx

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    if args.compile:
        daq_core.use_compiled_kernels(True)
    print(f"mobilenetv2_100 {args.size}x{args.size}, batch {args.batch}, {args.threads} threads,"
          f" DAQ kernels {'compiled' if args.compile else 'eager'}; torch {torch.__version__}")

    # ---- training step time -------------------------------------------------------------
    t0 = time.perf_counter()
    daq = _build("daq", args.size, args.batch).train()
    default = _build("default", args.size, args.batch).train()
    daq_step = _train_step_fn(daq, args.size, args.batch)
    default_step = _train_step_fn(default, args.size, args.batch)
    for _ in range(2):          # warm-up (includes torch.compile of the DAQ kernels)
        daq_step()
        default_step()
    print(f"build + warm-up: {time.perf_counter() - t0:.1f} s")
    daq_times, default_times = [], []
    for _ in range(args.steps):
        daq_times += _time(daq_step, 1)
        default_times += _time(default_step, 1)
    t_daq, t_default = statistics.median(daq_times), statistics.median(default_times)
    print(f"train step: DAQ {t_daq * 1e3:.0f} ms, default FakeQuantize {t_default * 1e3:.0f} ms"
          f" -> ratio {t_daq / t_default:.2f} (target <= 1.25)")

    # ---- peak training memory (one subprocess per flavour) -----------------------------
    peaks = {}
    for flavour in ("daq", "default"):
        cmd = [sys.executable, __file__, "--memory-child", flavour, "--size", str(args.size),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        if not args.compile:
            cmd.append("--no-compile")
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[flavour] = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    print(f"peak training-step memory (RSS above pre-step): DAQ {peaks['daq'] / 2**20:.0f} MiB,"
          f" default {peaks['default'] / 2**20:.0f} MiB -> ratio {peaks['daq'] / peaks['default']:.2f}"
          f" (target <= 1.25)")

    # ---- converted latency -------------------------------------------------------------
    daq.eval()
    exact = daq_fx.convert_fx(daq, exact=True)
    fast = daq_fx.convert_fx(daq, exact=False)
    float_model = _build("float", args.size, args.batch).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    repeats = 5 if args.quick else 20
    results = {}
    with torch.no_grad():
        for name, model in (("float", float_model), ("exact", exact), ("fast", fast)):
            _time(lambda: model(x), 3)
        for _ in range(repeats):   # interleaved
            for name, model in (("float", float_model), ("exact", exact), ("fast", fast)):
                results.setdefault(name, []).extend(_time(lambda: model(x), 1))
    lat = {k: statistics.median(v) for k, v in results.items()}
    print(f"inference batch {args.batch}: float eager {lat['float'] * 1e3:.1f} ms,"
          f" int8 x86 exact {lat['exact'] * 1e3:.1f} ms ({exact.meta['daq_activation_clamps']} clamps),"
          f" fast {lat['fast'] * 1e3:.1f} ms")
    print(f"latency ratio vs float eager: exact {lat['exact'] / lat['float']:.2f} (target <= 0.4),"
          f" fast {lat['fast'] / lat['float']:.2f} (target <= 0.3)")


if __name__ == "__main__":
    main()
