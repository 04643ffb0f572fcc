"""Cost of the DAQ fake-quant op against torch's built-in fake-quant, measured in one run.

Activations: forward+backward of ``daq_core.fake_quantize_activation`` (4 bits, learned
per-tensor bounds, closed-form DASR backward) on an 8x32x112x112 float tensor, divided by
the time of ``torch.fake_quantize_per_tensor_affine`` (STE) on the same tensor; and the
bytes saved for backward, divided by the input's bytes.

Weights: forward+backward of the per-channel DAQ weight quantizer as ``daq_fx`` runs it
(``W / rms(W)`` per output channel, then ``daq_core.fake_quantize_weight`` with per-channel
bounds and output scale) on a 256x256x3x3 weight, divided by the time of
``torch.fake_quantize_per_channel_affine`` (STE, no observer) on the same weight.

    python -m benchmarks.op_cost                 # full size, compiled and eager kernels
    python -m benchmarks.op_cost --quick         # small tensors, a few seconds
    python -m benchmarks.op_cost --device cuda   # the same on the GPU (times synchronised)

Target (issue: foundation): compiled ratio <= 1.5, saved memory <= 1 input.

CPQ (issue 17, reconstructed from the abstract): ``cpq_op_cost`` times the CPQ activation op as it
trains (learned step and noise scale, DropBits at p = 0.1, the windowed multi-class STE) on the
same tensor against ``torch.fake_quantize_per_tensor_affine``; target ratio <= 1.5 (compiled).

``activation_op_cost`` and ``weight_op_cost`` are reused by ``benchmarks/cost.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import daq_core as dc

ACTIVATION_SHAPE, ACTIVATION_SHAPE_QUICK = (8, 32, 112, 112), (2, 8, 56, 56)
WEIGHT_SHAPE, WEIGHT_SHAPE_QUICK = (256, 256, 3, 3), (64, 32, 3, 3)


def _synchronized(fn, device) -> "callable":
    """``fn`` followed by a CUDA synchronisation on a GPU: the timers then see the kernels' time."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def check_device(device: str) -> torch.device:
    """The device to measure on; a clear error if CUDA is asked for but unavailable."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available (torch {torch.__version__},"
                           f" torch.cuda.is_available() is False); run on a GPU machine or use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"--device must be cpu or cuda[:N], got {device!r}")
    return dev


def _time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward that are not the input itself."""
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _interleaved(fns, repeats: int, warmup: int) -> list:
    """Median time of each closure, sampled in turn so that load from other processes hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(out) for out in samples]


def _compare(builtin, daq, repeats: int, kernels: str) -> dict:
    """Median times of ``builtin`` and ``daq`` (fwd+bwd closures) and their ratios.

    ``kernels``: ``"eager"``, ``"compiled"`` or ``"both"`` DAQ kernels. Each DAQ flavour is
    timed interleaved with the built-in op (``builtin_s`` beside eager, ``builtin_s_again``
    beside compiled) and divided by the built-in median of its own interleaving. The
    compiled-kernel state is restored on return.
    """
    was_compiled = dc.compiled_kernels_enabled()
    results = {}
    try:
        if kernels in ("eager", "both"):
            dc.use_compiled_kernels(False)
            results["builtin_s"], results["daq_eager_s"] = _interleaved(
                (builtin, daq), max(3, repeats // 4) if kernels == "both" else repeats, 2)
            results["ratio_eager"] = results["daq_eager_s"] / results["builtin_s"]
        if kernels in ("compiled", "both"):
            compiled = dc.use_compiled_kernels(True)
            results["compiled_available"] = compiled
            if compiled:
                t0 = time.perf_counter()
                daq()
                results["compile_first_call_s"] = time.perf_counter() - t0
                key = "builtin_s_again" if "builtin_s" in results else "builtin_s"
                results[key], results["daq_compiled_s"] = _interleaved((builtin, daq), repeats, 3)
                results["ratio_compiled"] = results["daq_compiled_s"] / results[key]
    finally:
        dc.use_compiled_kernels(was_compiled)
    results["builtin_base_s"] = min(results.get(k, float("inf")) for k in ("builtin_s", "builtin_s_again"))
    return results


def activation_op_cost(shape=ACTIVATION_SHAPE, bits: int = 4, repeats: int = 20, kernels: str = "both",
                       device="cpu") -> dict:
    """DAQ per-tensor activation fake-quant vs ``torch.fake_quantize_per_tensor_affine`` (fwd+bwd)."""
    device = check_device(str(device))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True, device=device)
    grad = torch.randn(shape, device=device)
    lo = torch.tensor(-1.0, requires_grad=True, device=device)
    hi = torch.tensor(2.0, requires_grad=True, device=device)
    n = 2**bits - 1
    scale, zp = 3.0 / n, round(1.0 / (3.0 / n))

    def builtin():
        x.grad = None
        torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, n).backward(grad)

    def daq():
        x.grad = lo.grad = hi.grad = None
        dc.fake_quantize_activation(x, lo, hi, bits).backward(grad)

    results = {"shape": list(shape), "bits": bits, "device": str(device),
               **_compare(_synchronized(builtin, device), _synchronized(daq, device), repeats, kernels)}
    was_compiled = dc.compiled_kernels_enabled()
    dc.use_compiled_kernels(False)
    try:
        h = x * 1.0
        results["saved_bytes_over_input"] = _saved_bytes(lambda: dc.fake_quantize_activation(h, lo, hi, bits)) / (
            h.numel() * h.element_size())
    finally:
        dc.use_compiled_kernels(was_compiled)
    return results


def weight_op_cost(shape=WEIGHT_SHAPE, bits: int = 4, repeats: int = 20, kernels: str = "both",
                   device="cpu") -> dict:
    """DAQ per-channel weight fake-quant (as ``daq_fx`` runs it) vs ``torch.fake_quantize_per_channel_affine``."""
    device = check_device(str(device))
    torch.manual_seed(0)
    w = (0.05 * torch.randn(shape, device=device)).requires_grad_(True)
    grad = torch.randn(shape, device=device)
    channels = shape[0]
    lo = torch.full((channels,), -3.0, requires_grad=True, device=device)
    hi = torch.full((channels,), 3.0, requires_grad=True, device=device)
    s = torch.full((channels,), 0.1, requires_grad=True, device=device)
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 2 ** (bits - 1)
    zero_point = torch.zeros(channels, dtype=torch.int32, device=device)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def builtin():
        w.grad = None
        torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, qmin, qmax).backward(grad)

    def daq():
        w.grad = lo.grad = hi.grad = s.grad = None
        w_hat = dc.normalize_weight(w, 0, center=False)
        dc.fake_quantize_weight(w_hat, lo, hi, s, bits, ch_axis=0, standardize_input=False).backward(grad)

    return {"shape": list(shape), "bits": bits, "device": str(device),
            **_compare(_synchronized(builtin, device), _synchronized(daq, device), repeats, kernels)}


def cpq_op_cost(shape=ACTIVATION_SHAPE, bits: int = 4, repeats: int = 20, kernels: str = "both",
                drop_rate: float = 0.1, device="cpu") -> dict:
    """CPQ activation fake-quant (reconstructed from the abstract) vs ``torch.fake_quantize_per_tensor_affine``.

    The training op: learned step ``α`` and ``log σ/α``, unsigned ``bits``-bit grid, DropBits at the fixed
    rate ``drop_rate`` (one uniform per element; 0: no DropBits), the windowed multi-class STE backward.
    """
    import math

    from daq_core import cpq

    torch.manual_seed(0)
    device = torch.device(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    n = 2**bits - 1
    step = torch.tensor(3.0 / n, device=device, requires_grad=True)
    log_sigma = torch.tensor(math.log(cpq.DEFAULT_RELATIVE_SIGMA), device=device, requires_grad=True)
    keep = cpq.nested_keep(torch.full((bits - 1,), 1.0 - drop_rate, device=device)) if drop_rate > 0 else None

    def builtin():
        x.grad = None
        torch.fake_quantize_per_tensor_affine(x, 3.0 / n, 0, 0, n).backward(grad)

    def op():
        x.grad = step.grad = log_sigma.grad = None
        cpq.cpq_fake_quantize(x, step, step * log_sigma.exp(), bits, signed=False, keep=keep).backward(grad)

    return {"shape": list(shape), "bits": bits, "drop_rate": drop_rate, "device": str(device),
            **_compare(_synchronized(builtin, device), _synchronized(op, device), repeats, kernels)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small tensors and few repeats (seconds)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU measurement)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where the ops run; CUDA timings synchronise after each call")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
    except RuntimeError as e:
        p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    act = activation_op_cost(ACTIVATION_SHAPE_QUICK if args.quick else ACTIVATION_SHAPE, args.bits, repeats,
                             device=args.device)
    weight = weight_op_cost(WEIGHT_SHAPE_QUICK if args.quick else WEIGHT_SHAPE, args.bits, repeats,
                            device=args.device)
    cpq_row = cpq_op_cost(ACTIVATION_SHAPE_QUICK if args.quick else ACTIVATION_SHAPE, args.bits, repeats,
                          device=args.device)
    compiled = act.get("compiled_available", False)
    results = {**act, "threads": args.threads, "weight_per_channel": weight, "cpq": cpq_row}

    where = (f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
             if torch.device(args.device).type == "cuda" else f"cpu, {args.threads} threads")
    print(f"DAQ fake-quant op, fwd+bwd on {tuple(act['shape'])}, {args.bits} bits, {where}")
    print(f"  torch.fake_quantize_per_tensor_affine : {1e3 * act['builtin_base_s']:8.2f} ms")
    if compiled:
        print(f"  DAQ (compiled kernels)                : {1e3 * act['daq_compiled_s']:8.2f} ms"
              f"  ratio {act['ratio_compiled']:.2f}  (target <= 1.5; first call "
              f"{act['compile_first_call_s']:.1f} s)")
    print(f"  DAQ (eager kernels)                   : {1e3 * act['daq_eager_s']:8.2f} ms"
          f"  ratio {act['ratio_eager']:.2f}")
    print(f"  saved for backward / input size       : {act['saved_bytes_over_input']:.2f}  (target <= 1)")
    print(f"DAQ per-channel weight fake-quant, fwd+bwd on {tuple(weight['shape'])}")
    print(f"  torch.fake_quantize_per_channel_affine: {1e3 * weight['builtin_base_s']:8.2f} ms")
    if "daq_compiled_s" in weight:
        print(f"  DAQ (compiled kernels)                : {1e3 * weight['daq_compiled_s']:8.2f} ms"
              f"  ratio {weight['ratio_compiled']:.2f}  (target <= 1.5)")
    print(f"  DAQ (eager kernels)                   : {1e3 * weight['daq_eager_s']:8.2f} ms"
          f"  ratio {weight['ratio_eager']:.2f}")
    print(f"CPQ fake-quant op (reconstructed from the abstract; DropBits p={cpq_row['drop_rate']}, windowed"
          f" multi-class STE), fwd+bwd on {tuple(cpq_row['shape'])}")
    print(f"  torch.fake_quantize_per_tensor_affine : {1e3 * cpq_row['builtin_base_s']:8.2f} ms")
    if "daq_compiled_s" in cpq_row:
        print(f"  CPQ (compiled kernels)                : {1e3 * cpq_row['daq_compiled_s']:8.2f} ms"
              f"  ratio {cpq_row['ratio_compiled']:.2f}  (target <= 1.5)")
    print(f"  CPQ (eager kernels)                   : {1e3 * cpq_row['daq_eager_s']:8.2f} ms"
          f"  ratio {cpq_row['ratio_eager']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
