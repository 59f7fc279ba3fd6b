"""The public loss ops of are_fast.

Every op takes hidden states and the LM head (weight [V, H], optional bias [V]) instead of logits, so the
fused backends never hold the N x V logits; results are float32 (float64 for float64 inputs). A frozen head
(``weight.requires_grad`` False) costs no weight-gradient work at all. ``backend`` picks the implementation
(see ``are_fast.ops.backends``); ``chunk_rows`` overrides the rows per chunk of the fused backends.

Sequence ops follow the causal-LM convention: with hidden [B, T, H] and labels [B, T], position t predicts
labels[:, t + 1] (DPO's get_batch_logps, transformers' loss). Labels equal to ``ignore_index`` are skipped.

Rows that are not targets (ignore_index, or not valid for the KL) never reach the matmuls on CPU, or where
the label-range check (one host synchronisation, ``are_fast.set_label_checks(False)`` turns it off) is on:
finding them costs the same synchronisation. The fused paths are torch.library custom ops
(``are_fast.ops.autograd``): under torch.compile they are single graph nodes, so ``fullgraph=True`` compiles.
"""
from __future__ import annotations

import torch

from . import checks
from .autograd import fused_streams
from .backends import REGISTRY, reference_op, resolve_backend


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B, T] -> [B, T]: entry t is labels[:, t + 1], the last column ignore_index."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _compact(device: torch.device) -> bool:
    """Whether to leave non-target rows out of the matmuls (finding them is a host sync: free on CPU, and on
    CUDA already paid by the label check when it is on)."""
    return device.type == "cpu" or checks.label_checks_enabled()


def _token_logprobs_flat(hidden2d, weight, targets1d, bias, ignore_index, backend, chunk_rows, transform,
                         row_scale=None):
    """hidden [N, H] contiguous, targets [N] -> [N] (or, with ``row_scale`` [N], sum(row_scale * log-probs)):
    the fused path shared by the token and sequence ops. transform: (softcap, logit_scale), checked."""
    return fused_streams(
        "logprob", [hidden2d], weight, bias, targets1d.to(torch.int64), ignore_index, backend, chunk_rows,
        _compact(hidden2d.device), row_scale, transform=transform,
    )


def token_logprobs(
    hidden, weight, targets, bias=None, ignore_index=-100, *, backend=None, chunk_rows=None, softcap=None,
    logit_scale=None,
):
    """Log-probability of each target token under softmax(softcap(logit_scale * (hidden @ weight.T + bias))).

    Args:
        hidden: [N, H] or [B, T, H], float32 / bfloat16 / float16 (float64 for gradcheck).
        weight: [V, H] LM head, same dtype as hidden. bias: optional [V].
        targets: integer tensor of hidden's leading shape ([N] or [B, T]); values in [0, V) or ignore_index.
        softcap, logit_scale: None (no transform) or a positive float: the logits become s * z, then
            c * tanh(z / c) (Gemma 2/3's final_logit_softcapping, Cohere's logit_scale, Granite's
            1 / logits_scaling); the same keywords on every op that takes a head.
    Returns:
        float32 tensor of targets' shape; 0 where the target is ignore_index.

    Example:
        >>> logp = are_fast.token_logprobs(h, lm_head.weight, target_ids)   # [N]
    """
    checks.check_tokens(hidden, weight, targets, bias, ignore_index)
    checks.check_chunk_rows(chunk_rows)
    softcap, logit_scale = transform = checks.check_logit_transform(softcap, logit_scale)
    name = resolve_backend(backend, hidden.device)
    if not REGISTRY[name].fused:
        return reference_op("token_logprobs")(
            hidden, weight, targets, bias, ignore_index, softcap=softcap, logit_scale=logit_scale
        )
    flat = _token_logprobs_flat(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, targets.reshape(-1), bias, ignore_index, name,
        chunk_rows, transform,
    )
    return flat.reshape(targets.shape)


