"""Which precision the CPU varlen route's attention runs in for bf16/fp16 bodies.

PyTorch's CPU flash attention is not uniformly faster in bf16 than in float32: measured on an AMX-BF16 Xeon
(one thread, head dim 64), the bf16 forward took 0.3-0.5x the float32 one (casts included), but the bf16
backward took 2.3x float32's on 64-token sequences and about the same on 256-600-token ones. So the choice is
made per (dtype, head dim, sequence-length bucket, forward only or with a backward), by measurement: the first
call with a new key times a probe of that shape both ways (about 0.05-0.3 s, once per process) and keeps the
faster, and float32 unless the low-precision kernel is at least 1.5x faster: float32 is the more accurate, and the
wide margin keeps the choice the same from one process to the next (the measured ratios sit near 0.3-0.5 or
above 0.8, so timing noise does not flip it). The choice and its timings are logged once (logger
``are_fast.model.attention_precision``).

``use_precision("low" | "float32")`` forces the choice inside a block and yields the list of every choice made in
it (tests); the environment variable ARE_FAST_ATTENTION_PRECISION (auto, low or float32) does the same.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.forcing import Forcing

logger = logging.getLogger(__name__)

PRECISIONS = ("low", "float32")
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MARGIN = 1.5  # the low-precision kernel must beat float32 (casts included) by this factor to be chosen
_PROBE_TOKENS = 2048  # tokens per probe (sequences x length), so that short buckets are not timed on a few rows
_PROBE_HEADS = 4

_forcing = Forcing("precision", "ARE_FAST_ATTENTION_PRECISION", PRECISIONS)
_cache: dict = {}


@dataclass(frozen=True)
class AttentionChoice:
    dtype: torch.dtype
    head_dim: int
    bucket: int  # the sequence length rounded up to a power of two (16 to 4096)
    backward: bool  # whether a backward follows (training) or the forward alone (encoding, no grad)
    precision: str  # one of PRECISIONS
    reason: str  # forced, or the two measured times


def use_precision(precision: str | None = None):
    """Force the precision of low-precision attention inside the block (None: automatic) and yield the list of
    every ``AttentionChoice`` made inside it."""
    return _forcing.use(precision)


def bucket(length: int) -> int:
    """``length`` rounded up to a power of two, within [16, 4096]."""
    return min(4096, max(16, 1 << max(0, length - 1).bit_length()))


def upcast(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether block attention over q [G, heads, L, d] (and k [G, kv_heads, L, d]) should run in float32: only for
    bf16/fp16 tensors on a CPU, where float32 measures faster (or is forced)."""
    if q.device.type != "cpu" or q.dtype not in LOW_PRECISION:
        return False
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return choose(q.dtype, q.shape[-1], bucket(q.shape[2]), backward).precision == "float32"


def choose(dtype: torch.dtype, head_dim: int, length_bucket: int, backward: bool) -> AttentionChoice:
    """The precision for that key: forced, else measured once per process."""
    forced = _forcing.forced()
    if forced is not None:
        choice = AttentionChoice(dtype, head_dim, length_bucket, backward, forced, "forced")
    else:
        key = (dtype, head_dim, length_bucket, backward)
        if key not in _cache:
            _cache[key] = _measured(*key)
            logger.info("are_fast: CPU attention, %s, head dim %d, length <= %d, %s: %s (%s)", dtype, head_dim,
                        length_bucket, "with backward" if backward else "forward only", _cache[key].precision,
                        _cache[key].reason)
        choice = _cache[key]
    _forcing.record(choice)
    return choice


def _measured(dtype: torch.dtype, head_dim: int, length_bucket: int, backward: bool) -> AttentionChoice:
    low, full = measure(dtype, head_dim, length_bucket, backward)
    precision = "low" if low * _MARGIN <= full else "float32"
    return AttentionChoice(dtype, head_dim, length_bucket, backward, precision,
                           f"{dtype} {low * 1e3:.2f} ms, float32 with casts {full * 1e3:.2f} ms")


def measure(dtype: torch.dtype, head_dim: int, length: int, backward: bool, repeats: int = 3) -> tuple:
    """(low-precision seconds, float32-with-casts seconds) of causal attention over a probe of ``length``-token
    sequences (forward, and with ``backward`` its backward), the best of ``repeats`` calls each, alternating,
    after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    sequences = max(1, _PROBE_TOKENS // length)
    probe = [torch.randn(sequences, _PROBE_HEADS, length, head_dim, generator=generator).to(dtype) for _ in range(3)]

    def call(cast: bool) -> float:
        inputs = [t.detach().requires_grad_(backward) for t in probe]
        start = time.perf_counter()
        with torch.enable_grad() if backward else torch.no_grad():
            q, k, v = (t.float() for t in inputs) if cast else inputs
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True).to(dtype)
            if backward:
                out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    with torch.autocast("cpu", enabled=False):
        call(False), call(True)  # warm-up
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for slot, cast in enumerate((False, True)):
                best[slot] = min(best[slot], call(cast))
    return best[0], best[1]
