"""Plain eager formulas of every op: the test oracle and the naive row of the benchmarks.

They materialize the full logits (N x V) and lean on PyTorch autograd. ``softcap`` and ``logit_scale`` (keyword
only, None: none) transform the logits as every backend does (``are_fast.ops.logit_transforms``). Arithmetic runs in float32, or in
float64 when the inputs are float64 (the tests upcast inputs to float64 to get the oracle). Inputs are
assumed valid: the public ops in ``are_fast.ops.functional`` check them before dispatching here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import logit_transforms


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, softcap=None,
           logit_scale=None) -> torch.Tensor:
    """[..., H] x [V, H] (+ [V]) -> [..., V] in float32 (float64 for float64 inputs), then the logit transforms
    (``are_fast.ops.logit_transforms``): softcap(logit_scale * logits)."""
    out = hidden @ weight.T
    if bias is not None:
        out = out + bias
    return logit_transforms.apply(out.to(_compute_dtype(hidden.dtype)), softcap, logit_scale)


def token_logprobs(hidden, weight, targets, bias=None, ignore_index=-100, *, softcap=None, logit_scale=None):
    """log softmax(hidden @ weight.T + bias)[target]; 0 where target == ignore_index. Shape of targets."""
    logp = torch.log_softmax(logits(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def sequence_logprobs(hidden, weight, labels, bias=None, average=False, ignore_index=-100, *, softcap=None,
                      logit_scale=None):
    """DPO's get_batch_logps: [B, T, H], [B, T] -> [B], position t scoring labels[:, t + 1]."""
    all_logits = logits(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale)[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, 0)
    per_token = torch.gather(all_logits.log_softmax(-1), 2, safe.unsqueeze(2)).squeeze(2)
    total = (per_token * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def compression_loss(hidden, weight, labels, bias=None, ignore_index=-100, *, softcap=None, logit_scale=None):
    """Token-mean cross-entropy of the shifted labels (transformers' causal-LM loss); 0 if nothing is a target."""
    all_logits = logits(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale)[:, :-1, :]
    labels = labels[:, 1:]
    count = (labels != ignore_index).sum()
    total = F.cross_entropy(
        all_logits.reshape(-1, all_logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return total / count.clamp(min=1)


def conditional_kl(hidden_p, hidden_q, weight, labels, bias=None, reduction="sum", ignore_index=-100, *, softcap=None,
                   logit_scale=None):
    """KL(softmax(W h_p) || softmax(W h_q)) at the positions that predict a non-ignored label.

    "none": [B, T] where entry t is the KL of the distributions predicting labels[:, t] (0 at t = 0);
    "sum": [B]; "mean": [B] divided by the number of targets (0 when there are none).
    """
    logp = torch.log_softmax(logits(hidden_p, weight, bias, softcap=softcap, logit_scale=logit_scale), dim=-1)
    logq = torch.log_softmax(logits(hidden_q, weight, bias, softcap=softcap, logit_scale=logit_scale), dim=-1)
    p = logp.exp()
    # p log(p / q) is 0 where p = 0 (a -inf logit, e.g. a masked vocabulary entry): not 0 * (-inf - logq) = NaN,
    # in the value or, through the masked ratio, in the gradients.
    per_position = (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)  # [B, T]: position t predicts labels[:, t + 1]
    mask = labels[:, 1:] != ignore_index
    aligned = torch.zeros_like(per_position)
    aligned[:, 1:] = per_position[:, :-1] * mask
    if reduction == "none":
        return aligned
    total = aligned.sum(-1)
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    return total


def alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n, beta=0.1, tau=0.1, ref_sign=1.0, distance=None):
    """The released stage-2 loss written as a two-way softmax: -log(e^{-s1/tau} / (e^{-s1/tau} + e^{-s2/tau}))."""
    margin = (lp_qp.unsqueeze(1) - lp_qn) + ref_sign * (ref_p.unsqueeze(1) - ref_n)
    s2 = torch.sigmoid(beta * margin)
    gap = (lp_qp - lp_pp).abs() if distance is None else distance
    s1 = torch.sigmoid(beta * gap).unsqueeze(1).expand_as(s2)
    a = torch.exp(-s1 / tau)
    b = torch.exp(-s2 / tau)
    per_pair = -torch.log(a / (a + b))
    return per_pair.sum() / max(per_pair.numel(), 1)
