"""The order of the Triton epilogues' memory operations, recorded in Triton's interpreter: a byte that one
thread of a program writes and another thread reads or writes must be separated from that access by a
barrier, or the GPU may run the two in either order (a race).

The interpreter runs a program as one sequence of whole-block operations, so a race never shows in its
numbers; this test reads the sequence instead. It logs every load and store (byte addresses of the elements
the mask lets through) and every point where all warps of the program meet: ``tl.debug_barrier`` and each
block reduction (``tl.max`` / ``tl.sum`` over a tile spread across the program's warps merge through shared
memory between barriers). Two accesses of the same bytes, at least one a store, with no such point between
them, conflict unless the same thread makes both. Which thread holds an element is read as on the GPU: element
i of a block load and element i of a block store of the same shape sit in the same thread (the epilogues compute
each stored tile elementwise from the loaded one, so both have one layout), and a scalar load is made by every
thread.

What it cannot show: the layouts and barriers the compiler really emits, or a compiler that moves a load past
a store; the CUDA run of test_head_matmuls' aliasing-view test and test_kernels' in-place case are where those
would show, by chance, as wrong numbers. It runs under the interpreter only (a CPU run).
"""
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from are_fast.kernels.kl_epilogue import kl_epilogue
from are_fast.kernels.logprob_epilogue import logprob_epilogue

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="reads the operations from Triton's interpreter (a CPU run)"
)

TILE, VOCAB, IGNORE = 16, 5 * 16 + 3, -100


@dataclass
class Access:
    kind: str  # "load", "store" or "barrier"
    starts: np.ndarray  # first byte of each accessed element
    width: int  # bytes per element
    lanes: np.ndarray | None  # the element's index in its block (its thread); None: every thread (a scalar)

    def conflicts_with(self, other: "Access") -> bool:
        """Some byte touched by both, by different threads."""
        a, b = self.starts[:, None], other.starts[None, :]
        overlap = (a < b + other.width) & (b < a + self.width)
        if self.lanes is None or other.lanes is None:
            return bool(overlap.any())
        return bool((overlap & (self.lanes[:, None] != other.lanes[None, :])).any())


@pytest.fixture
def memory_log(monkeypatch):
    """The accesses and barriers of the kernels launched in the test, in program order."""
    from triton.runtime import interpreter

    log = []
    builder = interpreter.interpreter_builder

    def record(kind, ptrs, mask):
        data = np.asarray(ptrs.data).astype(np.int64)
        enabled = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
        lanes = None if data.size == 1 else np.arange(data.size)[enabled.reshape(-1)]
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        log.append(Access(kind, data.reshape(-1)[enabled.reshape(-1)], width, lanes))

    def load(ptrs, mask, *args, **kwargs):
        record("load", ptrs, mask)
        return plain_load(ptrs, mask, *args, **kwargs)

    def store(ptrs, value, mask, *args, **kwargs):
        record("store", ptrs, mask)
        return plain_store(ptrs, value, mask, *args, **kwargs)

    def barrier(*args, **kwargs):
        log.append(Access("barrier", np.empty(0, np.int64), 0, None))

    def reduce(self, *args, **kwargs):
        barrier()
        return plain_reduce(self, *args, **kwargs)

    plain_load, plain_store = builder.create_masked_load, builder.create_masked_store
    plain_reduce = interpreter.ReduceOps.apply
    monkeypatch.setattr(builder, "create_masked_load", load)
    monkeypatch.setattr(builder, "create_masked_store", store)
    monkeypatch.setattr(builder, "create_barrier", barrier)
    monkeypatch.setattr(interpreter.ReduceOps, "apply", reduce)
    return log


def races(log: list) -> list:
    """(earlier, later) pairs of conflicting accesses with no barrier between them."""
    found = []
    for j, later in enumerate(log):
        if later.kind == "barrier":
            continue
        for earlier in reversed(log[:j]):
            if earlier.kind == "barrier":
                break
            if "store" in (earlier.kind, later.kind) and earlier.conflicts_with(later):
                found.append((earlier.kind, later.kind))
    return found


def checked(log: list) -> list:
    """``races(log)``, once the log is known to hold what the kernels do (so that a hook that stopped
    recording cannot make the test pass)."""
    kinds = {access.kind for access in log}
    assert kinds == {"load", "store", "barrier"}, f"the interpreter hooks recorded only {sorted(kinds)}"
    return races(log)


def _gradient(logits: torch.Tensor, where: str) -> torch.Tensor | None:
    """None: in place over the float32 logits; "view": the bf16 view of each row's first half (as
    HeadMatmuls.gradient_out makes it); "separate": a bf16 tensor of its own."""
    if where == "in-place":
        return None
    if where == "view":
        return logits.view(torch.bfloat16)[:, : logits.shape[1]]
    return torch.empty(logits.shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("where", ["in-place", "view", "separate"])
@pytest.mark.parametrize("target", [3, VOCAB - 1], ids=["target-in-first-tile", "target-in-tail"])
def test_logprob_epilogue_orders_every_shared_byte(memory_log, target, where):
    """One row over six tiles: the target logit's read, each tile's loads and the gradient's stores."""
    logits = 3 * torch.randn(1, VOCAB)
    gradient = _gradient(logits, where)
    logprob_epilogue(logits, torch.tensor([target]), IGNORE, torch.ones(1), gradient, block_v=TILE)
    assert checked(memory_log) == []


@pytest.mark.parametrize("where", ["in-place", "view", "separate"])
def test_kl_epilogue_orders_every_shared_byte(memory_log, where):
    logits_p, logits_q = 3 * torch.randn(1, VOCAB), 3 * torch.randn(1, VOCAB)
    gradients = [_gradient(logits, where) for logits in (logits_p, logits_q)]
    kl_epilogue(logits_p, logits_q, torch.ones(1, dtype=torch.bool), torch.ones(1), *gradients, block_v=TILE)
    assert checked(memory_log) == []


def test_the_log_sees_a_race():
    """The checker itself: a scalar read after another thread's store of that byte, no barrier between."""
    element = Access("store", np.array([100]), 4, np.array([0]))
    scalar_read = Access("load", np.array([100]), 4, None)
    same_thread = Access("load", np.array([100]), 4, np.array([0]))
    neighbour = Access("load", np.array([96, 100]), 4, np.array([0, 1]))
    barrier = Access("barrier", np.empty(0, np.int64), 0, None)
    assert races([element, scalar_read]) == [("store", "load")]
    assert races([element, same_thread]) == []
    assert races([element, neighbour]) == [("store", "load")]
    assert races([element, barrier, scalar_read]) == []
    assert races([scalar_read, neighbour]) == []  # two reads never race
