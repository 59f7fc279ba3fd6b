"""Forward+backward of every loss op, per shape, for each are_fast backend and each installed peer, and the
bare-matmul floor of each shape.

Ids read like ``token_logprobs-llama3-8b-N16384-bf16-frozen-chunked`` (and ``floor-llama3-8b-N16384-bf16-frozen``);
each (op, shape) is one pytest-benchmark group, so its implementations print side by side. Shapes and
inputs: benchmarks/cases.py; implementations: benchmarks/impls.py. ``python -m benchmarks.report`` turns
--benchmark-json output into the Markdown table and chart.
"""
from __future__ import annotations

import os

import pytest
import torch

from are_fast.ops.chunked import chunk_rows_for

from . import rss
from .cases import Case, bench_device, clear_grads, floor_shapes, make_inputs, op_cases, smoke_mode
from .impls import floor_fn, implementations, loss_fn


def pytest_generate_tests(metafunc):
    device = bench_device()
    cases = op_cases(device, smoke_mode())
    params = []
    for shape in floor_shapes(cases):  # each shape's floor right before its cases, under the same machine load
        params.append(pytest.param(Case("floor", shape), None, id=f"floor-{shape.id}"))
        params += [
            pytest.param(case, impl, id=f"{case.id}-{impl.name}")
            for case in cases
            if case.shape == shape
            for impl in implementations()
            if case.op in impl.ops and device.type in impl.devices
        ]
    metafunc.parametrize(("case", "impl"), params)


def _shape_info(shape, device) -> dict:
    """What the report needs of a case's shape, and the chunking the fused backends use there (ARE_FAST_CHUNK_BYTES,
    when set, is recorded too: the report lists such rows apart)."""
    chunking = {"chunk_rows": chunk_rows_for(shape.tokens, shape.head.vocab, 1, device)}
    if os.environ.get("ARE_FAST_CHUNK_BYTES"):
        chunking["chunk_bytes"] = int(os.environ["ARE_FAST_CHUNK_BYTES"])
    return {
        "suite": "ops",
        "shape": shape.id,
        "head": shape.head.name,
        "hidden": shape.head.hidden,
        "vocab": shape.head.vocab,
        "tokens": shape.tokens,
        "dtype": str(shape.dtype).replace("torch.", ""),
        "mode": shape.mode,
        **chunking,
    }


def test_op(case, impl, measure):
    """Time loss.backward() of ``case.op`` under ``impl`` (forward included), and its peak extra memory;
    ``impl`` None: the bare matmuls of the shape (see benchmarks.impls.floor_fn), the time nobody can beat."""
    device = bench_device()
    if impl is None:
        _floor(case.shape, device, measure)
        return
    reason = impl.skip_reason(device)
    if reason:
        pytest.skip(reason)
    x = make_inputs(case, device)
    loss = loss_fn(impl, case.op, device)
    extra = {}
    # Off by default in smoke mode (a process per case); benchmarks/test_rss.py checks the probe itself.
    if device.type == "cpu" and rss.supported() and os.environ.get("ARE_FAST_BENCH_RSS", "0" if smoke_mode() else "1") != "0":
        # What `top` shows (BLAS buffers, allocator slack), per case: one more call, in a fresh process.
        extra["peak_rss_bytes"] = rss.probe(case, impl.name)["peak_rss_bytes"]
    measure(
        lambda: loss(x).backward(),
        lambda: clear_grads(x),
        warmup=True if impl.jit else None,
        group=case.id,
        op=case.op,
        impl=impl.name,
        kind=impl.kind,
        note=impl.note(case.op, case.shape.trainable),
        **_shape_info(case.shape, device),
        **extra,
    )


def _floor(shape, device, measure):
    generator = torch.Generator(device=device).manual_seed(0)
    head = shape.head

    def randn(*dims):
        return torch.randn(*dims, generator=generator, device=device).to(shape.dtype)

    hidden, weight = randn(shape.tokens, head.hidden), randn(head.vocab, head.hidden)
    run = floor_fn(hidden, weight, randn(shape.tokens, head.vocab), shape.trainable)
    measure(run, group=f"floor-{shape.id}", op="floor", impl="floor", kind="floor", **_shape_info(shape, device))
