"""One forward+backward of an op under torch.profiler: the per-kernel table, to read a GPU run kernel by kernel
against ``benchmarks.gpu_model``.

    python -m benchmarks.gpu_profile [--op token_logprobs] [--shape llama3-8b-N16384-bf16-frozen]
                                     [--backend triton] [--out profile.txt]

Inputs as the op benchmarks make them (``benchmarks.cases``, on ARE_FAST_BENCH_DEVICE); one warm-up call
(compiles and autotunes), then one profiled call. On CUDA the table lists every kernel by its own GPU time;
on CPU (the GPU check's dry run: a tiny shape, Triton's interpreter) it lists CPU time, which says nothing
about the kernels but keeps the script working.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import bench_device, clear_grads, make_inputs, op_cases, smoke_mode
from .impls import implementations, loss_fn


def profile_table(op: str, shape: str, backend: str, rows: int = 25) -> str:
    """The profiler's table of one call of ``op`` at ``shape`` (a benchmark shape id) under ``backend``."""
    device = bench_device()
    cases = {case.id: case for case in op_cases(device, smoke_mode())}
    case = cases.get(f"{op}-{shape}")
    if case is None:
        raise SystemExit(f"--op/--shape: no benchmark case {op}-{shape} on {device.type}; "
                         f"cases: {', '.join(sorted(cases))}")
    impl = next((i for i in implementations() if i.name == backend), None)
    if impl is None:
        raise SystemExit(f"--backend: expected one of {', '.join(i.name for i in implementations())}, got {backend!r}")
    inputs = make_inputs(case, device)
    loss = loss_fn(impl, op, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss(inputs).backward()  # warm-up: compiles
    clear_grads(inputs)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        loss(inputs).backward()
        sync()
    events = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    total_us = sum(getattr(e, sort_by) for e in events)
    chunk = os.environ.get("ARE_FAST_CHUNK_BYTES", "default")
    title = (f"{op} at {shape}, backend {backend}, {device.type}, ARE_FAST_CHUNK_BYTES={chunk}: "
             f"{total_us / 1e3:.2f} ms of {'GPU kernel' if cuda else 'CPU'} time in all")
    return title + "\n" + events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", default="token_logprobs")
    parser.add_argument("--shape", default="llama3-8b-N16384-bf16-frozen", help="a benchmark shape id")
    parser.add_argument("--backend", default="triton", help="an implementation of benchmarks.impls")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    text = profile_table(args.op, args.shape, args.backend)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
