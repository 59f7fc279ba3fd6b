"""Batch planning for the encoder: rows sorted by length and cut under a token budget.

Padding is where a naive encoder loses its time: a fixed count of texts in input order pads every row to the
longest of a random mix. Sorting by length and sizing each batch by tokens (padded tokens, or real tokens
when rows run packed) keeps batches dense and the memory of every batch bounded.
"""
from __future__ import annotations

from typing import Sequence

DEFAULT_MAX_TOKENS = {"cuda": 32768, "cpu": 8192}  # padded tokens per batch (see benchmarks/test_bench_encoder.py)


def check_positive(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is None or a positive int (bools refused)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


def plan_batches(lengths: Sequence[int], max_tokens: int, batch_size: int | None = None,
                 packed: bool = False) -> list[list[int]]:
    """Row indices cut into batches, longest rows first (an out-of-memory error shows up at once).

    A batch costs rows x its longest row (padded) or the sum of its rows (``packed``); it stays within
    ``max_tokens`` and ``batch_size`` rows, except a single row over the budget, which runs alone. Ties keep
    input order, so the plan depends on the lengths only.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current:
            rows = len(current) + 1
            cost = total + lengths[i] if packed else rows * lengths[current[0]]
            if cost > max_tokens or (batch_size is not None and rows > batch_size):
                batches.append(current)
                current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches
