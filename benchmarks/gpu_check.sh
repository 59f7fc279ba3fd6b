#!/usr/bin/env bash
# GPU check for a fresh, offline CUDA machine, in at most 6 minutes wall: each step runs under its own budget
# (seconds; the kill grace after it included, the budgets sum to at most 360, else the script refuses to start)
# and ends with one line: ok, FAILED or OUT OF BUDGET (then what it kept).
#   wheels       the peers' wheels from .whl/ (ARE_FAST_WHEELS; made by benchmarks/fetch_gpu_wheels.sh) into a
#                private folder, never touching torch or triton; says at once which are missing
#   environment  GPU, driver, torch / triton / peer versions, which nvcc and its version, CUDA_HOME, and what the
#                native build will compile (python -m are_fast.ops.native --plan)
#   native       the native CUDA build (python -m are_fast.ops.native --check), timed on its own
#   tests        only what needs a GPU to mean anything, the peers' wiring first (benchmarks/test_impls.py), then
#                the Triton epilogues (the in-place and gradient-output race cases), the CUDA epilogues, the
#                device-generic op tests with --device cuda; pytest-timeout per test, --durations=15
#   target       llama3-8b head (H=4096, V=128256), N=16384, bf16, frozen, token_logprobs: floor, triton, native,
#                reference, torch-chunked (where torch has it), Liger, CCE (default and exact)
#   target-1gib  triton and native again with ARE_FAST_CHUNK_BYTES=1 GiB (2080-row chunks instead of 512)
#   profile      torch.profiler's per-kernel table of one triton call at the target (benchmarks/gpu_profile.py)
#   other        a trainable head, the KL, compression_loss, a 32k and a 152k vocabulary (N=16384; triton,
#                Liger, CCE, floor; 5 rounds; no reference, to fit)
#   report       RESULTS-gpu.md: model (by GPU name), measured floor and measurement side by side; bench-gpu.png
# Outputs in $OUT (else a temporary folder), at most 7 files: gpu_check.log (everything printed),
# bench-target.json, bench-target-1gib.json, bench-other.json, profile-triton.txt, RESULTS-gpu.md, bench-gpu.png.
#
# Usage on the GPU machine:  OUT=/path bash benchmarks/gpu_check.sh   (README, "The GPU check": the run call)
# Here, before spending device time:  bash benchmarks/gpu_check.sh --preflight   (wheels, budgets, carry size)
# CPU dry run (what CI runs: the same steps and budgets on tiny shapes, Triton's interpreter):
#   ARE_FAST_GPU_DRY_RUN=1 bash benchmarks/gpu_check.sh
# A step's budget may be changed with ARE_FAST_GPU_<STEP>_S (STEP in capitals, - as _); the sum still holds.
# Exit status: 0 every step finished and passed; 1 a check failed (whatever else happened); 3 no check failed
# but a step ran out of its budget; 2 the script could not start (budgets over 6 minutes, pytest-benchmark
# missing).
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${ARE_FAST_WHEELS:-.whl}"
WALL_LIMIT=360
GRACE=3  # seconds between a step's interrupt (SIGINT: pytest still writes what ran) and its kill
STEPS=(wheels environment native tests target target-1gib profile other report)
declare -A BUDGET=([wheels]=8 [environment]=20 [native]=60 [tests]=65 [target]=60 [target-1gib]=25 [profile]=25
                   [other]=50 [report]=9)
export REQUIRED_WHEELS="liger_kernel cut_cross_entropy pytest_timeout"  # what fetch_gpu_wheels.sh downloads
CARRY_LIMIT=$((64 << 20))  # what the device tool carries in all (working tree included)

for step in "${STEPS[@]}"; do
    override="ARE_FAST_GPU_$(tr 'a-z-' 'A-Z_' <<<"$step")_S"
    BUDGET[$step]=${!override:-${BUDGET[$step]}}
done

say() { echo "[gpu_check +$((SECONDS - start))s] $*"; }

# The budgets, and their sum with the kill graces against the wall limit; returns 1 when over.
check_budgets() {
    local total=0 step
    for step in "${STEPS[@]}"; do
        printf '[gpu_check] budget %-12s %4ss (+%ss kill grace)\n' "$step" "${BUDGET[$step]}" "$GRACE"
        total=$((total + BUDGET[$step] + GRACE))
    done
    echo "[gpu_check] budgets with kill graces: ${total}s of at most ${WALL_LIMIT}s"
    ((total <= WALL_LIMIT)) || { echo "[gpu_check] the budgets exceed ${WALL_LIMIT}s: rebalance them"; return 1; }
}

