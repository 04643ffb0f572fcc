"""Which timm CNN families ``daq_fx`` prepares, trains, evaluates and converts (issue 18).

For each family, in its own process (``OMP_NUM_THREADS=1``; a crash or a hang stays in that
model's row), as a new user would: ``timm.create_model(name, pretrained=False, num_classes=10)``
(random init, BatchNorm statistics from two random batches as in ``tests/fx``; where
``daq_fx.prepare_qat_fx`` refuses timm's zero-initialised last BN γ —
``zero_init_last``, a random-init artefact — the refusal is recorded and the model re-created with
``zero_init_last=False``), W4A4 ``daq_fx.prepare_qat_fx`` at ``--size`` (64x64), ``--steps``
training steps on random batches of 8 (SGD lr 1e-3 momentum 0.9 for the network, Adam lr 1e-4
for the quantizers' ``l, u, s``, DAQ-SPEC §6), eval, ``daq_fx.convert_fx``. A family passes when

* every loss is finite;
* eval is deterministic: two calls on the same batch are bit-identical (no dropout left on);
* eval is batch-independent: the first 4 outputs do not change (1e-5) when the other 4 samples
  of the batch do (BN on running statistics), in the QAT and in the int8 model;
* convert succeeds and every int8 weight is on DAQ's grid: odd codes within ``±(2^b - 1)`` in
  every quantized conv / linear of the int8 model, and equal to the fake-quant's integers for
  every layer that owns a DAQ weight quantizer.

Also recorded (not pass criteria): int8-vs-QAT agreement on 64 random samples (random-init 4-bit
networks amplify rare one-code near-tie flips: see docs/fx.md, "Backends"), time per phase,
first-batch ranges widened (``daq_core.DAQInitWarning``), modules specialised to the example's
shapes (``daq_fx.static_shape_modules``) and functional dropouts made to follow train / eval.

Usage::

    python -m benchmarks.timm_sweep                        # the 30 families + variants, ~30-60 min on 1 core
    python -m benchmarks.timm_sweep --models resnet18,vgg11_bn --out /tmp/sweep
    python -m benchmarks.timm_sweep --one ghostnet_100      # one model in this process, JSON to stdout

Writes ``benchmarks/results/timm_sweep.md`` (table for docs) and ``timm_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the 30 families of issue 18
FAMILIES = [
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "mnasnet_100",
    "efficientnet_lite0", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18", "resnet34", "resnet50",
    "resnext26ts", "regnetx_002", "regnety_002", "ghostnet_100", "repvgg_a0", "hardcorenas_a", "lcnet_050",
    "fbnetc_100", "spnasnet_100", "densenet121", "dla34", "dpn48b", "vgg11_bn", "rexnet_100", "semnasnet_100",
    "tinynet_a", "mixnet_s", "convnext_atto", "resnet26d",
]
#: variants: ``label -> (timm name, create_model kwargs)``
VARIANTS = {
    "resnet18 (drop_rate=0.2)": ("resnet18", {"drop_rate": 0.2}),             # functional dropout in the head
    "convnext_atto (drop_path_rate=0.1)": ("convnext_atto", {"drop_path_rate": 0.1}),   # timm DropPath
}
WEIGHT_BITS = ACT_BITS = 4


def _spec(label):
    if label in VARIANTS:
        return VARIANTS[label]
    return label, {}


def _weights_on_grid(qat, int8, bits):
    """(layers checked against the fake-quant integers, quantized int8 weights checked, failures)."""
    import torch

    from daq_fx import DAQFakeQuantize
    from daq_fx.prepare import folded_weight
    n = 2**bits - 1
    failures, owned, total = [], 0, 0
    for name, module in qat.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, DAQFakeQuantize):
            continue
        ints = int8.get_submodule(name).weight().int_repr().to(torch.int32)
        if not torch.equal(ints, fq.integers(folded_weight(module))):
            failures.append(f"{name}: int8 weight != fake-quant integers")
        owned += 1
    quantized = []
    for name, module in int8.named_modules():          # quantized conv / linear modules: weight() is packed
        weight = getattr(module, "weight", None)
        if name and callable(weight):
            try:
                quantized.append((name, weight()))
            except Exception:
                pass
    for node in int8.graph.nodes:                      # functional linear / conv: packed-weight attributes
        value = getattr(int8, node.target, None) if node.op == "get_attr" else None
        if isinstance(value, torch.ScriptObject):
            for unpack in (torch.ops.quantized.linear_unpack, torch.ops.quantized.conv2d_unpack):
                try:
                    quantized.append((node.target, unpack(value)[0]))
                    break
                except Exception:
                    continue
    for name, w in quantized:
        if not isinstance(w, torch.Tensor) or not w.is_quantized:
            continue
        ints = w.int_repr().to(torch.int32)
        total += 1
        if not bool((ints.abs() <= n).all()) or not bool((ints.remainder(2) == 1).all()):
            failures.append(f"{name}: codes off the odd grid within ±{n} (min {ints.min().item()},"
                            f" max {ints.max().item()})")
    return owned, total, failures


def _batch_independent(model, x, other_rest):
    import torch
    with torch.no_grad():
        a = model(x)
        b = model(torch.cat([x[:4], other_rest]))
    return bool(torch.allclose(a[:4], b[:4], atol=1e-5)), float((a[:4] - b[:4]).abs().max())


def _calibrated(model, size: int):
    """BN running statistics from two random batches (as tests/fx does): with BN's initial statistics
    a random-init network's eval outputs can vanish (all zero at 4 bits), which would make the eval
    checks trivially true."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, size, size))
    for bn in bns:
        bn.momentum = 0.1
    return model