def sequence_logprobs(
    hidden, weight, labels, bias=None, average=False, ignore_index=-100, *, backend=None, chunk_rows=None,
    softcap=None, logit_scale=None,
):
    """Sum (``average=True``: mean) of the log-probs of each sequence's non-ignored shifted targets.

    Args:
        hidden: [B, T, H]; weight: [V, H]; labels: [B, T] integer, position t predicting labels[:, t + 1].
        softcap, logit_scale: the logit transforms, as in ``token_logprobs``.
    Returns:
        [B] float32; a sequence without targets gives 0 (also with ``average=True``).
        Applied to the decoder streams of negatives this is the negative-sample likelihood term.

    Example:
        >>> lp_qn = are_fast.sequence_logprobs(h_neg, lm_head.weight, neg_labels)   # [B]
    """
    checks.check_sequences(hidden, weight, labels, bias, ignore_index)
    checks.check_chunk_rows(chunk_rows)
    softcap, logit_scale = transform = checks.check_logit_transform(softcap, logit_scale)
    name = resolve_backend(backend, hidden.device)
    if not REGISTRY[name].fused:
        return reference_op("sequence_logprobs")(
            hidden, weight, labels, bias, average, ignore_index, softcap=softcap, logit_scale=logit_scale
        )
    targets = _shifted_targets(labels, ignore_index)
    per_token = _token_logprobs_flat(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, targets.reshape(-1), bias, ignore_index, name,
        chunk_rows, transform,
    ).reshape(labels.shape)
    total = per_token.sum(-1)
    if average:
        return total / (targets != ignore_index).sum(-1).clamp(min=1)
    return total


def compression_loss(
    hidden, weight, labels, bias=None, ignore_index=-100, *, backend=None, chunk_rows=None, softcap=None,
    logit_scale=None,
):
    """Stage-1 loss: token-mean cross-entropy of the shifted labels, equal to transformers' causal-LM loss.

    Args:
        hidden: [B, T, H] final hidden states of the decoder; weight: [V, H]; labels: [B, T].
        softcap, logit_scale: the logit transforms, as in ``token_logprobs``.
    Returns:
        scalar float32; 0 (not NaN) when no label is a target.

    Example:
        >>> loss = are_fast.compression_loss(decoder_hidden, lm_head.weight, labels); loss.backward()
    """
    checks.check_sequences(hidden, weight, labels, bias, ignore_index)
    checks.check_chunk_rows(chunk_rows)
    softcap, logit_scale = transform = checks.check_logit_transform(softcap, logit_scale)
    name = resolve_backend(backend, hidden.device)
    if not REGISTRY[name].fused:
        return reference_op("compression_loss")(
            hidden, weight, labels, bias, ignore_index, softcap=softcap, logit_scale=logit_scale
        )
    targets = _shifted_targets(labels, ignore_index).reshape(-1)
    # The per-row scale of the loss is known now, so every gradient (the head's too) comes out of this pass.
    valid = targets != ignore_index
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    row_scale = valid.to(compute) / -valid.sum().clamp(min=1).to(compute)
    return _token_logprobs_flat(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, targets, bias, ignore_index, name, chunk_rows,
        transform, row_scale,
    )


