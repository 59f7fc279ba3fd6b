"""The benchmarked implementations compute the same number: each one's scalar (benchmarks.impls.loss_fn) on a
tiny shape against the reference formulas in float64.

A timing only means something if every row computes the same op; this catches a wrong shift, sign or
reduction in how a peer is called (are_fast's own backends are checked in tests/). Liger-Kernel needs a
GPU, or on CPU the Triton interpreter: ``TRITON_INTERPRET=1 pytest benchmarks/test_impls.py``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from .cases import HEADS, OPS, Case, Shape, bench_device, make_inputs
from .impls import implementations, loss_fn

_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _params():
    """Every peer on the benchmark dtypes of the device (CPU: float32 and bf16). On CPU in bf16 alignment_loss is
    left out: torch-chunked returns bf16 per-token losses, so its sequence sums carry bf16 rounding (~0.03 per
    token) that the alignment margin amplifies past 2e-2 (2.5% measured); its own ops are checked."""
    device = bench_device()
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    return [
        pytest.param(Case(op, Shape(HEADS["tiny"], 128, dtype, False, 16)), impl, id=f"{op}-{dtype}-{impl.name}")
        for dtype in dtypes
        for op in OPS
        if device.type == "cuda" or dtype == torch.float32 or op != "alignment_loss"
        for impl in implementations()
        if impl.kind == "peer" and op in impl.ops and device.type in impl.devices
    ]


def _skip_reason(impl, device):
    """As in the benchmarks, except that Liger may run on CPU in the Triton interpreter: slow, but exact."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if impl.name == "liger" and interpreted and importlib.util.find_spec("liger_kernel") is not None:
        return None
    reason = impl.skip_reason(device)
    return reason and reason + (" (TRITON_INTERPRET=1 runs the Liger check on CPU)" if impl.name == "liger" else "")


@pytest.mark.parametrize(("case", "impl"), _params())
def test_same_value_as_reference(case, impl):
    device = bench_device()
    reason = _skip_reason(impl, device)
    if reason:
        pytest.skip(reason)
    x = make_inputs(case, device, seed=1)
    reference = next(i for i in implementations() if i.name == "reference")
    exact = make_inputs(case, device, seed=1)
    for name, value in vars(exact).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(exact, name, value.detach().double())
    with torch.no_grad():
        got = loss_fn(impl, case.op, device)(x).double()
        want = loss_fn(reference, case.op, device)(exact)
    assert torch.isfinite(got), f"{impl.name} gave {got.item()}"
    error = (got - want).abs() / want.abs().clamp(min=1e-12)
    assert error <= _TOLERANCE[case.shape.dtype], f"{impl.name}: {got.item()} vs reference {want.item()}"
