"""A pair's two streams of logits (KL, JSD) with the log-ratio kept: the second stream from the rows' difference.

Each logit comes out of its matmul rounded to a fraction of its size (2^-9 in bf16, 2^-24 in float32, more
with the dot product's own accumulation), and a pair's log-ratio a - b is as small as the streams are close:
two logits rounded on their own leave it little (bf16: the KL 0.64 off at streams 1% apart). On rows where the
streams are close (|h_p - h_q| <= CLOSE |h_q|) the second stream is multiplied as the difference, x = h_p - h_q,
and b = a - x W: b shares a's rounding and a - b keeps the difference's own relative precision. Far rows (a - b
as large as a) keep their own b, whose rounding is the smaller there. Used by the online sweep
(``sweep_matmuls.SweepMatmuls.pair_logits``) and the chunk driver (``head_matmuls.HeadMatmuls.pair_logits``).
"""
from __future__ import annotations

import torch

CLOSE = 0.5


def second_rows(rows_p: torch.Tensor, rows_q: torch.Tensor, compute_dtype: torch.dtype) -> tuple:
    """(rows [C, H] in ``compute_dtype``: h_p - h_q on close rows, h_q elsewhere; close: (mask [C] bool, count))
    for the streams' rows [C, H] (any float dtype; the difference is formed in ``compute_dtype``). count, the
    number of close rows, lets the all-close and all-far chunks skip the per-row selection; off the CPU it is
    None (counting would be a host synchronisation), and every chunk takes the selection."""
    rows_q = rows_q.to(compute_dtype)
    difference = rows_p.to(compute_dtype) - rows_q
    mask = difference.norm(dim=1) <= CLOSE * rows_q.norm(dim=1)
    count = int(mask.sum()) if mask.device.type == "cpu" else None
    if count == mask.numel():
        return difference, (mask, count)
    return torch.where(mask.unsqueeze(1), difference, rows_q), (mask, count)


def second_logits_(logits_a: torch.Tensor, products: torch.Tensor, close: tuple,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Stream b's logits, in place in ``products`` [C, W] (the products of ``second_rows``' rows with the head
    block, without bias): a - x W on close rows, x W + bias elsewhere; logits_a [C, W] with its bias (if any)."""
    mask, count = close
    if count == mask.numel():
        return torch.sub(logits_a, products, out=products)
    near = logits_a - products if count != 0 else None
    if bias is not None:
        products.add_(bias)
    return products if near is None else torch.where(mask.unsqueeze(1), near, products, out=products)
