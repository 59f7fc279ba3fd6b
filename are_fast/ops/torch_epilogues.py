"""Row epilogues in plain PyTorch: the math the ``chunked`` backend applies to each logits chunk.

An epilogue turns a chunk of logits [C, V] (float32 or float64) into per-row values [C] and, when
``grad_scale`` is given, writes the gradient of ``grad_scale * value`` with respect to them: over the logits
in place, or, when a gradient output is given, into it (any float dtype, [C, V] with contiguous rows; it may
be the low-precision view of the first half of each logits row's bytes that
``are_fast.ops.head_matmuls.HeadMatmuls.gradient_out`` makes, and the logits are then left undefined). The
gradient output is how a low-precision head gets its gradient in the dtype of the next matmul without a
separate cast pass. These PyTorch epilogues cannot write such an overlapping view row by row, so they
compute the gradient in place and stage it through one temporary (``store_gradient``).

Logit transforms (keywords ``softcap`` and ``logit_scale``, see ``are_fast.ops.logit_transforms``): the logits
come in untransformed; the statistics are over softcap(s * z) and the gradient written is the one over z. With a
gradient they are transformed in place first; a softcap then keeps its derivative in one [C, V] temporary per
stream until the gradient is formed (O(C x V) like the chunk, never N x V), a scale alone is folded into the
per-row gradient scale. The Triton kernels in
``are_fast.kernels`` implement the same two functions with the same signatures, so the chunk driver in
``are_fast.ops.chunked`` serves every backend.
"""
from __future__ import annotations

import math

import torch

from . import logit_transforms


def store_gradient(gradient: torch.Tensor, grad_out: torch.Tensor | None) -> None:
    """Copy a gradient computed in place over the logits into ``grad_out`` (None: nothing to do). When
    ``grad_out`` shares the logits' memory the copy goes through a temporary: an elementwise copy between
    overlapping tensors of different dtypes reads bytes it has already overwritten."""
    if grad_out is None:
        return
    shares = grad_out.untyped_storage().data_ptr() == gradient.untyped_storage().data_ptr()
    grad_out.copy_(gradient.to(grad_out.dtype, copy=True) if shares else gradient)


