"""The implementations the op benchmarks put side by side: are_fast's backends and the installed peers.

Each one turns an op's inputs (``benchmarks.cases.make_inputs``) into a scalar whose backward is the work
being timed: the sum of the op's outputs (the loss itself for compression_loss and alignment_loss).
alignment_loss is built the same way for everybody: sequence log-probs of the three decoder streams from
the implementation, then are_fast's small alignment head on [B] / [B, n] scores.

Peers (the ``bench`` extra) run the closest op they have:
- Liger-Kernel: fused linear cross-entropy (reduction="none" for per-token and per-sequence sums) and fused
  linear JSD with beta = 0, i.e. KL(teacher || student) with teacher = p and student = q; it gives no
  gradient to the teacher stream, so it does less work than conditional_kl, which differentiates both.
- torch-chunked: PyTorch's own chunked linear cross-entropy (torch >= 2.13: ``F.linear_cross_entropy`` with
  ``options=torch.nn.LinearCrossEntropyOptions()``), what users get for free; reduction="none" for per-token
  log-probs and sequence sums, "mean" for the compression loss; it has no KL op.
- Cut Cross-Entropy: ``linear_cross_entropy`` (reduction="none", shift=True for sequence sums); it has no
  KL op. On CUDA both its default (gradient filtering) and exact (filter_eps=None) modes; on CPU only its
  ``torch_compile`` implementation runs, which compiles the plain formula (it materializes the logits).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

import are_fast
from are_fast.ops.backends import resolve_backend

from are_fast.ops.registry import OPS_TABLE

from .cases import IGNORE_INDEX, NEGATIVES, OPS

# Per-implementation primitives, named by op (those it has): token_logprobs(h [N, H], W, targets [N]) -> [N];
# compression_loss(h [B, T, H], W, labels) -> scalar; sequence_logprobs(h, W, labels) -> [B]; each pair op of the
# registry (conditional_kl, conditional_jsd, ...)(h_p, h_q, W, labels) -> [B] or scalar.
Primitives = SimpleNamespace


@dataclass
class Impl:
    name: str
    kind: str  # "backend" (are_fast) or "peer"
    primitives: Callable[[torch.device], Primitives]
    skip_reason: Callable[[torch.device], "str | None"]
    ops: tuple = OPS  # the ops it has (are_fast's backends: every op)
    devices: tuple = ("cpu", "cuda")  # device types it is a candidate on (others: a device-specific variant)
    jit: bool = True  # compiles on first use: warm it up before measuring
    notes: dict = field(default_factory=dict)  # op, "trainable" or "*" -> caveat shown in the report

    def note(self, op: str, trainable: bool) -> str:
        found = [self.notes.get(op), self.notes.get("trainable") if trainable else None, self.notes.get("*")]
        return "; ".join(n for n in found if n)


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B * T]: entry t predicts labels[:, t + 1], the last position ignored."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out.reshape(-1)


def loss_fn(impl: Impl, op: str, device: torch.device) -> Callable[[SimpleNamespace], torch.Tensor]:
    """The scalar to differentiate for ``op`` under ``impl``."""
    p = impl.primitives(device)
    spec = OPS_TABLE.get(op)
    if spec is not None:  # an op of the registry, by the shape of its inputs
        fn = getattr(p, op)
        if spec.inputs == "tokens":
            return lambda x: fn(x.hidden, x.weight, x.targets).sum()
        if spec.inputs == "pair":
            return lambda x: fn(x.hidden_p, x.hidden_q, x.weight, x.labels).sum()
        return lambda x: fn(x.hidden, x.weight, x.labels).sum()
    if op == "alignment_loss":

        def alignment(x):
            lp_qp = p.sequence_logprobs(x.h_qp, x.weight, x.pos_labels)
            lp_pp = p.sequence_logprobs(x.h_pp, x.weight, x.pos_labels)
            lp_qn = p.sequence_logprobs(x.h_qn, x.weight, x.neg_labels).reshape(-1, NEGATIVES)
            return are_fast.alignment_loss(lp_qp, lp_pp, lp_qn, x.ref_p, x.ref_n)

        return alignment
    raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")


def _backend(name: str) -> Impl:
    def primitives(device):
        return SimpleNamespace(**{op: functools.partial(getattr(are_fast, op), backend=name) for op in OPS_TABLE})

    def skip_reason(device):
        if name == "triton" and device.type != "cuda":
            return "triton on CPU runs only in the Triton interpreter, whose time says nothing about the kernels"
        try:
            resolve_backend(name, device)
        except ValueError as err:
            return f"backend {name!r} is not available here: {err}"
        return None

    return Impl(name, "backend", primitives, skip_reason, jit=name not in ("reference", "chunked"))


def _missing(module: str, package: str) -> "str | None":
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed (pip install 'are_fast[bench]')"
    return None


def _liger_primitives(device):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    def per_token(h2d, w, t):
        return -flce(h2d, w, t, ignore_index=IGNORE_INDEX, reduction="none")

    def shifted_rows(h, y):
        return h[:, :-1].reshape(-1, h.shape[-1]), y[:, 1:].reshape(-1)

    def compression(h, w, y):
        rows, targets = shifted_rows(h, y)
        return flce(rows, w, targets, ignore_index=IGNORE_INDEX, reduction="mean")

    def sequence(h, w, y):
        rows, targets = shifted_rows(h, y)
        return per_token(rows, w, targets).reshape(h.shape[0], -1).sum(-1)

    def kl(hp, hq, w, y):
        size, targets = hp.shape[-1], _shifted(y)  # teacher = p, student = q: beta = 0 is KL(teacher || student)
        mean = liger_fused_linear_jsd(
            hq.reshape(-1, size), w, hp.reshape(-1, size), w, shift_labels=targets, jsd_beta=0.0,
            ignore_index=IGNORE_INDEX,
        )
        return mean * (targets != IGNORE_INDEX).sum()  # its mean over target positions, back to the sum

    return SimpleNamespace(token_logprobs=per_token, compression_loss=compression, sequence_logprobs=sequence,
                           conditional_kl=kl)


def _liger_skip(device):
    missing = _missing("liger_kernel", "Liger-Kernel")
    if missing:
        return missing
    if device.type != "cuda":
        return "Liger-Kernel's ops are Triton GPU kernels; on CPU they run only in the Triton interpreter"
    return None


def _cce_primitives(**options):
    def primitives(device):
        from cut_cross_entropy import linear_cross_entropy as lce

        def token(h2d, w, t):
            return -lce(h2d, w, t, ignore_index=IGNORE_INDEX, reduction="none", **options)

        def compression(h, w, y):
            return lce(h, w, y, ignore_index=IGNORE_INDEX, shift=True, reduction="mean", **options)

        def sequence(h, w, y):
            return -lce(h, w, y, ignore_index=IGNORE_INDEX, shift=True, reduction="none", **options).sum(-1)

        return SimpleNamespace(token_logprobs=token, compression_loss=compression, sequence_logprobs=sequence)

    return primitives


def _cce_skip(device):
    return _missing("cut_cross_entropy", "Cut Cross-Entropy")


def _torch_chunked_primitives(device):
    from torch.nn.functional import linear_cross_entropy

    def ce(h2d, w, t, reduction):
        options = torch.nn.LinearCrossEntropyOptions()
        return linear_cross_entropy(h2d, w, t, reduction=reduction, ignore_index=IGNORE_INDEX, options=options)

    def shifted(h, w, y, reduction):
        return ce(h[:, :-1].reshape(-1, h.shape[-1]), w, y[:, 1:].reshape(-1), reduction)

    return SimpleNamespace(
        token_logprobs=lambda h2d, w, t: -ce(h2d, w, t, "none"),
        compression_loss=lambda h, w, y: shifted(h, w, y, "mean"),
        sequence_logprobs=lambda h, w, y: -shifted(h, w, y, "none").reshape(h.shape[0], -1).sum(-1),
    )


def _torch_chunked_skip(device):
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (torch >= 2.13)"
    return None


_LIGER_NOTES = {
    "conditional_kl": "Liger's fused linear JSD (beta=0): no gradient to the teacher stream (p)",
    "trainable": "reduction='none' is known to give a wrong weight gradient (Liger issue 1298)",
}
# The peers have the cross-entropy ops (and the alignment loss built on them); of the pair ops only Liger's KL.
_CCE_OPS = tuple(op for op in OPS if op not in OPS_TABLE or OPS_TABLE[op].inputs != "pair")
_LIGER_OPS = _CCE_OPS + ("conditional_kl",)


def implementations() -> list[Impl]:
    """Every implementation, in table order: are_fast's backends (as registered now), then the peers."""
    impls = [_backend(name) for name in are_fast.BACKENDS]
    impls.append(Impl("torch-chunked", "peer", _torch_chunked_primitives, _torch_chunked_skip, _CCE_OPS, jit=False))
    impls.append(Impl("liger", "peer", _liger_primitives, _liger_skip, _LIGER_OPS, notes=dict(_LIGER_NOTES)))
    # CCE's Triton kernels on CUDA; on CPU its torch_compile fallback, the only implementation that runs there.
    impls.append(
        Impl("cce", "peer", _cce_primitives(), _cce_skip, _CCE_OPS, ("cuda",),
             notes={"*": "gradient filtering on (its default)"})
    )
    impls.append(Impl("cce-exact", "peer", _cce_primitives(filter_eps=None), _cce_skip, _CCE_OPS, ("cuda",)))
    impls.append(
        Impl(
            "cce-compile", "peer", _cce_primitives(impl="torch_compile"), _cce_skip, _CCE_OPS, ("cpu",),
            notes={"*": "CCE's torch.compile of the plain formula (materializes the logits)"},
        )
    )
    return impls


def floor_fn(hidden: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, trainable: bool) -> Callable[[], None]:
    """The bare matmuls of a shape: logits = h @ W.T, dh = G @ W (and dW = G.T @ h for a trainable head).

    hidden [N, H], weight [V, H], grad [N, V], all in the benchmark dtype (outputs too). Every op at that
    shape needs at least these products, whatever the implementation.
    """

    def run():
        torch.mm(hidden, weight.T)
        torch.mm(grad, weight)
        if trainable:
            torch.mm(grad.T, hidden)

    return run
