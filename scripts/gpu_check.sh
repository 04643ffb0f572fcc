#!/usr/bin/env bash
# GPU readiness check (issue 19): the one command a user with an NVIDIA GPU runs.
#
#   scripts/gpu_check.sh              # after `pip install -e ".[test]"`
#   scripts/gpu_check.sh --install    # pip install -e ".[test]" first
#   OUT=/some/dir scripts/gpu_check.sh
#
# Prints the torch / CUDA versions and the GPU, runs the CUDA tests (tests/cuda, slow ones
# included) and the fake-quant op benchmark on the GPU. Writes into ${OUT:-gpu_check_out}:
#   versions.txt, pytest-cuda.log, pytest-cuda.xml (JUnit), op_cost.txt, op_cost.json, summary.txt
# Exits non-zero if CUDA is unavailable, a test fails or is skipped, or the benchmark fails.
# About 2-3 minutes on one H200 (most of it torch.compile's first calls and a tiny DDP recipe run).
# What "matches CPU" means: docs/gpu.md.

set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--install" ]; then
    "$PY" -m pip install -e ".[test]" || { echo "gpu_check: pip install failed" >&2; exit 1; }
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--install]    (OUT=DIR sets the output folder)" >&2
    exit 2
fi

# ---- versions and the GPU ------------------------------------------------------------------
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("torchvision", "timm", "brevitas", "triton"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__})")
print(f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
EOF
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch.cuda.is_available() is False: no usable GPU / CUDA build of torch here" | tee "$OUT_DIR/summary.txt" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$OUT_DIR/versions.txt"

# ---- the CUDA tests ------------------------------------------------------------------------
echo "== python -m pytest -q tests/cuda --run-slow"
"$PY" -m pytest -q tests/cuda --run-slow -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest-cuda.xml" 2>&1 | tee "$OUT_DIR/pytest-cuda.log"
test_rc=${PIPESTATUS[0]}
skipped=$("$PY" - "$OUT_DIR/pytest-cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:  # noqa: BLE001 - no report: pytest itself failed, test_rc says so
    print(-1); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
print(sum(int(s.get("skipped", 0)) for s in suites))
EOF
)

# ---- the op benchmark on the GPU -----------------------------------------------------------
echo "== python -m benchmarks.op_cost --device cuda"
"$PY" -m benchmarks.op_cost --device cuda --json "$OUT_DIR/op_cost.json" 2>&1 | tee "$OUT_DIR/op_cost.txt"
bench_rc=${PIPESTATUS[0]}

# ---- summary -------------------------------------------------------------------------------
status=0
{
    echo "tests/cuda: exit code $test_rc, skipped $skipped"
    echo "benchmarks.op_cost --device cuda: exit code $bench_rc"
    if [ "$test_rc" -ne 0 ]; then echo "FAIL: a CUDA test failed (see pytest-cuda.log)"; status=1; fi
    if [ "$skipped" != "0" ]; then
        echo "FAIL: $skipped CUDA test(s) skipped (see the 'SKIPPED' lines in pytest-cuda.log; e.g. brevitas missing)"
        status=1
    fi
    if [ "$bench_rc" -ne 0 ]; then echo "FAIL: the op benchmark failed (see op_cost.txt)"; status=1; fi
    [ "$status" -eq 0 ] && echo "OK: all CUDA checks passed"
    echo "outputs: $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
# the pipeline above ran in a subshell: recompute the status from its own lines
grep -q '^FAIL' "$OUT_DIR/summary.txt" && exit 1
exit 0
