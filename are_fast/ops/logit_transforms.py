"""Logit transforms of the fused ops: ``logit_scale`` (z -> s z), then ``softcap`` (z -> c tanh(z / c)).

Some causal LMs change their logits after the head: Gemma 2 and Gemma 3 cap them (``final_logit_softcapping``,
c = 30), Cohere multiplies them (``logit_scale``), Granite divides them (``logits_scaling``: s = 1 / that).
Every op that takes a head computes its logits as softcap(s * (h W^T + b)), in that order, in float32 (float64
for float64 inputs); None means no transform. The gradient goes back through dz'/dz = s (1 - tanh^2(s z / c))
(just s without a softcap), formed while the transformed logits are still at hand, since the epilogues write
the gradient over them.
"""
from __future__ import annotations

import torch


def apply(logits: torch.Tensor, softcap: float | None, logit_scale: float | None) -> torch.Tensor:
    """softcap(logit_scale * logits), out of place (differentiable by autograd): any shape, same dtype."""
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def apply_(logits: torch.Tensor, softcap: float | None, logit_scale: float | None) -> torch.Tensor:
    """In place: ``logits`` (any shape) becomes softcap(logit_scale * logits); returns it."""
    if logit_scale is not None:
        logits.mul_(logit_scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def apply_with_derivative_(logits: torch.Tensor, softcap: float | None, logit_scale: float | None,
                           out: torch.Tensor | None = None):
    """``apply_``, and returns dz'/dz: None without a transform, the float ``logit_scale`` without a softcap,
    else a tensor of the logits' shape (``out`` when given) holding s / cosh^2(s z / c) elementwise. It is
    formed from the argument of tanh, not as 1 - tanh^2: that would lose every digit where tanh rounds to 1
    (a logit a few caps out), while 1 / cosh^2 keeps its relative precision (and is 0, not NaN, where cosh
    overflows)."""
    if softcap is None:
        apply_(logits, None, logit_scale)
        return logit_scale
    argument = logits.mul_((1.0 if logit_scale is None else logit_scale) / softcap)
    derivative = torch.cosh(argument, out=out).square_().reciprocal_()
    if logit_scale is not None:
        derivative.mul_(logit_scale)
    argument.tanh_().mul_(softcap)
    return derivative

