"""Peak extra memory of a call: on CUDA ``torch.cuda.max_memory_allocated`` around it; on CPU the PyTorch
profiler's record of every allocation and free (exact tensors, temporaries and saved tensors included, nothing
held before the call). README "Benchmarks" compares it with RSS."""
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
    events = sorted(
        (e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
         if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
        key=lambda e: e.start_time_ns,
    )
    if not events:
        return result, 0
    # The running total is not reset between profiles (a tensor allocated under an earlier profile and freed
    # outside it stays counted), so measure from the total just before this call's first event.
    first = events[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return result, max(0, max(e.extra_fields.total_allocated for e in events) - baseline)
