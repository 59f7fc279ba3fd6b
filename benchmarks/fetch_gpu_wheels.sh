#!/usr/bin/env bash
# Download, on a machine with internet, the wheels benchmarks/gpu_check.sh needs on the offline GPU machine
# (CPython 3.12, manylinux x86-64; its image already has torch, triton, pytest, pytest-benchmark, matplotlib):
# the peers Liger-Kernel and Cut Cross-Entropy, without dependencies (they need only torch and triton).
# Usage: bash benchmarks/fetch_gpu_wheels.sh [folder]   (default .whl/, ignored by git; never committed)
# Versions: ARE_FAST_LIGER_VERSION, ARE_FAST_CCE_VERSION (default: the ones this checkout's benchmarks use).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    "liger-kernel==${ARE_FAST_LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${ARE_FAST_CCE_VERSION:-25.1.1}"
ls -l "$dest"
du -sh "$dest"
