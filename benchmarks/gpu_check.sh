#!/usr/bin/env bash
# GPU check for a fresh CUDA machine without internet, in under 8 minutes:
#   1. installs the peers' wheels (ARE_FAST_WHEELS, default .whl/ when it holds wheels; made with
#      benchmarks/fetch_gpu_wheels.sh) into a private folder, never touching torch or triton, and runs
#      are_fast from the tree (PYTHONPATH, with kernels/ linked where setup.py installs it; no pip install);
#   2. runs the device-generic op tests (tests/ops, on CUDA) and the peers' wiring check;
#   3. runs the GPU benchmarks: the target first (llama3-8b head, N=16384, bf16, frozen: triton, reference,
#      floor, Liger-Kernel, Cut Cross-Entropy, torch's own chunked op where torch has it), then the other shapes;
#   4. writes at most 6 files into $OUT (or a temporary folder): gpu_check.log (everything printed),
#      bench-target.json, bench-other.json, RESULTS-gpu.md (with the H200 model beside each time), bench-gpu.png.
# Usage on the GPU machine:  OUT=/path/to/out bash benchmarks/gpu_check.sh
# CPU dry run (what CI runs, < 60 s): ARE_FAST_GPU_DRY_RUN=1 bash benchmarks/gpu_check.sh
# Time limits (seconds): ARE_FAST_GPU_TEST_S (150), ARE_FAST_GPU_TARGET_S (180), ARE_FAST_GPU_OTHER_S (120).
# Exit status: non-zero when a test failed or a step did not finish in its time.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$(mktemp -d)}"
WHEELS="${ARE_FAST_WHEELS:-.whl}"
DEVICE=cuda
TARGET_FILTER="llama3-8b-N16384-bf16-frozen and not online"
TESTS="tests/ops benchmarks/test_impls.py"
TEST_SELECT=()
if [[ "${ARE_FAST_GPU_DRY_RUN:-0}" == 1 ]]; then
    # The same steps on CPU: Triton's interpreter, tiny shapes, a slice of the tests, short limits.
    DEVICE=cpu
    TARGET_FILTER="tiny-N128-fp32-frozen and (token_logprobs or floor) and not cce"
    TESTS="tests/ops/test_head_matmuls.py"
    TEST_SELECT=(-k "bad_modes or buffer")
    export TRITON_INTERPRET=1 ARE_FAST_BENCH_SMOKE=1 OMP_NUM_THREADS=1
    : "${ARE_FAST_GPU_TEST_S:=90}" "${ARE_FAST_GPU_TARGET_S:=60}" "${ARE_FAST_GPU_OTHER_S:=60}"  # a busy CI box
    OTHER_FILTER="tiny-N128-fp32-trainable and token_logprobs and not cce"
else
    # online: the CPU backend (bf16 heads take the chunk driver, as chunked does): not worth GPU time
    OTHER_FILTER="not llama3-8b-N16384-bf16-frozen and not online"
fi
export ARE_FAST_BENCH_DEVICE="$DEVICE" PYTHONUNBUFFERED=1
# torch guesses CUDA_HOME from nvcc's path: with nvcc linked into /usr/local/bin that is /usr/local, which has no
# libcudart, and the native CUDA epilogues fail to link (seen on a CPU machine of this workplace). Name the toolkit.
if [[ -z "${CUDA_HOME:-}" && -e /usr/local/cuda/lib64/libcudart.so ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
status=0
start=$SECONDS
log() { echo "[gpu_check +$((SECONDS - start))s] $*"; }

# 1. Packages: the peers' wheels into a private folder (their dependencies, torch and triton, are there).
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    site="$(mktemp -d)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
        && export PYTHONPATH="$site" || log "warning: the wheels in $WHEELS did not install; peers missing are skipped"
else
    log "no wheels in $WHEELS (bash benchmarks/fetch_gpu_wheels.sh makes them): peers missing are skipped"
fi
if ! "$PY" -c "import are_fast.kernels" 2>/dev/null; then
    ln -s ../kernels are_fast/kernels
    trap 'rm -f are_fast/kernels' EXIT
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import importlib.metadata as md, torch, are_fast, are_fast.kernels
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "pytest", "pytest-benchmark", "liger-kernel", "cut-cross-entropy", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
from are_fast.ops.head_matmuls import fp32_out_support
if torch.cuda.is_available():
    print("float32-output bf16 matmuls:", fp32_out_support(torch.device("cuda"), torch.bfloat16))
EOF
"$PY" -c "import pytest_benchmark" 2>/dev/null || { log "pytest-benchmark is missing: carry its wheel"; exit 2; }

# 2. Correctness on the device: the device-generic op tests (with --device where the suite has the option).
device_option=()
grep -qs -- '"--device"' tests/conftest.py tests/ops/conftest.py && device_option=(--device "$DEVICE")
log "tests: $TESTS ${device_option[*]} ${TEST_SELECT[*]}"
# shellcheck disable=SC2086  # TESTS is a list of paths
timeout -k 10 "${ARE_FAST_GPU_TEST_S:-150}" "$PY" -m pytest -q -p no:cacheprovider $TESTS "${device_option[@]}" \
    "${TEST_SELECT[@]}" || { status=1; log "tests failed or timed out"; }

# 3. Benchmarks. SIGINT on timeout lets pytest-benchmark still write the JSON of what ran.
bench() {
    local name=$1 limit=$2 filter=$3
    log "benchmarks ($name: $filter; at most ${limit}s)"
    timeout -s INT -k 30 "$limit" "$PY" -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider -k "$filter" \
        --benchmark-json="$OUT_DIR/bench-$name.json" || { status=1; log "benchmarks ($name) failed or timed out"; }
}
bench target "${ARE_FAST_GPU_TARGET_S:-180}" "$TARGET_FILTER"
bench other "${ARE_FAST_GPU_OTHER_S:-120}" "$OTHER_FILTER"

# 4. Report, with the H200 model's prediction beside each GPU time.
results=("$OUT_DIR"/bench-*.json)
if ((${#results[@]})); then
    png=()
    "$PY" -c "import matplotlib" 2>/dev/null && png=(--png "$OUT_DIR/bench-gpu.png")
    "$PY" -m benchmarks.report "${results[@]}" --out "$OUT_DIR/RESULTS-gpu.md" "${png[@]}" || status=1
    cat "$OUT_DIR/RESULTS-gpu.md"
else
    status=1
    log "no benchmark JSON was written"
fi
log "done, status $status, outputs in $OUT_DIR"
exit "$status"
