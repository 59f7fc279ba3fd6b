"""Test setup: Triton's interpreter when there is no GPU, fixed seeds, NaN-poisoned allocations.

TRITON_INTERPRET must be set before any Triton kernel is defined, so this runs before are_fast.kernels is
imported. Poisoning torch.empty / empty_like with NaN makes any element an op forgets to write fail.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(tensor):
    if tensor.dtype.is_floating_point and tensor.device.type != "meta":
        tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine spin and crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
