"""Triton row epilogue for the KL between two streams' softmax distributions, with both gradients in place.

One program per row pair (a = logits_p, b = logits_q, log p = (a - max_a) - log_sum_a, likewise log q). The
first sweep keeps online statistics of both rows: max and sum of exp(x - max) for a and for b, and
t = sum exp(a - max_a) ((a - max_a) - (b - max_b)), rescaled and shifted as the maxes move. Then
KL = sum p (log p - log q) = t / sum_a - log_sum_a + log_sum_b: every term is relative to its row's max, so a
large common offset of the logits cancels exactly instead of through the difference of two large
log-sum-exps. The second sweep (only when a gradient is asked for) writes g * p * (log p - log q - KL) over a
and g * (q - p) over b, or into gradient outputs (which may be low-precision views of the logits rows, as in
logprob_epilogue). Same contract as ``are_fast.ops.torch_epilogues.kl_epilogue``. Logit transforms as in
logprob_epilogue: a and b are the transformed logits, and each gradient is chained through its stream's dz'/dz.
"""
import torch
import triton
import triton.language as tl

from .logprob_epilogue import (
    LAUNCH_OPTIONS, check_block, check_grad_out, finite_or_zero, shares_memory, transform_arguments, transform_derivative,
    transformed,
)


@triton.jit
def _kl_epilogue_kernel(
    p_ptr,
    q_ptr,
    stride_p,
    stride_q,
    grad_p_ptr,
    grad_q_ptr,
    stride_grad_p,
    stride_grad_q,
    valid_ptr,
    scale_ptr,
    out_ptr,
    vocab,
    softcap,
    logit_scale,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SYNC_TILES: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * stride_p
    q_row = q_ptr + row * stride_q
    grad_p_row = grad_p_ptr + row * stride_grad_p
    grad_q_row = grad_q_ptr + row * stride_grad_q
    offsets = tl.arange(0, BLOCK_V)

    max_p = float("-inf")
    sum_p = 0.0
    shifted = 0.0  # sum exp(a - max_p) ((a - max_p) - (b - max_q)) over the tiles so far
    max_q = float("-inf")
    sum_q = 0.0
    for start in range(0, vocab, BLOCK_V):
        mask = start + offsets < vocab
        a = transformed(tl.load(p_row + start + offsets, mask=mask, other=0.0).to(tl.float32), softcap, logit_scale,
                        HAS_SOFTCAP)
        b = transformed(tl.load(q_row + start + offsets, mask=mask, other=0.0).to(tl.float32), softcap, logit_scale,
                        HAS_SOFTCAP)
        # Padding lanes are -inf for the maxes and the exponentials (so exp_a = 0 there) but 0 in the log-ratio,
        # which stays finite (no -inf - -inf). Terms are taken relative to the running maxes, or to 0 while a row
        # has shown only -inf logits (a masked vocabulary): never -inf - -inf either.
        a_padded = tl.where(mask, a, float("-inf"))
        b_padded = tl.where(mask, b, float("-inf"))
        new_max_p = tl.maximum(max_p, tl.max(a_padded, axis=0))
        new_max_q = tl.maximum(max_q, tl.max(b_padded, axis=0))
        shift_p, shift_q = finite_or_zero(new_max_p), finite_or_zero(new_max_q)
        rescale_p = tl.exp(max_p - shift_p)  # 0 while the sums are still 0
        # When the shifts rise, every old term's (a - shift_p) - (b - shift_q) moves by the same amount (nothing to
        # move before the first term).
        started = sum_p > 0
        moved = tl.where(started, (shift_p - finite_or_zero(max_p)) - (shift_q - finite_or_zero(max_q)), 0.0)
        exp_a = tl.exp(a_padded - shift_p)
        log_ratio = (a - shift_p) - (b - shift_q)
        # p = 0 (a -inf logit in p) contributes 0, not 0 * -inf = NaN.
        shifted = (shifted - moved * sum_p) * rescale_p + tl.sum(tl.where(exp_a == 0.0, 0.0, exp_a * log_ratio), axis=0)
        sum_p = sum_p * rescale_p + tl.sum(exp_a, axis=0)
        sum_q = sum_q * tl.exp(max_q - shift_q) + tl.sum(tl.exp(b_padded - shift_q), axis=0)
        max_p = new_max_p
        max_q = new_max_q
    log_sum_p = tl.log(sum_p)
    log_sum_q = tl.log(sum_q)
    kl = shifted / sum_p - log_sum_p + log_sum_q
    valid = tl.load(valid_ptr + row) != 0
    tl.store(out_ptr + row, tl.where(valid, kl, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            raw_a = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
            raw_b = tl.load(q_row + cols, mask=mask, other=0.0).to(tl.float32)
            if SYNC_TILES:
                tl.debug_barrier()
            log_p = (transformed(raw_a, softcap, logit_scale, HAS_SOFTCAP) - max_p) - log_sum_p
            log_q = (transformed(raw_b, softcap, logit_scale, HAS_SOFTCAP) - max_q) - log_sum_q
            prob_p = tl.exp(log_p)
            grad_p = tl.where(prob_p == 0.0, 0.0, scale * prob_p * ((log_p - log_q) - kl)
                              * transform_derivative(raw_a, softcap, logit_scale, HAS_SOFTCAP))
            grad_q = scale * (tl.exp(log_q) - prob_p) * transform_derivative(raw_b, softcap, logit_scale, HAS_SOFTCAP)
            tl.store(grad_p_row + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_q_row + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)


def check_pair(logits_p: torch.Tensor, logits_q: torch.Tensor) -> None:
    """The two streams' logits: float32 [C, V] with contiguous rows, the same shape."""
    for name, logits in (("logits_p", logits_p), ("logits_q", logits_q)):
        if logits.dtype != torch.float32:
            raise TypeError(f"{name}: the Triton epilogue takes float32 logits, got {logits.dtype}")
        if logits.stride(1) != 1:
            raise ValueError(f"{name}: rows must be contiguous")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_q: expected shape {tuple(logits_p.shape)}, got {tuple(logits_q.shape)}")


def kl_epilogue(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out_p: torch.Tensor | None = None,
    grad_out_q: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """logits_p, logits_q [C, V] float32; valid [C] bool; grad_scale [C] or None; grad_out_p, grad_out_q
    [C, V] or None (see logprob_epilogue) -> KL [C] float32. softcap, logit_scale: the logit transforms.

    block_v: the vocabulary tile (a power of two; default ``block_size(V)``), smaller in tests to get many tiles.
    """
    return launch_pair(_kl_epilogue_kernel, logits_p, logits_q, valid, grad_scale, grad_out_p, grad_out_q, (),
                       block_v, softcap, logit_scale)


def launch_pair(kernel, logits_p, logits_q, valid, grad_scale, grad_out_p, grad_out_q, kind_arguments: tuple,
                block_v, softcap, logit_scale) -> torch.Tensor:
    """Checks and launches a two-stream row epilogue (one program per row) with the argument order the KL and JSD
    kernels share: the logits, their gradient outputs, valid, scale, out, vocab, then ``kind_arguments`` (the
    kind's own scalars), then the transforms. Returns out [C] float32."""
    check_pair(logits_p, logits_q)
    grad_p = check_grad_out("grad_out_p", grad_out_p, logits_p)
    grad_q = check_grad_out("grad_out_q", grad_out_q, logits_q)
    rows, vocab = logits_p.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits_p.device)
    if rows == 0:
        return out
    write_grad = grad_scale is not None
    kernel[(rows,)](
        logits_p,
        logits_q,
        logits_p.stride(0),
        logits_q.stride(0),
        grad_p,
        grad_q,
        grad_p.stride(0),
        grad_q.stride(0),
        valid.to(torch.uint8).contiguous(),
        grad_scale.contiguous() if write_grad else out,
        out,
        vocab,
        *kind_arguments,
        *transform_arguments(softcap, logit_scale),
        BLOCK_V=check_block(block_v, vocab),
        WRITE_GRAD=write_grad,
        SYNC_TILES=write_grad and (shares_memory(grad_p, logits_p) or shares_memory(grad_q, logits_q)),
        HAS_SOFTCAP=softcap is not None,
        **LAUNCH_OPTIONS,
    )
    return out
