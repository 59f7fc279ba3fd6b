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

# Epilogue(logits per stream [C, V], rows of this chunk (a slice or an int64 index [C]), grad scale [C] or None,
# gradient outputs per stream (None: over the logits)) -> values [C].
Epilogue = Callable[[list, "slice | torch.Tensor", "torch.Tensor | None", list], torch.Tensor]

# Logits bytes per chunk, all streams together. On CPU the budget follows the gradients the op holds anyway
# (the hidden gradients, [N, H] per stream, and half of a trainable head's [V, H] weight gradient): chunks no
# larger keep the peak extra RSS near that floor (the chunk buffers and the epilogue's temporaries are reused
# from the allocator's free lists), between 8 MiB (smaller chunks spend their time in per-chunk overhead and in
# streaming the head once more per chunk) and 64 MiB. A trainable head gains most from large chunks: each
# chunk reads and writes the whole weight-gradient accumulator once.
_CHUNK_BYTES = {"cuda": (256 << 20, 256 << 20), "cpu": (8 << 20, 64 << 20)}


def chunk_rows_for(n_rows: int, vocab: int, streams: int, device: torch.device, held_bytes: int = 0) -> int:
    """Rows per chunk so that the float32 logits of all streams stay within a byte budget.

    The budget is 256 MiB on CUDA; elsewhere ``held_bytes`` (the bytes of the hidden gradients plus half the
    weight gradient's) clamped to [8 MiB, 64 MiB]. The environment variable ARE_FAST_CHUNK_BYTES overrides it.
    """
    low, high = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    budget = int(os.environ.get("ARE_FAST_CHUNK_BYTES", min(max(held_bytes, low), high)))
    rows = max(1, budget // (vocab * 4 * streams))
    if rows > 16:
        rows -= rows % 16  # matmul-friendly row counts
    return max(1, min(rows, n_rows))


@dataclass
class PassResult:
    values: torch.Tensor | None  # [N] compute dtype (None from a gradient-only pass)
    hidden_grads: list  # per stream: [N, H] in the hidden dtype, or None
    weight_grad: torch.Tensor | None  # [V, H] in the weight dtype
    bias_grad: torch.Tensor | None  # [V] in the bias dtype
    log_norms: torch.Tensor | None = None  # [N] each row's log-sum-exp of the logits (the online logprob sweep)


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
    rows: torch.Tensor | None = None,
    operand_dtype: torch.dtype | None = None,
) -> PassResult:
    """One pass over all rows: values, and the gradients of sum(grad_scale * values) that were asked for.

    hiddens: one contiguous [N, H] tensor per stream (same N); grad_scale [N] or None (values only).
    hidden_grads: which streams need a hidden gradient (only read when grad_scale is given).
    rows: optional int64 [M] indices of the rows that count (compaction): only they reach the matmuls; the
    other rows get value 0 and zero gradients.
    operand_dtype: the matmuls' operand dtype (autocast's, captured by the caller), default the head's.
    """
    n_rows, hidden_size = hiddens[0].shape
    vocab = weight.shape[0]
    matmuls = HeadMatmuls(weight, bias, operand_dtype)
    device = weight.device
    want_grad = grad_scale is not None
    compact = rows is not None
    active = rows.numel() if compact else n_rows
    new = torch.zeros if compact else torch.empty  # rows left out must read 0
    values = new(n_rows, dtype=matmuls.compute_dtype, device=device)
    dh = [new(h.shape, dtype=h.dtype, device=device) if want_grad and need else None for h, need in zip(hiddens, hidden_grads)]
    dw = torch.zeros(vocab, hidden_size, dtype=matmuls.compute_dtype, device=device) if want_grad and weight_grad else None
    db = torch.zeros(vocab, dtype=matmuls.compute_dtype, device=device) if want_grad and bias_grad else None

    # A trainable head's weight gradient over a pair of streams with low-precision gradients: _pair_gradients.
    paired = want_grad and dw is not None and len(hiddens) == 2 and matmuls.grad_dtype != matmuls.compute_dtype
    held_bytes = sum(h.numel() * h.element_size() for h in hiddens)
    if dw is not None:
        held_bytes += dw.numel() * dw.element_size() // 2
    # paired: two low-precision copies of the gradients, one float32 buffer's worth more per chunk row
    rows_per_chunk = chunk_rows or chunk_rows_for(active, vocab, len(hiddens) + paired, device, held_bytes)
    size_max = max(1, min(rows_per_chunk, active))
    # Buffers reused by every chunk: logits per stream, and with compaction the gathered rows and their gradient.
    buffers = [torch.empty(size_max, vocab, dtype=matmuls.compute_dtype, device=device) for _ in hiddens]
    gathered = [torch.empty(size_max, hidden_size, dtype=h.dtype, device=device) for h in hiddens] if compact else None
    grad_rows = torch.empty(size_max, hidden_size, dtype=hiddens[0].dtype, device=device) if compact and want_grad else None
    with autocast_off(device):  # the precision is HeadMatmuls' choice, not autocast's
        for start in range(0, active, rows_per_chunk):
            stop = min(start + rows_per_chunk, active)
            size = stop - start
            if compact:
                sel = rows[start:stop]
                chunk = [torch.index_select(h, 0, sel, out=g[:size]) for h, g in zip(hiddens, gathered)]
            else:
                sel = slice(start, stop)
                chunk = [h[sel] for h in hiddens]
            if len(chunk) == 2:  # a pair: the second stream from the rows' difference where they are close
                logits = matmuls.pair_logits(*chunk, *(buf[:size] for buf in buffers))
            else:
                logits = [matmuls.logits(h, buf[:size]) for h, buf in zip(chunk, buffers)]
            grad_outs = [matmuls.gradient_out(part) if want_grad and not paired else None for part in logits]
            values[sel] = epilogue(logits, sel, None if grad_scale is None else grad_scale[sel], grad_outs)
            if not want_grad:
                continue
            if paired:
                _pair_gradients(matmuls, logits, chunk, dh, dw, db, sel, compact)
                continue
            for stream, (part, grad_out) in enumerate(zip(logits, grad_outs)):
                grad_logits = part if grad_out is None else grad_out  # where the epilogue left the gradient
                if dh[stream] is not None:
                    if compact:
                        matmuls.hidden_grad(grad_logits, grad_rows[:size])
                        dh[stream].index_copy_(0, sel, grad_rows[:size])
                    else:
                        matmuls.hidden_grad(grad_logits, dh[stream][sel])
                if dw is not None:
                    matmuls.add_weight_grad(dw, grad_logits, chunk[stream])
                if db is not None:
                    db.add_(grad_logits.sum(0, dtype=db.dtype))
    return PassResult(
        values=values,
        hidden_grads=dh,
        weight_grad=None if dw is None else dw.to(weight.dtype),
        bias_grad=None if db is None else db.to(bias.dtype),
    )


