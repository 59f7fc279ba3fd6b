"""Triton row epilogue for the generalized Jensen-Shannon divergence of two streams, with both gradients in place.

JSD = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, P = softmax(a), Q = softmax(b),
a = logits_p, b = logits_q (transformed as in logprob_epilogue). One program per row pair sweeps the rows up to
three times: online max and sum of exponentials of a and of b (their log-sum-exps); then, with
d = log q - log p + log((1 - beta) / beta), s = softplus(d) = log(m / (beta p)) and t = softplus(-d) =
log(m / ((1 - beta) q)), the sums sum p s and sum q t (a zero probability adds 0), so that
JSD = H(beta) - beta sum p s - (1 - beta) sum q t; then, only when a gradient is asked for,
g beta p (sum p s - s) over a and g (1 - beta) q (sum q t - t) over b, chained through each stream's dz'/dz,
or into gradient outputs (as in kl_epilogue). softplus keeps the small s and t of streams far apart to full
relative precision (``are_fast.ops.torch_epilogues.jsd_epilogue`` says why). Same contract as that function.
"""
import math

import torch
import triton
import triton.language as tl

from .kl_epilogue import launch_pair
from .logprob_epilogue import finite_or_zero, logsumexp_step, padded_tile, transform_derivative, transformed


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|) to full relative precision, log1p(e) as log(u) e / (u - 1) with
    u = 1 + e (exact where u rounds to 1); +inf at +inf, 0 at -inf, NaN at NaN."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    return tl.maximum(x, 0.0) + tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))


@triton.jit
def _log_probs(p_row, q_row, cols, mask, max_p, log_sum_p, max_q, log_sum_q, softcap, logit_scale,
               HAS_SOFTCAP: tl.constexpr):
    """log p and log q of a tile (the transformed logits less their row's max and log-sum-exp)."""
    a = transformed(tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
    b = transformed(tl.load(q_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
    return (a - max_p) - log_sum_p, (b - max_q) - log_sum_q


@triton.jit
def _jsd_epilogue_kernel(
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
    beta,
    log_odds,  # log((1 - beta) / beta)
    entropy,  # -beta log beta - (1 - beta) log(1 - beta): the JSD of disjoint P and Q
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
    offsets = tl.arange(0, BLOCK_V)

    max_p = float("-inf")
    sum_p = 0.0
    max_q = float("-inf")
    sum_q = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + offsets
        mask = cols < vocab
        max_p, sum_p = logsumexp_step(max_p, sum_p, padded_tile(p_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP))
        max_q, sum_q = logsumexp_step(max_q, sum_q, padded_tile(q_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP))
    max_p = finite_or_zero(max_p)
    max_q = finite_or_zero(max_q)
    log_sum_p = tl.log(sum_p)
    log_sum_q = tl.log(sum_q)

    sum_ps = 0.0
    sum_qt = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + offsets
        mask = cols < vocab
        log_p, log_q = _log_probs(p_row, q_row, cols, mask, max_p, log_sum_p, max_q, log_sum_q, softcap, logit_scale,
                                  HAS_SOFTCAP)
        d = (log_q - log_p) + log_odds
        prob_p = tl.where(mask, tl.exp(log_p), 0.0)
        prob_q = tl.where(mask, tl.exp(log_q), 0.0)
        sum_ps += tl.sum(tl.where(prob_p == 0.0, 0.0, prob_p * _softplus(d)), axis=0)
        sum_qt += tl.sum(tl.where(prob_q == 0.0, 0.0, prob_q * _softplus(-d)), axis=0)
    valid = tl.load(valid_ptr + row) != 0
    tl.store(out_ptr + row, tl.where(valid, entropy - beta * sum_ps - (1.0 - beta) * sum_qt, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
        grad_p_row = grad_p_ptr + row * stride_grad_p
        grad_q_row = grad_q_ptr + row * stride_grad_q
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            raw_a = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
            raw_b = tl.load(q_row + cols, mask=mask, other=0.0).to(tl.float32)
            if SYNC_TILES:
                tl.debug_barrier()
            log_p = (transformed(raw_a, softcap, logit_scale, HAS_SOFTCAP) - max_p) - log_sum_p
            log_q = (transformed(raw_b, softcap, logit_scale, HAS_SOFTCAP) - max_q) - log_sum_q
            d = (log_q - log_p) + log_odds
            prob_p = tl.exp(log_p)
            prob_q = tl.exp(log_q)
            grad_p = tl.where(prob_p == 0.0, 0.0, (scale * beta) * prob_p * (sum_ps - _softplus(d))
                              * transform_derivative(raw_a, softcap, logit_scale, HAS_SOFTCAP))
            grad_q = tl.where(prob_q == 0.0, 0.0, (scale * (1.0 - beta)) * prob_q * (sum_qt - _softplus(-d))
                              * transform_derivative(raw_b, softcap, logit_scale, HAS_SOFTCAP))
            tl.store(grad_p_row + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_q_row + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)


def jsd_epilogue(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out_p: torch.Tensor | None = None,
    grad_out_q: torch.Tensor | None = None,
    *,
    beta: float,
    block_v: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """logits_p, logits_q [C, V] float32; valid [C] bool; grad_scale [C] or None; grad_out_p, grad_out_q
    [C, V] or None (see logprob_epilogue) -> JSD [C] float32. beta: the mixture weight, 0 < beta < 1 (checked
    by the public op). softcap, logit_scale: the logit transforms.

    block_v: the vocabulary tile (a power of two; default ``block_size(V)``), smaller in tests to get many tiles.
    """
    mixture_terms = (
        float(beta),
        math.log1p(-beta) - math.log(beta),
        -beta * math.log(beta) - (1 - beta) * math.log1p(-beta),
    )
    return launch_pair(_jsd_epilogue_kernel, logits_p, logits_q, valid, grad_scale, grad_out_p, grad_out_q,
                       mixture_terms, block_v, softcap, logit_scale)