def conditional_kl(
    hidden_p, hidden_q, weight, labels, bias=None, reduction="sum", ignore_index=-100, *, backend=None, chunk_rows=None,
    softcap=None, logit_scale=None,
):
    """KL(softmax(W h_p,t) || softmax(W h_q,t)) over the target positions of each sequence.

    The conditional-distribution distance between two decoder streams of the same text (e.g. pos|c(q) and
    pos|c(pos)). Differentiable with respect to both hidden inputs, and the head when it requires grad.

    Args:
        hidden_p, hidden_q: [B, T, H], same shape and dtype; weight: [V, H]; labels: [B, T] (only which
            positions are targets matters: position t counts when labels[:, t + 1] != ignore_index).
        reduction: "sum" -> [B]; "mean" -> [B] per-sequence mean (0 without targets); "none" -> [B, T]
            aligned with labels: entry t is the KL of the distributions predicting labels[:, t], 0 at t = 0
            and where labels[:, t] is ignored.
        softcap, logit_scale: the logit transforms, as in ``token_logprobs``; both streams get the same.
    Returns:
        float32 tensor as above.

    Example:
        >>> d = are_fast.conditional_kl(h_pos_given_q, h_pos_given_pos, lm_head.weight, pos_labels)   # [B]
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")
    checks.check_sequences(hidden_p, weight, labels, bias, ignore_index, hidden_name="hidden_p")
    checks.check_chunk_rows(chunk_rows)
    checks.check_float("hidden_q", hidden_q)
    if hidden_q.shape != hidden_p.shape or hidden_q.dtype != hidden_p.dtype:
        raise ValueError(
            f"hidden_q: expected shape {tuple(hidden_p.shape)} and dtype {hidden_p.dtype} (those of hidden_p), "
            f"got {tuple(hidden_q.shape)} {hidden_q.dtype}"
        )
    checks.check_same_device(hidden_p=hidden_p, hidden_q=hidden_q)
    softcap, logit_scale = transform = checks.check_logit_transform(softcap, logit_scale)
    name = resolve_backend(backend, hidden_p.device)
    if not REGISTRY[name].fused:
        return reference_op("conditional_kl")(
            hidden_p, hidden_q, weight, labels, bias, reduction, ignore_index, softcap=softcap, logit_scale=logit_scale
        )
    valid = (_shifted_targets(labels, ignore_index) != ignore_index).reshape(-1)
    size = hidden_p.shape[-1]
    per_position = fused_streams(
        "kl",
        [hidden_p.reshape(-1, size).contiguous(), hidden_q.reshape(-1, size).contiguous()],
        weight,
        bias,
        valid,
        ignore_index,
        name,
        chunk_rows,
        _compact(hidden_p.device),
        transform=transform,
    ).reshape(labels.shape)  # position t: the distributions predicting labels[:, t + 1]
    if reduction == "none":
        return torch.cat([per_position.new_zeros(labels.shape[0], 1), per_position[:, :-1]], dim=1)
    total = per_position.sum(-1)
    if reduction == "mean":
        return total / valid.reshape(labels.shape).sum(-1).clamp(min=1)
    return total


def alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n, beta=0.1, tau=0.1, ref_sign=1.0, distance=None):
    """The released stage-2 (conditional distribution alignment) loss.

    Args:
        lp_qp: [B] log p(pos | c(q)); lp_pp: [B] log p(pos | c(pos)); lp_qn: [B, n] log p(neg_j | c(q)).
        ref_p: [B], ref_n: [B, n]: the same two scores from the frozen stage-1 model (no gradient flows).
        beta, tau: sigmoid and temperature scales.
        ref_sign: +1 (default) adds the reference margin as the released code does, so numbers match it;
            -1 subtracts it, the DPO-consistent variant (the policy margin measured against the reference).
        distance: optional [B] per-sequence distance (e.g. ``conditional_kl``) replacing |lp_qp - lp_pp|.
    Returns:
        float32 scalar (float64 when lp_qp is float64): mean over (i, j) of softplus((s1_i - s2_ij) / tau), where
        m_ij = (lp_qp_i - lp_qn_ij) + ref_sign * (ref_p_i - ref_n_ij), s2_ij = sigmoid(beta * m_ij),
        s1_i = sigmoid(beta * |lp_qp_i - lp_pp_i|) (or sigmoid(beta * distance_i)).
        This equals -log(e^{-s1/tau} / (e^{-s1/tau} + e^{-s2/tau})).
    """
    lp_qp, lp_pp, lp_qn, ref_p, ref_n, distance = checks.check_alignment(
        lp_qp, lp_pp, lp_qn, ref_p, ref_n, beta, tau, ref_sign, distance)
    margin = (lp_qp.unsqueeze(1) - lp_qn) + ref_sign * (ref_p.unsqueeze(1) - ref_n)
    s2 = torch.sigmoid(beta * margin)
    gap = (lp_qp - lp_pp).abs() if distance is None else distance
    s1 = torch.sigmoid(beta * gap).unsqueeze(1)
    per_pair = torch.nn.functional.softplus((s1 - s2) / tau)
    return per_pair.sum() / max(per_pair.numel(), 1)  # an empty batch gives 0, not NaN
