"""nn.Module wrappers of the public ops: they only store options and call ``are_fast.ops.functional``.
The head-taking ones take the logit transforms ``softcap`` and ``logit_scale`` (keyword only) as the ops do."""
from __future__ import annotations

import torch

from . import functional as F
from .checks import check_logit_transform


def _transform(softcap, logit_scale) -> dict:
    """The logit-transform keywords of a head-taking op, checked when the module is built."""
    softcap, logit_scale = check_logit_transform(softcap, logit_scale)
    return dict(softcap=softcap, logit_scale=logit_scale)


class CompressionLoss(torch.nn.Module):
    """Stage-1 loss module: ``forward(hidden [B, T, H], weight [V, H], labels [B, T], bias=None) -> scalar``."""

    def __init__(self, ignore_index: int = -100, backend: str | None = None, *, softcap: float | None = None,
                 logit_scale: float | None = None):
        super().__init__()
        self.ignore_index, self.backend = ignore_index, backend
        self.transform = _transform(softcap, logit_scale)

    def forward(self, hidden, weight, labels, bias=None):
        return F.compression_loss(hidden, weight, labels, bias, self.ignore_index, backend=self.backend, **self.transform)


class SequenceLogprobs(torch.nn.Module):
    """``forward(hidden [B, T, H], weight [V, H], labels [B, T], bias=None) -> [B]`` sequence log-likelihoods."""

    def __init__(self, average: bool = False, ignore_index: int = -100, backend: str | None = None, *,
                 softcap: float | None = None, logit_scale: float | None = None):
        super().__init__()
        self.average, self.ignore_index, self.backend = average, ignore_index, backend
        self.transform = _transform(softcap, logit_scale)

    def forward(self, hidden, weight, labels, bias=None):
        return F.sequence_logprobs(
            hidden, weight, labels, bias, self.average, self.ignore_index, backend=self.backend, **self.transform
        )


class ConditionalKL(torch.nn.Module):
    """``forward(hidden_p, hidden_q [B, T, H], weight [V, H], labels [B, T], bias=None)`` -> KL per sequence."""

    def __init__(self, reduction: str = "sum", ignore_index: int = -100, backend: str | None = None, *,
                 softcap: float | None = None, logit_scale: float | None = None):
        super().__init__()
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.transform = _transform(softcap, logit_scale)

    def forward(self, hidden_p, hidden_q, weight, labels, bias=None):
        return F.conditional_kl(
            hidden_p, hidden_q, weight, labels, bias, self.reduction, self.ignore_index, backend=self.backend,
            **self.transform,
        )


class AlignmentLoss(torch.nn.Module):
    """Stage-2 loss module: ``forward(lp_qp, lp_pp, lp_qn, ref_p, ref_n, distance=None) -> scalar``."""

    def __init__(self, beta: float = 0.1, tau: float = 0.1, ref_sign: float = 1.0):
        super().__init__()
        self.beta, self.tau, self.ref_sign = beta, tau, ref_sign

    def forward(self, lp_qp, lp_pp, lp_qn, ref_p, ref_n, distance=None):
        return F.alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n, self.beta, self.tau, self.ref_sign, distance)