def logprob_epilogue(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """log softmax(z')[target] per row, z' = softcap(logit_scale * logits) (no transform by default).

    logits [C, V] float, targets [C] int64, grad_scale [C] float or None. Returns [C] in logits' dtype: 0 where
    target == ignore_index, NaN where the target is otherwise outside [0, V). With grad_scale, logits becomes
    grad_scale * (onehot(target) - softmax(z')) * dz'/dlogits, zero on ignored rows.
    """
    vocab = logits.shape[1]
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    safe = torch.where(in_range, targets, 0).unsqueeze(1)
    if grad_scale is None:
        log_probs = torch.log_softmax(logit_transforms.apply(logits, softcap, logit_scale), dim=1)
    else:
        derivative = logit_transforms.apply_with_derivative_(logits, softcap, logit_scale)
        log_probs = _log_softmax_in_place(logits)
    picked = log_probs.gather(1, safe).squeeze(1)
    logp = torch.where(valid, torch.where(in_range, picked, torch.nan), 0.0)
    if grad_scale is not None:
        scale = _row_scale(valid & in_range, grad_scale, logits.dtype, derivative)
        torch.exp(log_probs, out=logits).mul_(-scale)  # -scale * softmax, in place of the logits
        logits.scatter_add_(1, safe, scale)
        _chain(logits, derivative)
        store_gradient(logits, grad_out)
    return logp


def _row_scale(counted: torch.Tensor, grad_scale: torch.Tensor, dtype: torch.dtype, derivative) -> torch.Tensor:
    """[C, 1]: grad_scale where ``counted``, else 0; times the transform's derivative when it is a constant
    (a logit scale without a softcap)."""
    scale = torch.where(counted, grad_scale.to(dtype), 0.0).unsqueeze(1)
    return scale * derivative if isinstance(derivative, float) else scale


def _chain(gradient: torch.Tensor, derivative) -> None:
    """gradient over z' -> gradient over z, in place, for an elementwise derivative (a softcap's)."""
    if isinstance(derivative, torch.Tensor):
        gradient.mul_(derivative)


def _log_softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over rows, written over ``logits`` on CPU (ATen's row kernel reads each row before writing
    it): no [C, V] temporary; elsewhere a new tensor. Only where the logits become the gradient anyway."""
    if logits.device.type == "cpu":
        return torch.log_softmax(logits, dim=1, out=logits)
    return torch.log_softmax(logits, dim=1)


def kl_epilogue(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out_p: torch.Tensor | None = None,
    grad_out_q: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """KL(softmax(a) || softmax(b)) per row, with a = T(logits_p), b = T(logits_q), T(z) = softcap(logit_scale * z)
    (the identity by default); the gradients below are over a and b, then chained through T.

    logits_p, logits_q [C, V] float; valid [C] bool (False rows give 0 and zero gradients); grad_scale [C] or
    None; grad_out_p, grad_out_q [C, V] or None (where the gradients go instead of over the logits). Returns
    [C]. With grad_scale g: logits_p becomes g * p * ((a - b) - sum_v p_v (a_v - b_v)), which
    equals g * p * (log p - log q - KL), and logits_q becomes g * (q - p).
    """
    # ATen's fused log_softmax (in place on CPU), and KL as sum p (log p - log q): no cancellation between two
    # log-sum-exps; one [C, V] temporary (log p - log q). Where p = 0 (a -inf logit in p) the term is 0, not
    # 0 * (-inf - log q) = NaN; a -inf logit in q where p > 0 gives +inf.
    if grad_scale is None:  # values only: the logits stay as they are
        log_p, log_q = (torch.log_softmax(logit_transforms.apply(z, softcap, logit_scale), dim=1)
                        for z in (logits_p, logits_q))
        p = log_p.exp()
        return torch.where(valid, torch.linalg.vecdot(p, (log_p - log_q).masked_fill_(p == 0, 0.0)), 0.0)
    derivative_p = logit_transforms.apply_with_derivative_(logits_p, softcap, logit_scale)
    derivative_q = logit_transforms.apply_with_derivative_(logits_q, softcap, logit_scale)
    log_p = _log_softmax_in_place(logits_p)
    log_q = _log_softmax_in_place(logits_q)
    log_ratio = log_p - log_q
    p = torch.exp(log_p, out=logits_p)  # in place
    log_ratio.masked_fill_(p == 0, 0.0)  # so that p's gradient there is 0 * (0 - KL) = 0
    per_row = torch.linalg.vecdot(p, log_ratio)  # without a [C, V] temporary
    scale = _row_scale(valid, grad_scale, logits_p.dtype, derivative_p)
    torch.exp(log_q, out=logits_q).sub_(p).mul_(scale)  # g * (q - p)
    p.mul_(log_ratio.sub_(per_row.unsqueeze(1))).mul_(scale)  # g * p * (log p/q - KL)
    _chain(logits_p, derivative_p)
    _chain(logits_q, derivative_q)
    store_gradient(logits_p, grad_out_p)
    store_gradient(logits_q, grad_out_q)
    return torch.where(valid, per_row, 0.0)


def jsd_epilogue(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    valid: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out_p: torch.Tensor | None = None,
    grad_out_q: torch.Tensor | None = None,
    *,
    beta: float,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Generalized JSD per row: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with
    P = softmax(a), Q = softmax(b), a = T(logits_p), b = T(logits_q) as in ``kl_epilogue``; 0 < beta < 1.

    Arguments and result as ``kl_epilogue``. With s = log(m / (beta p)) = softplus(d), t = log(m / ((1 - beta) q))
    = softplus(-d), d = log q - log p + log((1 - beta) / beta): KL(P || M) = -log beta - sum p s, likewise for Q,
    and with grad_scale g logits_p becomes g * beta * p * (sum p s - s) and logits_q g * (1 - beta) * q *
    (sum q t - t) (d/dp_v of the JSD is beta log(p_v / m_v): the mixture's own terms cancel), chained through T.
    """
    # Why s and t rather than log p - log m: for streams far apart log(p / m) is close to -log beta wherever p
    # matters and the gradient is its small difference from KL(P || M); softplus keeps those small parts to full
    # relative precision. A zero probability's terms are masked to 0 (s is +inf there, or NaN where both are 0).
    if grad_scale is None:
        log_p, log_q = (torch.log_softmax(logit_transforms.apply(z, softcap, logit_scale), dim=1)
                        for z in (logits_p, logits_q))
    else:
        derivative_p = logit_transforms.apply_with_derivative_(logits_p, softcap, logit_scale)
        derivative_q = logit_transforms.apply_with_derivative_(logits_q, softcap, logit_scale)
        log_p = _log_softmax_in_place(logits_p)
        log_q = _log_softmax_in_place(logits_q)
    out_p, out_q = (logits_p, logits_q) if grad_scale is not None else (None, None)
    p, q, s, t = jsd_terms(log_p, log_q, beta, out_p, out_q)  # p, q in place of the logits with a gradient
    sum_ps = torch.linalg.vecdot(p, s)  # [C]
    sum_qt = torch.linalg.vecdot(q, t)
    if grad_scale is not None:
        jsd_gradients_(p, q, s, t, sum_ps, sum_qt, _row_scale(valid, grad_scale, logits_p.dtype, derivative_p), beta)
        _chain(logits_p, derivative_p)
        _chain(logits_q, derivative_q)
        store_gradient(logits_p, grad_out_p)
        store_gradient(logits_q, grad_out_q)
    return torch.where(valid, jsd_value(sum_ps, sum_qt, beta), 0.0)


def jsd_terms(log_p: torch.Tensor, log_q: torch.Tensor, beta: float, out_p=None, out_q=None):
    """The JSD's elementwise terms from log-probabilities log_p, log_q [C, W] (a whole row or a block of it):
    (p, q, s, t), p = exp(log_p) and q = exp(log_q) (into ``out_p``/``out_q`` when given, which may be log_p/log_q),
    s = softplus(d) and t = softplus(-d) with d = log q - log p + log((1 - beta) / beta), s masked to 0 where p is
    0 and t where q is 0. Shared by ``jsd_epilogue`` and the online sweep (``are_fast.ops.online_jsd``)."""
    d = (log_q - log_p).add_(math.log1p(-beta) - math.log(beta))
    s = torch.nn.functional.softplus(d)
    t = torch.nn.functional.softplus(d.neg_())
    p = torch.exp(log_p, out=out_p)
    q = torch.exp(log_q, out=out_q)
    s.masked_fill_(p == 0, 0.0)
    t.masked_fill_(q == 0, 0.0)
    return p, q, s, t


def jsd_gradients_(p, q, s, t, sum_ps, sum_qt, scale, beta: float) -> None:
    """In place, from ``jsd_terms``' [C, W] terms and the whole rows' sums S = sum p s, T = sum q t ([C]):
    p becomes scale * beta * p * (S - s) and q scale * (1 - beta) * q * (T - t) (the gradients over the transformed
    logits, elementwise so that close streams keep their precision); s and t are overwritten; scale [C, 1]."""
    p.mul_(s.neg_().add_(sum_ps.unsqueeze(1))).mul_(scale * beta)
    q.mul_(t.neg_().add_(sum_qt.unsqueeze(1))).mul_(scale * (1 - beta))


def jsd_value(sum_ps: torch.Tensor, sum_qt: torch.Tensor, beta: float) -> torch.Tensor:
    """The JSD [C] from the rows' sums S = sum p s and T = sum q t: H(beta) - beta S - (1 - beta) T."""
    entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)  # the JSD of two disjoint distributions
    return entropy - beta * sum_ps - (1 - beta) * sum_qt