def run_one(label: str, size: int, steps: int) -> dict:
    """Everything for one model, in this process."""
    import torch
    from torch import nn

    import daq_core
    import daq_fx

    torch.set_num_threads(1)
    torch.backends.quantized.engine = "x86"
    name, kwargs = _spec(label)
    row = {"model": label, "timm_name": name, "kwargs": dict(kwargs), "size": size, "steps": steps, "ok": False,
           "notes": [], "times": {}}
    started = time.perf_counter()

    def lap(phase):
        nonlocal started
        now = time.perf_counter()
        row["times"][phase] = round(now - started, 2)
        started = now

    import timm
    mapping = daq_fx.get_daq_qat_qconfig_mapping("x86", WEIGHT_BITS, ACT_BITS)
    example = (torch.randn(2, 3, size, size),)
    stage = "create"
    try:
        torch.manual_seed(0)
        model = _calibrated(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), size)
        lap("create")
        stage = "prepare"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", daq_core.DAQInitWarning)
            try:
                qat = daq_fx.prepare_qat_fx(model, mapping, example)
            except ValueError as error:
                if "zero_init_last" not in str(error):
                    raise
                row["notes"].append("default init refused (zero BN γ, timm zero_init_last): "
                                    "re-created with zero_init_last=False")
                row["kwargs"]["zero_init_last"] = False
                torch.manual_seed(0)
                model = _calibrated(timm.create_model(name, pretrained=False, num_classes=10, **row["kwargs"]), size)
                qat = daq_fx.prepare_qat_fx(model, mapping, example)
            lap("prepare")
            row["static_shape_modules"] = list(qat.meta.get("daq_static_shape_modules", []))
            row["functional_dropouts"] = len(qat.meta.get("daq_functional_dropouts", []))
            stage = "train"
            quant, rest = daq_fx.quantizer_parameters(qat)
            sgd = torch.optim.SGD(rest, lr=1e-3, momentum=0.9)
            adam = torch.optim.Adam(quant, lr=1e-4)
            losses = []
            for _ in range(steps):
                loss = nn.functional.cross_entropy(qat(torch.randn(8, 3, size, size)), torch.randint(0, 10, (8,)))
                sgd.zero_grad()
                adam.zero_grad()
                loss.backward()
                sgd.step()
                adam.step()
                losses.append(float(loss))
            lap("train")
        row["losses"] = losses
        row["widened_ranges"] = sum(1 for w in caught if issubclass(w.category, daq_core.DAQInitWarning))
        if not all(torch.isfinite(torch.tensor(losses))):
            raise RuntimeError(f"non-finite training loss: {losses}")
        stage = "eval"
        qat.eval()
        x = torch.randn(8, 3, size, size)
        rest_other = 5 * torch.randn(4, 3, size, size)
        with torch.no_grad():
            first, second = qat(x), qat(x)
        row["eval_deterministic"] = bool(torch.equal(first, second))
        row["eval_max_diff"] = float((first - second).abs().max())
        row["batch_independent"], row["batch_max_diff"] = _batch_independent(qat, x, rest_other)
        lap("eval")
        stage = "convert"
        int8 = daq_fx.convert_fx(qat)
        lap("convert")
        stage = "check int8"
        row["int8_batch_independent"], _ = _batch_independent(int8, x, rest_other)
        owned, total, failures = _weights_on_grid(qat, int8, WEIGHT_BITS)
        row["weight_layers_checked"], row["int8_weights_checked"], row["grid_failures"] = owned, total, failures[:5]
        probe = torch.randn(64, 3, size, size)
        with torch.no_grad():
            expected = qat(probe)
            row["int8_vs_qat"] = {k: round(float(v), 6) for k, v in
                                  daq_fx.output_agreement(expected, int8(probe)).items()}
        row["qat_output_abs_max"] = float(expected.abs().max())
        if row["qat_output_abs_max"] == 0:
            row["notes"].append("QAT output all zero (degenerate random-init network)")
        lap("check")
        problems = []
        if not row["eval_deterministic"]:
            problems.append(f"eval not deterministic (max diff {row['eval_max_diff']:.3g})")
        if not row["batch_independent"] or not row["int8_batch_independent"]:
            problems.append("eval depends on the rest of the batch")
        if failures or total == 0:
            problems.append(failures[0] if failures else "no quantized weight found in the int8 model")
        row["ok"] = not problems
        row["reason"] = "; ".join(problems)
    except Exception as error:  # the row records it; the sweep goes on
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row["reason"] = f"{stage}: {type(error).__name__}: {message[:300]}"
        row["times"]["failed_at"] = stage
    return row


