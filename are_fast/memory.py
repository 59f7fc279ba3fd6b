"""Peak extra memory of a call, on CUDA and on CPU.

CUDA: ``torch.cuda.max_memory_allocated`` around the call, less what was allocated before it.
CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of PyTorch's CPU
allocator, each with the running total allocated since profiling began; the largest running total is the
call's peak extra memory. Unlike process RSS it counts exactly the tensors the call allocates (including
temporaries inside ATen ops and the autograd graph's saved tensors), ignores allocator caching and memory
that other threads or earlier calls hold, and is repeatable.
"""
from __future__ import annotations

from typing import Callable

import torch


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run ``fn()`` once; return (its result, peak bytes allocated on ``device`` during the call)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak = 0
    for event in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return result, peak
