"""Shared fixtures of the benchmark suites: device, smoke mode, and ``measure`` (time + peak extra memory).

Environment:
- ARE_FAST_BENCH_DEVICE: "cpu" or "cuda" (default: CUDA when present);
- ARE_FAST_BENCH_SMOKE=1: tiny shapes, one round (what CI runs);
- ARE_FAST_BENCH_ROUNDS: timed rounds per case (default 3 on CPU, 10 on CUDA, 1 in smoke mode).

Every result carries the device, the dtype and the peak extra memory in ``extra_info``; torch / triton /
peer versions, the CPU model and core count go into pytest-benchmark's machine_info (the JSON header), and
the session ends with the Markdown table of ``benchmarks.report``.
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import time
from typing import Callable

import pytest
import torch

from are_fast.ops.sweep_precision import cpu_units
from are_fast.tools.memory import peak_extra_memory

from .cases import bench_device as _bench_device
from .cases import smoke_mode


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: torch.device) -> dict:
    """Versions and hardware of this run (machine_info["are_fast"] in the JSON)."""
    info = {
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_low_precision_units": cpu_units() if device.type == "cpu" else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "smoke": smoke_mode(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def cpu_matmul_rates(repeats: int = 5) -> dict:
    """GFLOP/s of one [512, 1024] x [1024, 1024] matmul in float32 and bfloat16 on this CPU (best of ``repeats``,
    about 0.05 s): recorded before and after each timed case, because on a shared host the matrix units can run
    at half rate for minutes (a neighbour on the same physical core), which moves bf16/float32 ratios by 30%."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    rates = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            torch.mm(x, y)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(x, y)
                best = min(best, time.perf_counter() - start)
            rates[str(dtype).removeprefix("torch.")] = round(2 * 512 * 1024 * 1024 / best / 1e9, 1)
    return rates


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["are_fast"] = environment_info(_bench_device())


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device of this run (ARE_FAST_BENCH_DEVICE, else CUDA when present, else CPU)."""
    return _bench_device()


@pytest.fixture(scope="session")
def smoke() -> bool:
    """True in smoke mode (ARE_FAST_BENCH_SMOKE=1): suites should use tiny shapes."""
    return smoke_mode()


def default_rounds(device: torch.device) -> int:
    if "ARE_FAST_BENCH_ROUNDS" in os.environ:
        return int(os.environ["ARE_FAST_BENCH_ROUNDS"])
    if smoke_mode():
        return 1
    return 10 if device.type == "cuda" else 3


@pytest.fixture
def measure(benchmark, bench_device):
    """measure(fn, setup=None, *, warmup=None, group=None, **extra_info) -> peak extra bytes.

    Runs ``setup()`` (untimed) before every call of ``fn()``; optionally one warm-up call (default: on CUDA,
    where kernels compile and autotune on first use); then one call under ``are_fast.tools.memory.peak_extra_memory``
    and the timed rounds with ``benchmark.pedantic``, synchronizing CUDA inside the timed function. Stores
    the peak in ``extra_info["peak_extra_bytes"]`` with the device and the caller's ``extra_info``. A CUDA
    out-of-memory error skips the case, saying so.
    """
    device = bench_device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], object], setup: Callable[[], object] | None = None, *, warmup=None, group=None, **extra):
        def timed():
            fn()
            sync()

        def prepare():
            if setup is not None:
                setup()
            sync()

        try:
            if device.type == "cuda" if warmup is None else warmup:
                prepare()
                timed()
            prepare()
            _, peak = peak_extra_memory(fn, device)
        except torch.OutOfMemoryError as err:
            gc.collect()
            torch.cuda.empty_cache()
            pytest.skip(f"out of device memory at this shape: {str(err).splitlines()[0]}")
        if group is not None:
            benchmark.group = group
        benchmark.extra_info.update(extra, device=str(device), peak_extra_bytes=peak)
        rates_before = cpu_matmul_rates() if device.type == "cpu" and not smoke_mode() else None
        benchmark.pedantic(timed, setup=prepare, rounds=default_rounds(device), warmup_rounds=0, iterations=1)
        if rates_before is not None:
            benchmark.extra_info["cpu_matmul_gflops"] = {"before": rates_before, "after": cpu_matmul_rates()}
        return peak

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's own table: the Markdown report of this session's op benchmarks."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    results = [bench.as_dict(include_data=False) for bench in session.benchmarks if not bench.has_error]
    if not any(r.get("extra_info", {}).get("suite") == "ops" for r in results):
        return
    from .report import markdown

    terminalreporter.write_sep("-", "are_fast benchmark report (python -m benchmarks.report JSON for files)")
    commit = config.hook.pytest_benchmark_generate_commit_info(config=config)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    terminalreporter.write_line(markdown(results, {"are_fast": environment_info(_bench_device())}, commit, when))
