#!/usr/bin/env bash
# Step 1 of a GPU check (README, "The GPU check"), here, where PyPI is reachable: download the wheels that
# benchmarks/gpu_check.sh installs on the offline GPU machine (CPython 3.12, manylinux x86-64; its image has
# torch 2.11, triton 3.6, pytest, pytest-benchmark and matplotlib): the peers Liger-Kernel and Cut Cross-Entropy,
# and pytest-timeout (the image lists it too; carried so that the per-test timeouts never depend on that), all
# pure-Python wheels without their dependencies (the peers need only torch and triton). About 1 MB, far under
# the 64 MiB the device tool carries. Then `bash benchmarks/gpu_check.sh --preflight` checks them.
# Usage: bash benchmarks/fetch_gpu_wheels.sh [folder]   (default .whl/, ignored by git; never committed)
# Versions: ARE_FAST_LIGER_VERSION, ARE_FAST_CCE_VERSION, ARE_FAST_PYTEST_TIMEOUT_VERSION (defaults: the ones
# the benchmarks were written against). An older version of a package in the folder is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
rm -f "$dest"/liger_kernel-*.whl "$dest"/cut_cross_entropy-*.whl "$dest"/pytest_timeout-*.whl  # one version each
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    "liger-kernel==${ARE_FAST_LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${ARE_FAST_CCE_VERSION:-25.1.1}" \
    "pytest-timeout==${ARE_FAST_PYTEST_TIMEOUT_VERSION:-2.4.0}"
ls -l "$dest"
du -sh "$dest"
