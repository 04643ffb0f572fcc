"""Cost of the DAQ fake-quant op against torch's built-in fake-quant, measured in one run.

Forward+backward of ``daq_core.fake_quantize_activation`` (4 bits, learned per-tensor
bounds, closed-form DASR backward) on an 8x32x112x112 float tensor, divided by the
time of ``torch.fake_quantize_per_tensor_affine`` (STE) on the same tensor; and the
bytes saved for backward, divided by the input's bytes.

    python -m benchmarks.op_cost            # full size, compiled and eager kernels
    python -m benchmarks.op_cost --quick    # small tensor, a few seconds

Target (issue: foundation): compiled ratio <= 1.5, saved memory <= 1 input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import daq_core as dc


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small tensor and few repeats (seconds)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (2, 8, 56, 56) if args.quick else (8, 32, 112, 112)
    repeats = 5 if args.quick else args.repeats
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    n = 2**args.bits - 1
    scale, zp = 3.0 / n, round(1.0 / (3.0 / n))

    def builtin():
        x.grad = None
        torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, n).backward(grad)

    def daq():
        x.grad = lo.grad = hi.grad = None
        dc.fake_quantize_activation(x, lo, hi, args.bits).backward(grad)

    results = {"shape": list(shape), "bits": args.bits, "threads": args.threads}
    results["builtin_s"] = _time(builtin, repeats, 3)
    dc.use_compiled_kernels(False)
    results["daq_eager_s"] = _time(daq, max(3, repeats // 4), 1)
    compiled = dc.use_compiled_kernels(True)
    results["compiled_available"] = compiled
    if compiled:
        t0 = time.perf_counter()
        daq()
        results["compile_first_call_s"] = time.perf_counter() - t0
        results["daq_compiled_s"] = _time(daq, repeats, 3)
        results["builtin_s_again"] = _time(builtin, repeats, 3)   # interleave to expose drift
    dc.use_compiled_kernels(False)
    h = x * 1.0
    results["saved_bytes_over_input"] = _saved_bytes(lambda: dc.fake_quantize_activation(h, lo, hi, args.bits)) / (
        h.numel() * h.element_size())
    base = min(results["builtin_s"], results.get("builtin_s_again", results["builtin_s"]))
    results["ratio_eager"] = results["daq_eager_s"] / base
    if compiled:
        results["ratio_compiled"] = results["daq_compiled_s"] / base

    print(f"DAQ fake-quant op, fwd+bwd on {tuple(shape)}, {args.bits} bits, {args.threads} threads")
    print(f"  torch.fake_quantize_per_tensor_affine : {1e3 * base:8.2f} ms")
    if compiled:
        print(f"  DAQ (compiled kernels)                : {1e3 * results['daq_compiled_s']:8.2f} ms"
              f"  ratio {results['ratio_compiled']:.2f}  (target <= 1.5; first call "
              f"{results['compile_first_call_s']:.1f} s)")
    print(f"  DAQ (eager kernels)                   : {1e3 * results['daq_eager_s']:8.2f} ms"
          f"  ratio {results['ratio_eager']:.2f}")
    print(f"  saved for backward / input size       : {results['saved_bytes_over_input']:.2f}  (target <= 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
