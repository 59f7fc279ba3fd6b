"""Peak extra RSS (what `top` shows, BLAS packing buffers and allocator slack included) of one benchmark case,
measured in a fresh process so that no other case's memory or allocator state leaks into it.

    python -m benchmarks.rss '{"op": "token_logprobs", "head": "issue2", "tokens": 4096, ...}' torch-chunked

The child builds the case's inputs, runs one small matmul (MKL and the thread pool start up there, the same
for every implementation), resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), runs
forward+backward once and reports VmHWM less the RSS before the call (and that call's time); then it times
``rounds`` more calls ("median"; with rounds=0 the first call's time). Linux only (``/proc``); CPU only (CUDA memory is the allocator figure of ``benchmarks.conftest``).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from are_fast.ops import sweep_precision

from .cases import HEADS, Case, Shape, clear_grads, make_inputs
from .impls import implementations, loss_fn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def case_spec(case: Case) -> dict:
    s = case.shape
    return {"op": case.op, "head": s.head.name, "tokens": s.tokens, "dtype": str(s.dtype).replace("torch.", ""),
            "trainable": s.trainable, "seq_len": s.seq_len}


def _case(spec: dict) -> Case:
    shape = Shape(HEADS[spec["head"]], spec["tokens"], _DTYPES[spec["dtype"]], spec["trainable"], spec["seq_len"])
    return Case(spec["op"], shape)


def supported() -> bool:
    """Whether this machine can reset the RSS high-water mark (Linux >= 4.0)."""
    return os.path.exists("/proc/self/clear_refs")


def probe(case: Case, impl_name: str, rounds: int = 0, threads: int | None = None, timeout: float = 900) -> dict:
    """{"peak_rss_bytes": int, "seconds": [float] * rounds} of ``case`` under ``impl_name``, in a fresh process."""
    args = [sys.executable, "-m", "benchmarks.rss", json.dumps(case_spec(case)), impl_name, str(rounds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or torch.get_num_threads()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rss probe of {case.id} / {impl_name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run(spec: dict, impl_name: str, rounds: int) -> dict:
    case, device = _case(spec), torch.device("cpu")
    impl = next(i for i in implementations() if i.name == impl_name)
    x = make_inputs(case, device)
    loss = loss_fn(impl, case.op, device)
    torch.mm(x.weight.detach()[:64], x.weight.detach()[:64].T)  # BLAS and thread start-up, outside the figure
    if x.weight.dtype in sweep_precision.LOW_PRECISION:  # the once-per-process dispatch measurement, likewise
        sweep_precision.choose(device, x.weight.dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss(x).backward()
    first = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) << 10
    seconds = []
    for _ in range(rounds):
        clear_grads(x)
        start = time.perf_counter()
        loss(x).backward()
        seconds.append(time.perf_counter() - start)
    return {"peak_rss_bytes": peak, "first_seconds": first, "seconds": seconds,
            "median": statistics.median(seconds) if seconds else first}


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)))
