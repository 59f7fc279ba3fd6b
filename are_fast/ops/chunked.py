"""The chunk driver: LM-head matmuls over chunks of rows, with a pluggable row epilogue.

For each chunk of C rows it computes the logits [C, V] of every stream (one stream for log-probabilities,
two for the KL), hands them to an epilogue (PyTorch, Triton or native: they share one signature, see
``are_fast.ops.torch_epilogues``) that returns per-row values and, when asked, writes their gradient
(over the logits, or for a low-precision head into ``HeadMatmuls.gradient_out``'s view in the operand dtype),
then multiplies that gradient back through the head. Peak extra memory is O(C x V), never N x V.

Precision: logits and softmax statistics are float32 (float64 for float64 inputs); how the products with a
low-precision head get float32 results is ``are_fast.ops.head_matmuls``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .head_matmuls import HeadMatmuls, autocast_off

# Epilogue(logits per stream [C, V], rows of this chunk, grad scale [C] or None, gradient outputs per stream
# (None: over the logits)) -> values [C].
Epilogue = Callable[[list, slice, "torch.Tensor | None", list], torch.Tensor]

_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}


def chunk_rows_for(n_rows: int, vocab: int, streams: int, device: torch.device) -> int:
    """Rows per chunk so that the float32 logits of all streams stay within a byte budget.

    The budget is 256 MiB on CUDA and 32 MiB elsewhere (cache-sized chunks are fastest on CPU); the
    environment variable ARE_FAST_CHUNK_BYTES overrides it.
    """
    budget = int(os.environ.get("ARE_FAST_CHUNK_BYTES", _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])))
    rows = max(1, budget // (vocab * 4 * streams))
    if rows > 16:
        rows -= rows % 16  # matmul-friendly row counts
    return max(1, min(rows, n_rows))


@dataclass
class PassResult:
    values: torch.Tensor  # [N] compute dtype
    hidden_grads: list  # per stream: [N, H] in the hidden dtype, or None
    weight_grad: torch.Tensor | None  # [V, H] in the weight dtype
    bias_grad: torch.Tensor | None  # [V] in the bias dtype


def fused_linear_pass(
    hiddens: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
    grad_scale: torch.Tensor | None = None,
    hidden_grads: Sequence[bool] = (),
    weight_grad: bool = False,
    bias_grad: bool = False,
    chunk_rows: int | None = None,
    operand_dtype: torch.dtype | None = None,
) -> PassResult:
    """One pass over all rows: values, and the gradients of sum(grad_scale * values) that were asked for.

    hiddens: one contiguous [N, H] tensor per stream (same N); grad_scale [N] or None (values only).
    hidden_grads: which streams need a hidden gradient (only read when grad_scale is given).
    operand_dtype: the matmuls' operand dtype (autocast's, captured by the caller), default the head's.
    """
    n_rows, hidden_size = hiddens[0].shape
    vocab = weight.shape[0]
    streams = len(hiddens)
    matmuls = HeadMatmuls(weight, bias, operand_dtype)
    device = weight.device
    values = torch.empty(n_rows, dtype=matmuls.compute_dtype, device=device)
    want_grad = grad_scale is not None
    dh = [torch.empty_like(h) if want_grad and need else None for h, need in zip(hiddens, hidden_grads)]
    dw = torch.zeros(vocab, hidden_size, dtype=matmuls.compute_dtype, device=device) if want_grad and weight_grad else None
    db = torch.zeros(vocab, dtype=matmuls.compute_dtype, device=device) if want_grad and bias_grad else None

    rows = chunk_rows or chunk_rows_for(n_rows, vocab, streams, device)
    buffers = [torch.empty(min(rows, n_rows), vocab, dtype=matmuls.compute_dtype, device=device) for _ in hiddens]
    with autocast_off(device):  # the precision is HeadMatmuls' choice, not autocast's
        for start in range(0, n_rows, rows):
            sl = slice(start, min(start + rows, n_rows))
            size = sl.stop - sl.start
            logits = [matmuls.logits(h[sl], buf[:size]) for h, buf in zip(hiddens, buffers)]
            grad_outs = [matmuls.gradient_out(chunk) if want_grad else None for chunk in logits]
            values[sl] = epilogue(logits, sl, None if grad_scale is None else grad_scale[sl], grad_outs)
            if not want_grad:
                continue
            for stream, (chunk, grad_out) in enumerate(zip(logits, grad_outs)):
                grad_logits = chunk if grad_out is None else grad_out
                if dh[stream] is not None:
                    matmuls.hidden_grad(grad_logits, dh[stream][sl])
                if dw is not None:
                    matmuls.add_weight_grad(dw, grad_logits, hiddens[stream][sl])
                if db is not None:
                    db.add_(grad_logits.sum(0, dtype=db.dtype))
    return PassResult(
        values=values,
        hidden_grads=dh,
        weight_grad=None if dw is None else dw.to(weight.dtype),
        bias_grad=None if db is None else db.to(bias.dtype),
    )