def _pair_gradients(matmuls: HeadMatmuls, grads: list, chunk: list, dh: list, dw: torch.Tensor,
                    db: torch.Tensor | None, sel, compact: bool) -> None:
    """One chunk's gradients of a pair (KL, JSD) with a trainable head whose products take low-precision
    gradients (``HeadMatmuls.grad_dtype``): grads, the epilogue's float32 gradients over the logits [C, V] of
    streams p and q (overwritten); chunk, their hidden rows [C, H].

    The weight gradient g_p^T h_p + g_q^T h_q nearly cancels where the streams agree (g_q ~ -g_p, h_q ~ h_p: two
    O(d) terms, an O(d^2) sum for streams d apart): rounding g_p and g_q to bf16 one by one would leave errors of
    2^-9 O(d) in an O(d^2) result (0.11 relative at d = 0.01). It is formed as s^T h_q + g_p^T (h_p - h_q) with
    s = g_p + g_q summed in float32, two products of O(d^2) each; the hidden gradients as g_p W and s W - g_p W.
    """
    grad_p, grad_q = grads
    low_p = grad_p.to(matmuls.grad_dtype)
    summed = grad_q.add_(grad_p)
    if db is not None:
        db.add_(summed.sum(0, dtype=db.dtype))
    low_sum = summed.to(matmuls.grad_dtype)
    if dh[0] is not None or dh[1] is not None:
        rows_p = torch.empty_like(chunk[0])
        matmuls.hidden_grad(low_p, rows_p)
        streams = [(dh[0], rows_p)]
        if dh[1] is not None:
            rows_q = torch.empty_like(chunk[1])
            matmuls.hidden_grad(low_sum, rows_q)
            streams.append((dh[1], rows_q.sub_(rows_p)))
        for target, rows in streams:
            if target is None:
                continue
            if compact:
                target.index_copy_(0, sel, rows)
            else:
                target[sel] = rows
    matmuls.add_weight_grad(dw, low_sum, chunk[1])
    matmuls.add_weight_grad(dw, low_p, chunk[0].to(matmuls.compute_dtype) - chunk[1].to(matmuls.compute_dtype))