# The wheels in $WHEELS: one line each, then what is missing or doubled; returns 1 when incomplete.
check_wheels() {
    local name found ok=0
    shopt -s nullglob
    for name in $REQUIRED_WHEELS; do
        found=("$WHEELS"/"$name"-*.whl)
        if ((${#found[@]} == 0)); then
            echo "[gpu_check] wheel missing: $name in $WHEELS/ (bash benchmarks/fetch_gpu_wheels.sh makes it)"; ok=1
        elif ((${#found[@]} > 1)); then
            echo "[gpu_check] wheel doubled: ${found[*]} (keep one version: two stop the install)"; ok=1
        else
            echo "[gpu_check] wheel: ${found[0]##*/}"
        fi
    done
    return $ok
}

if [[ "${1:-}" == --preflight ]]; then  # here, before the run call: no device time spent
    start=$SECONDS
    status=0
    check_budgets || status=1
    check_wheels || status=1
    size=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    wheels_size=$(du -cb "$WHEELS" 2>/dev/null | tail -1 | cut -f1)
    echo "[gpu_check] carried: tracked files $((size >> 10)) KiB + $WHEELS $((wheels_size >> 10)) KiB of $((CARRY_LIMIT >> 20)) MiB"
    ((size + wheels_size <= CARRY_LIMIT)) || { echo "[gpu_check] over the carry limit"; status=1; }
    # The device gets no .git: the commit under test travels with the wheels, and the log names it.
    mkdir -p "$WHEELS"
    echo "$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- . ':!.whl' || echo ' (dirty)')" >"$WHEELS/commit.txt"
    echo "[gpu_check] commit: $(cat "$WHEELS/commit.txt") (in $WHEELS/commit.txt)"
    exit $status
fi

DRY=0
[[ "${ARE_FAST_GPU_DRY_RUN:-0}" == 1 ]] && DRY=1
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
STEP_LOGS="$(mktemp -d)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
start=$SECONDS

# What each step runs, on the GPU and in the dry run (the same steps on tiny shapes, short of what needs a GPU).
if ((DRY)); then
    DEVICE=cpu
    TARGET=tiny-N128-fp32-frozen
    FUSED="chunked or native"  # the Triton kernels run only interpreted on CPU: the benchmarks skip them
    OTHER_IMPLS="chunked or floor or liger or cce"
    TESTS=(benchmarks/test_impls.py tests/ops/test_kernel_memory_order.py tests/ops/test_kernels.py)
    TEST_FILTER="torch-chunked and token_logprobs or memory_order or in_place or minus_inf"
    OTHER_SHAPES=(token_logprobs-tiny-N128-fp32-trainable conditional_kl-tiny-N128-fp32-frozen
                  compression_loss-tiny-N128-fp32-frozen floor-tiny-N128-fp32-trainable)
    export TRITON_INTERPRET=1 ARE_FAST_BENCH_SMOKE=1 OMP_NUM_THREADS=1
else
    DEVICE=cuda
    TARGET=llama3-8b-N16384-bf16-frozen
    FUSED="triton or native"
    OTHER_IMPLS="triton or floor or liger or cce"
    TESTS=(benchmarks/test_impls.py tests/ops/test_kernels.py tests/ops/test_head_matmuls.py tests/ops/test_native.py
           tests/ops/test_functional.py tests/ops/test_autograd.py)
    # test_native: only its CUDA epilogue cases and the native ops on the device (its builds prove nothing more
    # on a GPU); test_functional: the triton and native backends (online and chunked run the device-generic
    # PyTorch epilogues, checked on CPU), not its torch.compile case (an inductor compile).
    TEST_FILTER="(not test_native.py or ((cuda or native_ops) and not sources_compile)) and not inside_torch_compile"
    TEST_FILTER+=" and not (test_functional.py and (online or chunked))"
    OTHER_SHAPES=(token_logprobs-llama3-8b-N16384-bf16-trainable conditional_kl-llama3-8b-N16384-bf16-frozen
                  compression_loss-llama3-8b-N16384-bf16-frozen token_logprobs-llama2-7b-N16384-bf16-frozen
                  token_logprobs-qwen2.5-7b-N16384-bf16-frozen floor-llama3-8b-N16384-bf16-trainable
                  floor-llama2-7b-N16384-bf16-frozen floor-qwen2.5-7b-N16384-bf16-frozen)
fi
export ARE_FAST_BENCH_DEVICE="$DEVICE" PYTHONUNBUFFERED=1
# torch guesses CUDA_HOME from nvcc's path: with nvcc linked into /usr/local/bin that is /usr/local, which has no
# libcudart, and the native CUDA epilogues fail to link (seen on a CPU machine of this workplace). Name the toolkit.
if [[ -z "${CUDA_HOME:-}" && -e /usr/local/cuda/lib64/libcudart.so ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say "GPU check ($([[ $DRY == 1 ]] && echo "CPU dry run" || echo "$DEVICE")), outputs in $OUT_DIR"
check_budgets || exit 2
"$PY" -c "import pytest_benchmark" 2>/dev/null || { say "pytest-benchmark is missing: carry its wheel"; exit 2; }

status=0
declare -A USED RESULT
summary_of_pytest() {  # pytest's last summary line (it prints one when interrupted too)
    local line
    line=$(grep -E '([0-9]+ (passed|failed|skipped|deselected|errors?))|no tests ran' "$1" | tail -1 | tr -s '= ' ' ')
    echo "${line:-no result: stopped before pytest reported one}"
}
count_results() { "$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['benchmarks']))" "$1" 2>/dev/null || echo 0; }

# run_step NAME SUMMARY COMMAND...: COMMAND under NAME's budget (SIGINT, then SIGKILL after the grace), its
# output in the log; then one line from SUMMARY (a function given the step's output file and exit status).
run_step() {
    local name=$1 summary=$2 began=$SECONDS rc verdict
    shift 2
    say "step $name: budget ${BUDGET[$name]}s"
    timeout -s INT -k "$GRACE" "${BUDGET[$name]}" "$@" 2>&1 | tee "$STEP_LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    USED[$name]=$((SECONDS - began))
    RESULT[$name]="$($summary "$STEP_LOGS/$name.log" "$rc")"
    if ((rc == 124 || rc == 137)); then
        verdict="OUT OF BUDGET, kept: ${RESULT[$name]}"
        ((status == 1)) || status=3
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc): ${RESULT[$name]}"
        status=1
    else
        verdict="ok: ${RESULT[$name]}"
    fi
    RESULT[$name]=$verdict
    say "step $name: $verdict (${USED[$name]}s of ${BUDGET[$name]}s)"
    return "$rc"
}

# wheels: missing ones are said at once (peers missing are skipped); the rest go into a private folder.
site="$(mktemp -d)"
install_wheels() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    check_wheels || true
    ((${#wheels[@]})) || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
}
wheels_summary() {
    local missing
    missing=$(grep -c 'wheel missing' "$1")
    if ((missing)); then
        echo "$missing of $(wc -w <<<"$REQUIRED_WHEELS") wheels missing: those peers (or per-test timeouts) are skipped"
    else
        echo "$(wc -w <<<"$REQUIRED_WHEELS") wheels installed"
    fi
}
export -f check_wheels install_wheels
export WHEELS site PY
run_step wheels wheels_summary bash -c install_wheels && export PYTHONPATH="$PYTHONPATH:$site"
# The private folder goes after the tree, so are_fast is the checkout's; peers and pytest-timeout come from it.
TIMEOUT_OPTION=(--timeout 30)
if ! "$PY" -c "import pytest_timeout" 2>/dev/null; then
    say "pytest-timeout is missing: tests run without per-test timeouts"
    TIMEOUT_OPTION=()
fi

environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv,noheader || echo "nvidia-smi: not found"
    echo "which nvcc: $(command -v nvcc || echo 'not found')"
    command -v nvcc >/dev/null && nvcc --version | tail -2
    echo "CUDA_HOME: ${CUDA_HOME:-unset}"
    echo "commit: $(cat "$WHEELS/commit.txt" 2>/dev/null || echo 'unknown (gpu_check.sh --preflight records it)')"
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})", end="")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"; GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB", end="")
print()
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
names = ("triton", "pytest", "pytest-benchmark", "pytest-timeout", "liger-kernel", "cut-cross-entropy", "matplotlib")
print(", ".join(f"{name} {version(name)}" for name in names))
from are_fast.ops.head_matmuls import fp32_out_support
if torch.cuda.is_available():
    print("float32-output bf16 matmuls:", fp32_out_support(torch.device("cuda"), torch.bfloat16))
from are_fast.ops import native
native.print_plan()  # what the native step will build (python -m are_fast.ops.native --plan)
EOF
}
environment_summary() {
    local gpu torch_line
    gpu=$(grep -m1 -E '^(NVIDIA|nvidia-smi: not found)' "$1" | cut -d, -f1-2)
    torch_line=$(grep -m1 '^torch ' "$1" | cut -d';' -f1)
    echo "${gpu:-no GPU}; $torch_line; nvcc $(grep -m1 -oE 'release [0-9.]+' "$1" | cut -d' ' -f2 || true)"
}
export -f environment
run_step environment environment_summary bash -c environment

native_summary() { grep -E 'CUDA kernels|NOT available|library:' "$1" | sed 's/^ *//' | paste -sd';' -; }
NATIVE_OK=1
run_step native native_summary "$PY" -m are_fast.ops.native --check || NATIVE_OK=0
if ! ((NATIVE_OK)); then  # the later steps would try the build again inside their own budgets
    TEST_FILTER="($TEST_FILTER) and not native"
    FUSED="${FUSED/ or native/}"
    say "native build unavailable: its tests and benchmark rows are left out"
fi

run_step tests summary_of_pytest "$PY" -m pytest -p no:cacheprovider "${TESTS[@]}" --device "$DEVICE" \
    -k "$TEST_FILTER" "${TIMEOUT_OPTION[@]}" --durations=15

bench_summary() {
    echo "$(count_results "$OUT_DIR/bench-$BENCH_NAME.json") benchmark results in bench-$BENCH_NAME.json;" \
        "$(summary_of_pytest "$1")"
}
bench() {  # bench NAME FILTER [VAR=VALUE...]: benchmarks/test_bench_ops.py cases matching FILTER
    local name=$1 filter=$2
    shift 2
    BENCH_NAME=$name
    run_step "$name" bench_summary env "$@" "$PY" -m pytest -p no:cacheprovider benchmarks/test_bench_ops.py \
        -k "$filter" --benchmark-json="$OUT_DIR/bench-$name.json"
}
target_impls="$FUSED or reference or torch-chunked or liger or cce"
bench target "floor-$TARGET or (token_logprobs-$TARGET and ($target_impls)) and not cce-compile"
bench target-1gib "token_logprobs-$TARGET and ($FUSED) and not torch-chunked" ARE_FAST_CHUNK_BYTES=$((1 << 30))

profile_summary() { grep -m1 ' in all$' "$1" || tail -1 "$1"; }
run_step profile profile_summary "$PY" -m benchmarks.gpu_profile --op token_logprobs --shape "$TARGET" \
    --backend triton --out "$OUT_DIR/profile-triton.txt"

other_filter="($(printf ' or %s' "${OTHER_SHAPES[@]}" | cut -c5-)) and ($OTHER_IMPLS)"
bench other "$other_filter and not cce-exact and not cce-compile and not torch-chunked" \
    ARE_FAST_BENCH_ROUNDS="${ARE_FAST_BENCH_ROUNDS:-5}"

report() {
    shopt -s nullglob
    local results=("$OUT_DIR"/bench-*.json) png=()
    ((${#results[@]})) || { echo "no benchmark JSON was written"; return 1; }
    "$PY" -c "import matplotlib" 2>/dev/null && png=(--png "$OUT_DIR/bench-gpu.png")
    "$PY" -m benchmarks.report "${results[@]}" --out "$OUT_DIR/RESULTS-gpu.md" "${png[@]}" && cat "$OUT_DIR/RESULTS-gpu.md"
}
report_summary() {
    [[ -s "$OUT_DIR/RESULTS-gpu.md" ]] || { echo "no report"; return; }
    echo "RESULTS-gpu.md, $(grep -c '^| ' "$OUT_DIR/RESULTS-gpu.md") table lines"
}
export -f report
export OUT_DIR
run_step report report_summary bash -c report

echo
say "steps (budget / used / result):"
for step in "${STEPS[@]}"; do
    printf '  %-12s %4ss %4ss  %s\n' "$step" "${BUDGET[$step]}" "${USED[$step]:-0}" "${RESULT[$step]:-not run}"
done
say "done in $((SECONDS - start))s (limit ${WALL_LIMIT}s): exit status $status; outputs in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$status"