def _child(label, size, steps, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, "-m", "benchmarks.timm_sweep", "--one", label, "--size", str(size),
               "--steps", str(steps)]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": label, "ok": False, "reason": f"timed out after {timeout} s", "wall_s": timeout}
    wall = round(time.perf_counter() - started, 1)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            row = json.loads(line)
            row["wall_s"] = wall
            return row
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
    return {"model": label, "ok": False, "wall_s": wall,
            "reason": f"process exited with {result.returncode}: {tail[0][:300]}"}


def _notes(row):
    notes = list(row.get("notes", []))
    if row.get("static_shape_modules"):
        notes.append("traced at the example's shapes: " + ", ".join(row["static_shape_modules"]))
    if row.get("functional_dropouts"):
        notes.append(f"{row['functional_dropouts']} functional dropout(s) follow train/eval")
    if row.get("widened_ranges"):
        notes.append(f"{row['widened_ranges']} first-batch range(s) widened to 1e-3")
    return "; ".join(notes)


def write_table(rows, path: Path, meta: dict) -> None:
    passed = sum(1 for r in rows if r.get("ok"))
    families = [r for r in rows if r["model"] in FAMILIES]
    passed_families = sum(1 for r in families if r.get("ok"))
    lines = [
        "# timm sweep (`python -m benchmarks.timm_sweep`)",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, timm {meta['timm']}; random init,"
        f" W{WEIGHT_BITS}A{ACT_BITS}, {meta['size']}x{meta['size']}, {meta['steps']} training steps (batch 8),"
        " one process per model, 1 thread.",
        "",
        f"**{passed_families}/{len(families)} families pass** ({passed}/{len(rows)} rows with the variants);"
        f" wall time {meta['wall_s'] / 60:.1f} min.",
        "Pass: finite losses, eval deterministic and batch-independent (QAT and int8), converts, every int8"
        " weight odd within ±15 and equal to the fake-quant's integers. int8 vs QAT (64 random samples:"
        " bit-exact samples / top-1 / cosine) is information, not a criterion: random-init 4-bit networks"
        " amplify rare near-tie flips (docs/fx.md, \"Backends\").",
        "",
        "| model | result | weights checked (layers / int8) | int8 vs QAT | prepare / train / convert s | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("times", {})
        agree = r.get("int8_vs_qat")
        agree_text = (f"{agree['bit_exact_samples']:.2f} / {agree['top1']:.2f} / {agree['cosine']:.3f}"
                      if agree else "")
        checked = (f"{r['weight_layers_checked']} / {r['int8_weights_checked']}"
                   if "weight_layers_checked" in r else "")
        timing = " / ".join(str(t.get(k, "–")) for k in ("prepare", "train", "convert"))
        result = "pass" if r.get("ok") else f"**fail**: {r.get('reason', '')}"
        lines.append(f"| {r['model']} | {result} | {checked} | {agree_text} | {timing} | {_notes(r)} |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated labels (default: the 30 families + variants)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "timm_sweep"),
                        help="output path without suffix (.md and .json are written)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        warnings.filterwarnings("ignore")
        print(json.dumps(run_one(args.one, args.size, args.steps)), flush=True)
        return 0
    labels = args.models.split(",") if args.models else FAMILIES + list(VARIANTS)
    import timm
    import torch
    started = time.perf_counter()
    rows = []
    for label in labels:
        row = _child(label, args.size, args.steps, args.timeout)
        rows.append(row)
        print(f"{label:28s} {'pass' if row.get('ok') else 'FAIL'} {row.get('wall_s', 0):7.1f}s"
              f" {row.get('reason', '')}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()},"
            f" {os.cpu_count()} cores", "torch": torch.__version__, "timm": timm.__version__, "size": args.size,
            "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_table(rows, out.with_suffix(".md"), meta)
    passed = sum(1 for r in rows if r.get("ok"))
    print(f"{passed}/{len(rows)} pass; wrote {out.with_suffix('.md')} and .json ({meta['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
