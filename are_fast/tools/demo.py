"""The ops demo: each fused op on random data, time and peak extra memory against the reference backend.

Shapes default to a small LM head that runs in seconds on 2 CPU cores. Forward+backward, frozen head. It prints
one table (a line per op) under a legend of its columns, and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time

import torch

from ..ops import functional as F
from ..ops.backends import resolve_backend
from ..ops.registry import OPS_TABLE
from .memory import peak_extra_memory


def _cases(hidden_size: int, vocab: int, batch: int, length: int, negatives: int, device, dtype):
    """Closures (name, fn(backend) -> loss) over random inputs shared by every backend."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    weight = rand(vocab, hidden_size) * hidden_size**-0.5
    labels = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    streams = [rand(batch, length, hidden_size).requires_grad_() for _ in range(2 + negatives)]
    neg_labels = torch.randint(0, vocab, (batch * negatives, length), generator=gen).to(device)
    ref_p, ref_n = rand(batch), rand(batch, negatives)

    def alignment(backend):
        q_pos, pos_pos, *negs = streams
        lp_qp = F.sequence_logprobs(q_pos, weight, labels, backend=backend)
        lp_pp = F.sequence_logprobs(pos_pos, weight, labels, backend=backend)
        lp_qn = F.sequence_logprobs(torch.cat(negs), weight, neg_labels, backend=backend).view(negatives, batch).T
        return F.alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n)

    def op_case(op):  # every op of the registry on the first stream (pair ops: the first two) and the labels
        fn, inputs = getattr(F, op.name), streams[:2] if op.inputs == "pair" else streams[:1]
        return lambda b: fn(*inputs, weight, labels, backend=b).sum()

    return [(op.name, op_case(op)) for op in OPS_TABLE.values()] + [("alignment_loss", alignment)], streams


# What PyTorch's CPU profiler (used to measure memory) writes straight to file descriptor 2 on every
# measurement: kineto's start/stop lines and c10's note on memory allocated before profiling. No setting turns
# them off (TORCH_CPP_LOG_LEVEL and KINETO_LOG_LEVEL leave them), so they are filtered out.
_PROFILER_CHATTER = re.compile(r"SyncActivityProfilerHandler|allocated before the profiling started")


@contextlib.contextmanager
def profiler_chatter_filtered():
    """Send file descriptor 2 to a temporary file meanwhile, then pass on every line that is not profiler chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _PROFILER_CHATTER.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


OP_WIDTH, NUMBER_WIDTH = 18, 9  # fixed, so each op's line prints as soon as it is measured


def table_header(fused: str) -> list[str]:
    """The table's two header lines: each backend centred over its two columns, then the column names."""
    span = 2 * NUMBER_WIDTH + 1
    top = " ".join(["".ljust(OP_WIDTH), f" {'reference'} ".center(span, "-"), f" {fused} ".center(span, "-")])
    return [top, _line(["op", "ms", "MiB", "ms", "MiB", "speed-up", "memory"])]


def table_row(row: dict) -> str:
    """One op's line from its measurements (run_demo's row dict)."""
    return _line([row["op"], f"{row['reference_s'] * 1e3:.1f}", f"{row['reference_bytes'] / 2**20:.1f}",
                  f"{row['fused_s'] * 1e3:.1f}", f"{row['fused_bytes'] / 2**20:.1f}",
                  f"{row['reference_s'] / row['fused_s']:.2f}x",
                  f"{row['fused_bytes'] / max(row['reference_bytes'], 1):.1%}"])


def _line(cells: list[str]) -> str:
    first, *rest = cells
    return " ".join([first.ljust(OP_WIDTH)] + [c.rjust(NUMBER_WIDTH) for c in rest]).rstrip()


def run_demo(
    hidden_size=512, vocab=32000, batch=4, length=256, negatives=2, device=None, dtype="float32", repeats=2,
    backend=None,
) -> list[dict]:
    """Print and return, per op, the best-of-``repeats`` time and the peak extra memory of the fused ``backend``
    (default: the device's) vs the reference. ValueError when that backend cannot run here (it says why)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype)
    fused = resolve_backend(backend, device)
    cases, streams = _cases(hidden_size, vocab, batch, length, negatives, device, dtype)
    print(f"are_fast demo: H={hidden_size} V={vocab}, {batch * length} tokens per stream, "
          f"{str(dtype).removeprefix('torch.')} on {device}; forward+backward, frozen head")
    print(f"columns: ms = best of {repeats} runs, MiB = peak extra memory of one run, for the reference (plain "
          f"formulas, full N x V logits) and {fused} (the fused backend here); speed-up = reference ms / {fused} ms; "
          f"memory = {fused} MiB / reference MiB")
    print("\n".join(table_header(fused)), flush=True)
    rows = []
    for name, loss_fn in cases:
        stats = {}
        for backend in ("reference", fused):
            def step():
                for s in streams:
                    s.grad = None
                loss_fn(backend).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            with profiler_chatter_filtered():
                _, peak = peak_extra_memory(step, device)
            stats[backend] = (min(times), peak)
        (t_ref, m_ref), (t_fused, m_fused) = stats["reference"], stats[fused]
        rows.append(dict(op=name, reference_s=t_ref, fused_s=t_fused, reference_bytes=m_ref, fused_bytes=m_fused))
        print(table_row(rows[-1]), flush=True)
    return rows
