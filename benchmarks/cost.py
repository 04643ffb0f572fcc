"""Cost of DAQ against torch's built-in fake-quant, every ratio from ONE run on one machine.

1. **op** — forward+backward of the DAQ fake-quant op ÷ torch's built-in op on the same
   tensor: activations per tensor (``torch.fake_quantize_per_tensor_affine``) and weights
   per output channel (``torch.fake_quantize_per_channel_affine``); see
   ``benchmarks/op_cost.py``. Target ≤ 1.5.
2. **training** — step time and peak training-step memory of DAQ QAT
   (``daq_fx.prepare_qat_fx`` + ``daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4)``) ÷ torch's
   default QAT ``FakeQuantize`` (the same ``daq_fx.prepare_qat_fx`` with
   ``get_default_qat_qconfig_mapping("x86")``), for ResNet-20 (CIFAR, 32x32, batch 128) and
   timm ``mobilenetv2_100`` (224x224, batch 8); see ``benchmarks/fx_cost.py``. Targets ≤ 1.25.
3. **latency** — the converted int8 model (x86, ``exact=True`` and ``exact=False``) ÷ the
   float eager model in its faster layout (NCHW or ``channels_last``; both are reported), for
   both models. Targets (mobilenetv2_100): exact ≤ 0.4, fast ≤ 0.3;
   ResNet-20's latency is reported without a target. Latency is measured after every model's
   training figures. Float eager latency depends on the C allocator: glibc serves blocks above
   its mmap threshold (up to 32 MiB, raised dynamically as the process frees large blocks) with
   fresh pages, so each inference pays page faults whose number depends on the process's
   history; ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment removes
   them. The ``MALLOC_*`` variables in effect are recorded in the results. The same four
   models TorchScript-traced and frozen (``torch.jit.freeze(torch.jit.trace(...))``, no Python between ops) are timed
   too and int8 frozen ÷ float frozen is reported without a target, beside the eager ratios.

4. **deploy** — latency of every deploy path of a DAQ W4A4 model against the fair float
   baselines, for ``mobilenetv2_100`` (224x224) and ``resnet20_cifar`` (32x32) at batch 1 and 8,
   1 and 2 threads: float eager (faster layout), float ``torch.compile``, FX int8 (today's path),
   compiled int8 (``daq_fx.pt2e.compile_x86``), ORT int8 (``daq_fx.export_onnx``, exact
   ``"integer"`` kernels, and the inexact ``"qlinear"`` form), ORT float; each ÷ float eager, the
   int8 paths also ÷ float compiled; build / export / compile times recorded (see
   ``benchmarks/deploy_cost.py``). Targets (mobilenetv2_100, batch 8, 2 threads): the faster exact
   int8 deploy path ≤ 0.25x float eager and ≤ 0.5x float compiled. ``--deploy-models``,
   ``--deploy-batches``, ``--deploy-threads`` limit the grid; ``--sections deploy`` runs it alone.

The machine's load average (start and end of the run) and CPU flags are recorded: multi-threaded
latency on a machine busy with other jobs is not meaningful (a descheduled OpenMP thread stalls
every parallel op).

Full mode compiles the DAQ kernels (``daq_core.use_compiled_kernels(True)``) and writes
``benchmarks/results/cost.json``; ``--quick`` uses eager kernels, small inputs, few repeats,
one thread and in-process memory sampling (a smoke run for the test suite, tens of seconds;
its figures are not meaningful) and writes JSON only with ``--output``.

Timings alternate DAQ and the built-in so that load from other processes hits both alike;
medians are reported. On a machine shared with other jobs, multi-threaded timings can be
far off (a descheduled OpenMP thread stalls every parallel op): compare ``--threads 1``.

Usage::

    python -m benchmarks.cost                         # full: minutes, writes benchmarks/results/cost.json
    python -m benchmarks.cost --quick --output x.json
    python -m benchmarks.cost --models resnet20_cifar --threads 1
    python -m benchmarks.cost --sections deploy --deploy-models mobilenetv2_100 --deploy-batches 8 --deploy-threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import deploy_cost, fx_cost, op_cost  # noqa: E402

DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "cost.json"
MODEL_NAMES = ("resnet20_cifar", "mobilenetv2_100")
#: quick-mode (smoke) sizes per model
QUICK_SIZES = {"resnet20_cifar": {"size": 32, "batch": 8}, "mobilenetv2_100": {"size": 64, "batch": 4}}
#: ratio name -> target (upper bound) or None where the issue sets none
OP_TARGETS = {"op/activation_per_tensor": 1.5, "op/weight_per_channel": 1.5}
MODEL_TARGETS = {"train_step": 1.25, "memory": 1.25, "latency_exact": 0.4, "latency_fast": 0.3,
                 "latency_exact_frozen": None, "latency_fast_frozen": None}
LATENCY_TARGET_MODELS = ("mobilenetv2_100",)
SECTIONS = ("op", "train", "latency", "deploy")
#: the deploy grid: full run and quick (smoke) run
DEPLOY_GRID = {"models": ("resnet20_cifar", "mobilenetv2_100"), "batches": (1, 8), "threads": (1, 2)}
DEPLOY_GRID_QUICK = {"models": ("resnet20_cifar",), "batches": (1,), "threads": (1,)}


def ratio_keys(models, deploy_grid=None) -> list:
    """Names of every ratio :func:`main` reports for ``models`` (and the deploy grid, a dict with
    ``models``, ``batches``, ``threads``; None: no deploy section)."""
    keys = list(OP_TARGETS) + [f"{m}/{k}" for m in models for k in MODEL_TARGETS]
    if deploy_grid:
        keys += [f"{deploy_cost.cell_key(m, b, t)}/{r}" for m in deploy_grid["models"] for b in deploy_grid["batches"]
                 for t in deploy_grid["threads"] for r in deploy_cost.ratio_names()]
    return keys


def target_of(key: str):
    """The issue's target for ``key``; None where it sets none (ResNet-20's latency, the
    TorchScript-frozen ratios, which are reported beside the eager ones the targets name)."""
    if key in OP_TARGETS:
        return OP_TARGETS[key]
    if key.startswith("deploy/"):
        _, model, batch, threads, ratio = key.split("/", 4)
        return deploy_cost.TARGETS.get((model, int(batch[1:]), int(threads[1:])), {}).get(ratio)
    model, what = key.split("/", 1)
    if what.startswith("latency") and model not in LATENCY_TARGET_MODELS:
        return None
    return MODEL_TARGETS[what]


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _op_rows(name: str, r: dict, builtin: str, compiled: bool) -> list:
    rows = []
    if compiled and "ratio_compiled" in r:
        rows.append((name, f"{name} {tuple(r['shape'])}, compiled", _ms(r["daq_compiled_s"]),
                     f"{builtin} {_ms(r.get('builtin_s_again', r['builtin_s']))}", r["ratio_compiled"]))
    if "ratio_eager" in r:
        rows.append((None if compiled and "ratio_compiled" in r else name,
                     f"{name} {tuple(r['shape'])}, eager", _ms(r["daq_eager_s"]),
                     f"{builtin} {_ms(r['builtin_s'])}", r["ratio_eager"]))
    return rows


def _print_table(rows: list, ratios: dict) -> None:
    header = ("measure", "DAQ", "baseline", "ratio", "target", "")
    lines = []
    for key, label, daq, base, ratio in rows:
        target = target_of(key) if key else None
        verdict = "" if target is None else ("ok" if ratio <= target else "MISSED")
        lines.append((label, daq, base, f"{ratio:.2f}", "-" if target is None else f"<= {target}", verdict))
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line).rstrip())


def _load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return [float("nan")] * 3


def _cpu() -> str:
    """CPU model and the ISA flags that decide the int8 kernels (AVX2 / AVX512 / VNNI / AMX)."""
    name, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", "cpu", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # pragma: no cover
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


_DEPLOY_COLUMNS = (("float_eager", "float eager"), ("float_compiled", "float compile"), ("fx_int8", "FX int8"),
                   ("compiled_int8", "compiled int8"), ("ort_int8", "ORT int8"),
                   ("ort_int8_qlinear", "ORT int8 qlinear*"), ("ort_float", "ORT float"))


def _print_deploy_table(deploy: dict) -> None:
    """One line per (model, batch, threads): latency in ms and the ratios to float eager / float compiled."""
    header = ["model", "b", "t"] + [label for _, label in _DEPLOY_COLUMNS] + ["best exact int8 / eager", "/ compiled"]
    lines = []
    for name, r in deploy.items():
        for cell, figures in r["cells"].items():
            batch, threads = (v[1:] for v in cell.split("/"))
            lat, ratio = figures["latency_s"], figures["ratios"]
            row = [name, batch, threads]
            for variant, _ in _DEPLOY_COLUMNS:
                text = f"{lat[variant] * 1e3:.1f}"
                if variant != "float_eager":
                    text += f" ({ratio[f'{variant}/float_eager']:.2f})"
                row.append(text)
            target = deploy_cost.TARGETS.get((name, int(batch), int(threads)), {})
            for key in ("best_exact_int8/float_eager", "best_exact_int8/float_compiled"):
                text = f"{ratio[key]:.2f}" + (f" {figures['best_exact_int8']}" if key.endswith("eager") else "")
                if key in target:
                    text += f" (<= {target[key]} {'ok' if ratio[key] <= target[key] else 'MISSED'})"
                row.append(text)
            lines.append(row)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print("deploy latency, ms (÷ float eager in its faster layout); * = not exact")
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line).rstrip())
    for name, r in deploy.items():
        times = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in r["build_times"].items())
        print(f"{name} build / export / compile: {times}")


def deploy_markdown(results: dict) -> str:
    """The deploy section of a run as Markdown: latency and ratios per cell, targets, build times,
    profile of the target cell, machine, load."""
    deploy = results.get("deploy") or {}
    lines = [f"# Deploy latency (`python -m benchmarks.cost`, {results['mode']} mode)", "",
             f"torch {results['torch']}, timm {results['timm']}, CPU: {results.get('cpu')}; load average (1/5/15 min)"
             f" at start {results['load_average']['start']}, at end {results['load_average']['end']} on"
             f" {results['load_average']['cpus']} CPUs; wall {results['wall_s']:.0f} s.", "",
             "Latency in ms (median), in parentheses ÷ float eager in its faster layout; the last two columns: the"
             " faster *exact* int8 deploy path (compiled int8 or ORT int8) ÷ float eager and ÷ float compiled"
             " (targets at mobilenetv2_100, batch 8, 2 threads: ≤ 0.25 and ≤ 0.5). * not exact.", "",
             "| model | batch | threads | " + " | ".join(label for _, label in _DEPLOY_COLUMNS)
             + " | best exact int8 ÷ float eager | ÷ float compiled |",
             "|---" * (5 + len(_DEPLOY_COLUMNS)) + "|"]
    for name, r in deploy.items():
        for cell, figures in r["cells"].items():
            batch, threads = (v[1:] for v in cell.split("/"))
            lat, ratio = figures["latency_s"], figures["ratios"]
            row = [name, batch, threads]
            for variant, _ in _DEPLOY_COLUMNS:
                row.append(f"{lat[variant] * 1e3:.1f}" + ("" if variant == "float_eager"
                                                            else f" ({ratio[f'{variant}/float_eager']:.2f})"))
            target = deploy_cost.TARGETS.get((name, int(batch), int(threads)), {})
            for key in ("best_exact_int8/float_eager", "best_exact_int8/float_compiled"):
                text = f"{ratio[key]:.2f}" + (f" {figures['best_exact_int8']}" if key.endswith("eager") else "")
                if key in target:
                    text = f"**{text}** ({'met' if ratio[key] <= target[key] else 'missed'}, ≤ {target[key]})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, r in deploy.items():
        lines.append(f"{name}: build / export / compile times: " + ", ".join(
            f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in r["build_times"].items())
            + f"; compiled int8 kernels {r.get('int8_kernels')}.")
        for cell, prof in (r.get("profiles") or {}).items():
            lines += ["", f"Profile, {name} {cell.replace('/', ' ')} (ms per inference, top ops):", ""]
            for variant, rows in prof.items():
                lines.append(f"- {variant}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in rows))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small inputs, eager kernels, few repeats")
    p.add_argument("--output", type=Path, default=None,
                   help=f"JSON results (default in full mode: {DEFAULT_OUTPUT.relative_to(REPO)}; quick: none)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per flavour (default 7; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="op / latency repeats (default 20; quick 3)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of %(default)s (train and latency share the QAT models)")
    p.add_argument("--deploy-models", default=None,
                   help=f"deploy grid models (default {','.join(DEPLOY_GRID['models'])}; quick: resnet20_cifar)")
    p.add_argument("--deploy-batches", default=None, help="deploy grid batch sizes (default 1,8; quick: 1)")
    p.add_argument("--deploy-threads", default=None, help="deploy grid thread counts (default 1,2; quick: 1)")
    args = p.parse_args(argv)
    sections = [v.strip() for v in args.sections.split(",") if v.strip()]
    if not sections or set(sections) - set(SECTIONS):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}, got {args.sections!r}")
    grid = dict(DEPLOY_GRID_QUICK if args.quick else DEPLOY_GRID)
    for what, value in (("models", args.deploy_models), ("batches", args.deploy_batches),
                        ("threads", args.deploy_threads)):
        if value is not None:
            items = [v.strip() for v in value.split(",") if v.strip()]
            try:
                grid[what] = tuple(items if what == "models" else (int(v) for v in items))
            except ValueError:
                p.error(f"--deploy-{what} must be comma-separated integers, got {value!r}")
            if not grid[what] or (what != "models" and min(grid[what]) < 1):
                p.error(f"--deploy-{what}: give at least one positive value")
    unknown = set(grid["models"]) - set(deploy_cost.DEPLOY_MODELS)
    if unknown:
        p.error(f"--deploy-models: unknown {sorted(unknown)}; choose from {sorted(deploy_cost.DEPLOY_MODELS)}")
    deploy_grid = grid if "deploy" in sections else None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not ({"train", "latency"} & set(sections)):
        models = []
    threads = args.threads or (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 7)
    repeats = args.repeats or (3 if args.quick else 20)
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)

    import timm

    import daq_core

    t_start = time.perf_counter()
    load_start = _load_average()
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "x86"
    compiled = False if args.quick else daq_core.use_compiled_kernels(True)
    kernels = "compiled" if compiled else "eager"
    mode = "quick" if args.quick else "full"
    print(f"DAQ cost vs torch built-in fake-quant ({mode} mode): torch {torch.__version__},"
          f" timm {timm.__version__}, {threads} thread(s), DAQ kernels {kernels}, {platform.processor() or 'cpu'}")

    print(f"load average at start: {load_start}; CPU: {_cpu()}")

    # 1. the op --------------------------------------------------------------------------------
    ratios, rows, act, weight = {}, [], None, None
    if "op" in sections:
        op_kernels = "both" if compiled else "eager"
        act = op_cost.activation_op_cost(op_cost.ACTIVATION_SHAPE_QUICK if args.quick else op_cost.ACTIVATION_SHAPE,
                                         4, repeats, op_kernels)
        weight = op_cost.weight_op_cost(op_cost.WEIGHT_SHAPE_QUICK if args.quick else op_cost.WEIGHT_SHAPE,
                                        4, repeats, op_kernels)
        daq_core.use_compiled_kernels(compiled)
        main_ratio = "ratio_compiled" if compiled else "ratio_eager"
        ratios = {"op/activation_per_tensor": act[main_ratio], "op/weight_per_channel": weight[main_ratio]}
        rows = _op_rows("op/activation_per_tensor", act, "per_tensor_affine", compiled)
        rows += _op_rows("op/weight_per_channel", weight, "per_channel_affine", compiled)
        print(f"op: activation {ratios['op/activation_per_tensor']:.2f}x, weight"
              f" {ratios['op/weight_per_channel']:.2f}x built-in ({kernels} kernels)", flush=True)

    # 2./3. training step, memory, converted latency per model -------------------------------
    model_results = {}
    for name in models:
        spec = dict(fx_cost.MODELS.get(name, {"size": 224, "batch": 8}))
        if args.quick:
            spec.update(QUICK_SIZES.get(name, {"size": 64, "batch": 4}))
        t0 = time.perf_counter()
        r = fx_cost.run(name, spec["size"], spec["batch"], steps=steps, threads=threads, compile=compiled,
                        latency_repeats=repeats, num_classes=spec.get("num_classes"),
                        memory_subprocess=not args.quick, latency=False,
                        log=lambda line: print("  " + line, flush=True))
        r["wall_s"] = time.perf_counter() - t0
        model_results[name] = r
    # latency last, for every model after all training (the same allocator history for each)
    for name, r in model_results.items():
        t0 = time.perf_counter()
        lat = r["latency"] = fx_cost.measure_latency(r["train_step"].pop("daq_model"), name, r["size"], r["batch"],
                                                     repeats, fx_cost.MODELS.get(name, {}).get("num_classes"))
        fx_cost.log_latency(lat, r["batch"], log=lambda line: print(f"  {name}: " + line, flush=True))
        r["wall_s"] += time.perf_counter() - t0
        st, mem = r["train_step"], r["memory"]
        ratios.update({f"{name}/train_step": st["ratio"], f"{name}/memory": mem["ratio"]})
        shape = f"{r['size']}x{r['size']} b{r['batch']}"
        rows += [(f"{name}/train_step", f"{name} train step ({shape})", _ms(st["daq_s"]),
                  f"default QAT {_ms(st['default_s'])}", st["ratio"]),
                 (f"{name}/memory", f"{name} peak train memory", _mib(mem["daq_bytes"]),
                  f"default QAT {_mib(mem['default_bytes'])}", mem["ratio"])]
        for form, suffix, figures in (("eager", "", lat), ("frozen", "_frozen", lat["frozen"])):
            for kind in ("exact", "fast"):
                key = f"{name}/latency_{kind}{suffix}"
                ratios[key] = figures[f"ratio_{kind}"]
                rows.append((key, f"{name} int8 x86 {kind}" + (", frozen" if suffix else ""),
                             _ms(figures[f"{kind}_s"]),
                             f"float {form} {figures['float_layout']} {_ms(figures['float_s'])}", ratios[key]))

    # 4. deploy paths --------------------------------------------------------------------------
    deploy = None
    if deploy_grid:
        daq_core.use_compiled_kernels(False)   # deploy models are converted: no DAQ fake-quant runs
        deploy = deploy_cost.run(deploy_grid["models"], deploy_grid["batches"], deploy_grid["threads"],
                                 repeats=max(3, repeats), log=lambda line: print("  " + line, flush=True))
        torch.set_num_threads(threads)
        for name, r in deploy.items():
            for cell, figures in r["cells"].items():
                batch, nthreads = (int(v[1:]) for v in cell.split("/"))
                for ratio, value in figures["ratios"].items():
                    ratios[f"{deploy_cost.cell_key(name, batch, nthreads)}/{ratio}"] = value

    wall = time.perf_counter() - t_start
    load_end = _load_average()
    print()
    _print_table(rows, ratios)
    if deploy:
        print()
        _print_deploy_table(deploy)
    targets = {k: target_of(k) for k in ratios}
    missed = [k for k, t in targets.items() if t is not None and not ratios[k] <= t]
    print(f"\n{len(targets) - len(missed) - sum(t is None for t in targets.values())} of"
          f" {sum(t is not None for t in targets.values())} targets met"
          + (f"; missed: {', '.join(missed)}" if missed else "") + f"; wall time {wall:.0f} s")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end} on {os.cpu_count()} CPUs"
          + ("  -- the machine was busy: multi-threaded timings are not meaningful"
             if max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1) else ""))
    if args.quick:
        print("(quick mode: smoke sizes and eager kernels; the ratios are not the benchmark's figures)")

    results = {
        "mode": "quick" if args.quick else "full", "threads": threads, "daq_kernels": kernels,
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu": _cpu(), "wall_s": wall, "sections": sections,
        "load_average": {"start": load_start, "end": load_end, "cpus": os.cpu_count()},
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "ratios": ratios, "targets": targets,
        "meets_target": {k: (None if t is None else bool(ratios[k] <= t)) for k, t in targets.items()},
        "op": {"activation_per_tensor": act, "weight_per_channel": weight} if act is not None else None,
        "models": model_results,
        "deploy_grid": {k: list(v) for k, v in deploy_grid.items()} if deploy_grid else None,
        "deploy": deploy,
    }
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {output}")
        if deploy:
            markdown = output.with_name(output.stem + "_deploy.md")
            markdown.write_text(deploy_markdown(results))
            print(f"wrote {markdown}")
    return results


if __name__ == "__main__":
    main()
