"""What the logit transforms cost: forward+backward of compression_loss and conditional_kl with no transform,
a softcap (Gemma 2/3's c = 30) and a softcap with a logit scale, side by side per (op, backend).

Ids read like ``compression_loss-issue2-N2048-fp32-frozen-online-softcap``; each (op, shape, backend) is one
pytest-benchmark group. Shapes and inputs: benchmarks/cases.py (llama3-8b bf16 on CUDA; the issue's 512 x
32000 head on CPU; tiny in smoke mode). No timed asserts: the ratios are read off the groups.
"""
from __future__ import annotations

import pytest
import torch

import are_fast

from .cases import HEADS, Case, Shape, bench_device, clear_grads, make_inputs, smoke_mode

TRANSFORMS = {"none": {}, "softcap": dict(softcap=30.0), "softcap+scale": dict(softcap=30.0, logit_scale=0.5)}


def _shape(device: torch.device) -> Shape:
    if smoke_mode():
        return Shape(HEADS["tiny"], 128, torch.float32, False, 16)
    if device.type == "cuda":
        return Shape(HEADS["llama3-8b"], 16384, torch.bfloat16, False, 512)
    return Shape(HEADS["issue2"], 2048, torch.float32, False, 128)


def _backends(device: torch.device) -> list:
    return ["triton", "chunked"] if device.type == "cuda" else ["online", "chunked"]


def _loss(op: str, x, backend: str, transform: dict):
    if op == "compression_loss":
        return lambda: are_fast.compression_loss(x.hidden, x.weight, x.labels, backend=backend, **transform)
    return lambda: are_fast.conditional_kl(x.hidden_p, x.hidden_q, x.weight, x.labels, backend=backend,
                                           **transform).sum()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", _backends(bench_device()))
@pytest.mark.parametrize("op", ["compression_loss", "conditional_kl"])
def test_transform_cost(op, backend, transform, measure):
    device = bench_device()
    case = Case(op, _shape(device))
    x = make_inputs(case, device)
    loss = _loss(op, x, backend, TRANSFORMS[transform])
    measure(lambda: loss().backward(), lambda: clear_grads(x), group=f"{case.id}-{backend}", suite="transforms",
            op=op, impl=backend, transform=transform, shape=case.shape.id)
