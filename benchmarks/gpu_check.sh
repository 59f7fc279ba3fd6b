#!/usr/bin/env bash
# GPU check for a fresh CUDA machine without internet, in under 8 minutes:
#   1. installs what is missing from a folder of wheels (ARE_FAST_WHEELS), never touching torch or triton,
#      and are_fast itself (editable, no dependencies; from the tree via PYTHONPATH when that fails offline);
#   2. runs the Triton correctness tests and the peers' wiring check;
#   3. runs the GPU benchmark set (the llama3-8b N=16384 target first, then the other shapes);
#   4. writes the Markdown table, the chart, the raw JSON and the logs into $OUT (or a temporary folder).
# Usage: ARE_FAST_WHEELS=/path/to/wheels OUT=/path/to/out bash benchmarks/gpu_check.sh
# The wheel folder, made on a machine with internet for the GPU machine's Python:
#   pip download -d wheels pytest pytest-benchmark matplotlib
#   pip download -d wheels --no-deps liger-kernel cut-cross-entropy
# Exit status: non-zero when a test failed or a step did not finish in its time.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-$(mktemp -d)}"
WHEELS="${ARE_FAST_WHEELS:-}"
TESTS="${ARE_FAST_GPU_TESTS:-tests/test_kernels.py tests/test_functional.py benchmarks/test_impls.py}"
mkdir -p "$OUT_DIR"
status=0
start=$SECONDS
log() { echo "[gpu_check +$((SECONDS - start))s] $*"; }

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# 1. Packages. Helpers resolve their dependencies inside the wheel folder only; peers never pull torch.
if [[ -n "$WHEELS" && -d "$WHEELS" ]]; then
    for spec in pytest:pytest pytest_benchmark:pytest-benchmark matplotlib:matplotlib; do
        has_module "${spec%%:*}" || "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${spec##*:}" \
            || log "warning: could not install ${spec##*:} from $WHEELS"
    done
    for spec in liger_kernel:liger-kernel cut_cross_entropy:cut-cross-entropy; do
        has_module "${spec%%:*}" || "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "${spec##*:}" \
            || log "warning: could not install ${spec##*:}; its benchmarks will be skipped"
    done
else
    log "ARE_FAST_WHEELS not set: using what is installed (peers missing are skipped)"
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1; then
    # Offline without a wheel-capable setuptools: run from the tree, with kernels/ linked where setup.py
    # installs it (are_fast.kernels); the link is removed on exit.
    ln -s ../kernels are_fast/kernels
    trap 'rm -f are_fast/kernels' EXIT
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "editable install failed offline (see install.log); running from the tree (PYTHONPATH)"
fi
"$PY" - <<'EOF' | tee "$OUT_DIR/environment.txt"
import importlib.metadata as md, torch, are_fast, are_fast.kernels
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "pytest-benchmark", "liger-kernel", "cut-cross-entropy", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
print("are_fast backends", are_fast.BACKENDS)
EOF
has_module pytest_benchmark || { log "pytest-benchmark is missing: put its wheel in ARE_FAST_WHEELS"; exit 2; }

# 2. Correctness of the Triton kernels (and of how the peers are called), on the GPU.
log "tests: $TESTS"
# shellcheck disable=SC2086  # TESTS is a list of paths
timeout -k 10 "${ARE_FAST_GPU_TEST_S:-150}" "$PY" -m pytest -p no:cacheprovider $TESTS 2>&1 | tee "$OUT_DIR/tests.log" \
    || { status=1; log "tests failed or timed out"; }

# 3. Benchmarks. SIGINT on timeout lets pytest-benchmark still write the JSON of what ran.
bench() {
    local name=$1 limit=$2 filter=$3
    log "benchmarks ($name, at most ${limit}s)"
    timeout -s INT -k 30 "$limit" "$PY" -m pytest benchmarks/test_bench_ops.py -p no:cacheprovider -k "$filter" \
        --benchmark-json="$OUT_DIR/bench-$name.json" 2>&1 | tee "$OUT_DIR/bench-$name.log" \
        || { status=1; log "benchmarks ($name) failed or timed out"; }
}
export ARE_FAST_BENCH_DEVICE="${ARE_FAST_BENCH_DEVICE:-cuda}"
bench target "${ARE_FAST_GPU_TARGET_S:-200}" "llama3-8b-N16384"
bench other "${ARE_FAST_GPU_OTHER_S:-120}" "not llama3-8b-N16384"

# 4. Report.
shopt -s nullglob
results=("$OUT_DIR"/bench-*.json)
if ((${#results[@]})); then
    png=()
    has_module matplotlib && png=(--png "$OUT_DIR/bench-gpu.png")
    "$PY" -m benchmarks.report "${results[@]}" --out "$OUT_DIR/RESULTS-gpu.md" "${png[@]}"
    cat "$OUT_DIR/RESULTS-gpu.md"
else
    status=1
    log "no benchmark JSON was written"
fi
log "done, status $status, outputs in $OUT_DIR"
exit "$status"
