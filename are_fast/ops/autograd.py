"""The fused ops as torch.library custom ops, with fake (shape-only) implementations and autograd.

``are_fast::linear_streams`` maps 1+ streams of hidden states [N, H] through a shared LM head to per-row values
[N] given by a row epilogue (``kind``, one of ``are_fast.ops.registry.KINDS``: "logprob", the log-probability
of a target; "kl" and "jsd", divergences between two streams), on a fused backend. Being a custom op, it is
one opaque node for torch.compile (``fullgraph=True`` compiles; the fake implementation gives the shapes) and
for autograd. What it computes and saves depends on ``mode``, which the caller picks from what needs a gradient:
- "values": values only (nothing needs a gradient, e.g. reference scores under inference_mode);
- "rescale" (frozen head): the hidden gradients of each row at unit scale are computed in the forward, so the
  backward only rescales rows, in place (no recomputation, no weight-gradient work, one [N, H] per stream);
- "scalar" (a loss whose per-row scale ``row_scale`` is known in the forward, e.g. compression_loss): every
  gradient of ``total = sum(row_scale * values)``, the head's included, is computed in the forward, so a
  trainable head costs 3 matmuls per chunk; the backward scales them in place by d loss / d total;
- "recompute" (trainable head, per-row output): the backward recomputes the logits, block by block with the
  per-row log-sum-exp the online sweep's forward saved (log-probabilities on the ``online`` backend), else chunk
  by chunk. A trainable bf16/fp16 head whose sweep runs low-precision matmuls takes it for a known row scale
  too (its gradient flows through ``total``): the chunk driver's "scalar" pass would multiply a float32 copy.

The in-place scaling means one backward per forward: a second one (``retain_graph=True``, gradcheck) raises,
saying so, unless the forward ran under ``allow_retain_graph()`` (then the backward scales a copy, one more
[N, H] per stream). torch's own chunked ``F.linear_cross_entropy`` makes the same trade (its
``allow_retain_graph`` option).

Rows whose label is ignore_index (for the KL: rows that are not valid) never reach the matmuls when
``compact`` is set (it costs a host sync to find them, so the public ops set it on CPU, or when the label
checks, which sync anyway, are on).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import checks, online, registry, sweep_precision
from .backends import REGISTRY, epilogue
from .chunked import fused_linear_pass
from .head_matmuls import autocast_off, autocast_operand_dtype

MODES = ("values", "rescale", "scalar", "recompute")
_retain_graph = [False]


@contextlib.contextmanager
def allow_retain_graph(enabled: bool = True):
    """Ops run in this context keep their saved gradients intact in the backward, so it may run again
    (retain_graph=True, torch.autograd.gradcheck), at the cost of one more [N, H] per stream."""
    previous, _retain_graph[0] = _retain_graph[0], enabled
    try:
        yield
    finally:
        _retain_graph[0] = previous
_NONE = (0,)  # shape of the placeholder returned for a gradient that was not asked for


def _epilogue(kind: str, backend: str, labels: Tensor, ignore_index: int, transform: dict, params):
    """The chunk driver's epilogue (``chunked.Epilogue``) of ``kind`` on ``backend``; ``params``: the kind's float
    parameters in the order of its ``Kind.params``."""
    spec = registry.kind(kind)
    impl = epilogue(kind, backend)
    options = dict(transform, **dict(zip(spec.params, params)))
    if spec.row_label == "target":
        def run(logits, rows, grad_scale, grad_outs):
            return impl(logits[0], labels[rows], ignore_index, grad_scale, grad_outs[0], **options)
    else:
        def run(logits, rows, grad_scale, grad_outs):
            return impl(*logits, labels[rows], grad_scale, *grad_outs, **options)
    return run


def _rows(kind: str, labels: Tensor, ignore_index: int, compact: bool) -> Tensor | None:
    """int64 [M] indices of the rows that count, or None (all rows, or compaction off)."""
    if not compact or labels.numel() == 0:
        return None
    keep = labels != ignore_index if registry.kind(kind).row_label == "target" else labels
    rows = keep.nonzero().squeeze(1)
    return None if rows.numel() == labels.numel() else rows


def _runs_online(kind, backend, weight, bias, operand_dtype, weight_grad=False, bias_grad=False) -> bool:
    """Whether a pass with these gradients runs the online sweep (``are_fast.ops.online``) on ``backend``: a kind
    without a sweep runs on the chunk driver."""
    if not REGISTRY[backend].online or not online.supported(weight, bias, operand_dtype, weight_grad, bias_grad):
        return False
    if registry.kind(kind).online is None:
        registry.say_once(f"are_fast: no online sweep for {kind!r}; the online backend runs it on the chunk driver")
        return False
    return True


def _online_log_norms(kind, backend, weight, bias, operand_dtype) -> bool:
    """Whether a "recompute" forward runs the online logprob sweep, which also returns each row's log-sum-exp
    (saved, so that the backward sweeps with the final probabilities: ``online.online_weight_pass``)."""
    return kind == "logprob" and _runs_online(kind, backend, weight, bias, operand_dtype)


@torch.compiler.assume_constant_result  # the machine's and the dtypes' answer, read once at trace time
def _low_precision_sweep(kind, backend, weight, bias, operand_dtype) -> bool:
    """Whether a "recompute" pass of ``kind`` would run the online sweep with low-precision block matmuls."""
    return (_online_log_norms(kind, backend, weight, bias, operand_dtype)
            and online.block_operand_dtype(weight, operand_dtype) in sweep_precision.LOW_PRECISION)


def _pass(kind, hiddens, weight, bias, labels, ignore_index, backend, chunk_rows, compact, operand_dtype, transform,
          params, **grads):
    """transform: dict(softcap=..., logit_scale=...), the logit transforms (None: none); params: the kind's."""
    rows = _rows(kind, labels, ignore_index, compact)
    if _runs_online(kind, backend, weight, bias, operand_dtype, grads.get("weight_grad", False), grads.get("bias_grad", False)):
        with autocast_off(weight.device):  # the sweep picks its precision (operand_dtype), not autocast
            return online.online_pass(
                kind, hiddens, weight, bias, labels, ignore_index, grads.get("grad_scale"),
                grads.get("hidden_grads", ()), rows, block_rows=chunk_rows or None, operand_dtype=operand_dtype,
                params=dict(zip(registry.kind(kind).params, params)), **transform,
            )
    return fused_linear_pass(
        hiddens, weight, bias, _epilogue(kind, backend, labels, ignore_index, transform, params),
        chunk_rows=chunk_rows or None, rows=rows, operand_dtype=operand_dtype, **grads,
    )


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty(_NONE)


@torch.library.custom_op("are_fast::linear_streams", mutates_args=())
def linear_streams(
    kind: str,
    hiddens: list[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    row_scale: Optional[Tensor],
    ignore_index: int,
    backend: str,
    chunk_rows: int,
    compact: bool,
    mode: str,
    hidden_grads: list[bool],
    weight_grad: bool,
    bias_grad: bool,
    check_labels: bool,
    operand_dtype: Optional[torch.dtype],
    softcap: Optional[float],
    logit_scale: Optional[float],
    params: list[float],
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    """-> values [N] (compute dtype), total (scalar: sum(row_scale * values), 0 without row_scale),
    hidden gradients (one per stream, [N, H]; shape [0] where not computed), weight gradient [V, H] and bias
    gradient [V] (shape [0] where not computed), and in "recompute" mode on the online sweep each row's
    log-sum-exp [N] (shape [0] otherwise). Gradients are computed in the forward only in the "rescale"
    (unit scale) and "scalar" (scale ``row_scale`` [N]) modes. operand_dtype: the matmuls' operand dtype
    (autocast's, read by the caller outside the op; None: the head's). softcap, logit_scale: the logit
    transforms (``are_fast.ops.logit_transforms``; None: none), already checked. params: the float parameters of
    ``kind`` (``registry.Kind.params``, e.g. JSD's beta), already checked."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if check_labels and registry.kind(kind).row_label == "target":  # the public op's check, moved here when it was traced by torch.compile
        checks.check_label_range("labels", labels, weight.shape[0], ignore_index)
    in_forward = mode in ("rescale", "scalar")
    scale = None
    if in_forward:
        scale = row_scale if mode == "scalar" else torch.ones(labels.shape[0], dtype=torch.float32, device=weight.device)
    result = _pass(
        kind, hiddens, weight, bias, labels, ignore_index, backend, chunk_rows, compact, operand_dtype,
        dict(softcap=softcap, logit_scale=logit_scale), params, grad_scale=scale,
        hidden_grads=hidden_grads if in_forward else (),
        weight_grad=weight_grad and mode == "scalar",
        bias_grad=bias_grad and mode == "scalar",
    )
    values = result.values
    total = (values * row_scale).sum() if row_scale is not None else values.new_zeros(())
    dh = [g if g is not None else _placeholder(h) for g, h in zip(result.hidden_grads or [None] * len(hiddens), hiddens)]
    dw = result.weight_grad if result.weight_grad is not None else _placeholder(weight)
    db = result.bias_grad if result.bias_grad is not None else _placeholder(weight)
    keep_norms = mode == "recompute" and _online_log_norms(kind, backend, weight, bias, operand_dtype)
    log_norms = result.log_norms if keep_norms else _placeholder(values)
    return values, total, dh, dw, db, log_norms


@linear_streams.register_fake
def _(kind, hiddens, weight, bias, labels, row_scale, ignore_index, backend, chunk_rows, compact, mode,
      hidden_grads, weight_grad, bias_grad, check_labels, operand_dtype, softcap, logit_scale, params):
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n = hiddens[0].shape[0]
    in_forward = mode in ("rescale", "scalar")
    values = weight.new_empty((n,), dtype=compute)
    dh = [h.new_empty(h.shape) if in_forward and need else h.new_empty(_NONE) for h, need in zip(hiddens, hidden_grads)]
    scalar = mode == "scalar"
    dw = weight.new_empty(weight.shape if scalar and weight_grad else _NONE)
    db = weight.new_empty((weight.shape[0],) if scalar and bias_grad and bias is not None else _NONE)
    if bias is not None:
        db = db.to(bias.dtype)
    keep_norms = mode == "recompute" and _online_log_norms(kind, backend, weight, bias, operand_dtype)
    return values, values.new_empty(()), dh, dw, db, values.new_empty((n,) if keep_norms else _NONE)


@torch.library.custom_op("are_fast::linear_streams_backward", mutates_args=())
def linear_streams_backward(
    kind: str,
    hiddens: list[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    grad_values: Tensor,
    log_norms: Tensor,
    ignore_index: int,
    backend: str,
    chunk_rows: int,
    compact: bool,
    hidden_grads: list[bool],
    weight_grad: bool,
    bias_grad: bool,
    operand_dtype: Optional[torch.dtype],
    softcap: Optional[float],
    logit_scale: Optional[float],
    params: list[float],
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The "recompute" backward: gradients of sum(grad_values * values), recomputing the logits block by block
    with the forward's per-row log-sum-exp (``log_norms`` [N], the online sweep) or chunk by chunk (shape [0])."""
    transform = dict(softcap=softcap, logit_scale=logit_scale)
    if log_norms.numel():
        with autocast_off(weight.device):
            result = online.online_weight_pass(
                hiddens[0], weight, bias, labels, ignore_index, grad_values.contiguous(), log_norms, hidden_grads[0],
                weight_grad, bias_grad and bias is not None, _rows(kind, labels, ignore_index, compact),
                chunk_rows or None, operand_dtype=operand_dtype, **transform,
            )
    else:
        result = _pass(
            kind, hiddens, weight, bias, labels, ignore_index, backend, chunk_rows, compact, operand_dtype, transform,
            params, grad_scale=grad_values.contiguous(), hidden_grads=hidden_grads, weight_grad=weight_grad,
            bias_grad=bias_grad and bias is not None,
        )
    dh = [g if g is not None else _placeholder(h) for g, h in zip(result.hidden_grads, hiddens)]
    dw = result.weight_grad if result.weight_grad is not None else _placeholder(weight)
    db = result.bias_grad if result.bias_grad is not None else _placeholder(weight)
    return dh, dw, db


@linear_streams_backward.register_fake
def _(kind, hiddens, weight, bias, labels, grad_values, log_norms, ignore_index, backend, chunk_rows, compact,
      hidden_grads, weight_grad, bias_grad, operand_dtype, softcap, logit_scale, params):
    dh = [h.new_empty(h.shape if need else _NONE) for h, need in zip(hiddens, hidden_grads)]
    dw = weight.new_empty(weight.shape if weight_grad else _NONE)
    db = weight.new_empty((weight.shape[0],) if bias_grad and bias is not None else _NONE)
    return dh, dw, db if bias is None else db.to(bias.dtype)


@torch.library.custom_op("are_fast::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """grad [N, H] (or any shape) *= scale ([N] per row, or a scalar), in place: the saved forward gradient
    becomes the gradient the backward returns, with no second [N, H]."""
    grad.mul_(scale.reshape(scale.shape + (1,) * (grad.dim() - scale.dim())))


@scale_rows_.register_fake
def _(grad, scale):
    return None


def _setup_context(ctx, inputs, output):
    (kind, hiddens, weight, bias, labels, row_scale, ignore_index, backend, chunk_rows, compact, mode,
     hidden_grads, weight_grad, bias_grad, _, operand_dtype, softcap, logit_scale, params) = inputs
    values, total, dh, dw, db, log_norms = output
    ctx.mode, ctx.streams = mode, len(hiddens)
    ctx.hidden_grads, ctx.weight_grad, ctx.bias_grad = list(hidden_grads), weight_grad, bias_grad and bias is not None
    ctx.options = (kind, ignore_index, backend, chunk_rows, compact, operand_dtype, softcap, logit_scale, params)
    ctx.in_place, ctx.done = not _retain_graph[0], False
    # The gradient outputs (dh, dw, db) never receive a gradient: without this autograd would hand the backward
    # a zero tensor of each one's shape (one more [N, H] per stream, and [V, H]).
    ctx.set_materialize_grads(False)
    if mode in ("rescale", "scalar"):
        ctx.save_for_backward(*dh, dw, db)
    elif mode == "recompute":
        ctx.save_for_backward(weight, bias, labels, log_norms, row_scale, *hiddens)


def _backward(ctx, grad_values, grad_total, *unused):
    nones = [None] * 19  # one per input of linear_streams
    hidden_slot, weight_slot, bias_slot = 1, 2, 3
    nones[hidden_slot] = [None] * ctx.streams  # the hiddens input is a list: its gradient is one too
    # The kind's params: torch's input structure takes an empty list as a list (its gradient: []) and a list of
    # floats as one leaf (its gradient: None).
    nones[-1] = None if ctx.options[-1] else []
    upstream = grad_total if ctx.mode == "scalar" else grad_values
    row_scale = ctx.saved_tensors[4] if ctx.mode == "recompute" else None
    if row_scale is not None and grad_total is not None:  # d total / d values = row_scale
        upstream = grad_total * row_scale if upstream is None else upstream + grad_total * row_scale
    if ctx.mode == "values" or upstream is None:  # None: the output was not used, so no gradient flows
        return tuple(nones)
    if ctx.mode in ("rescale", "scalar"):
        if ctx.done:
            raise RuntimeError(
                "are_fast: a second backward through a fused op whose forward gradients were already scaled in "
                "place; run the forward under are_fast.ops.autograd.allow_retain_graph() to backpropagate twice"
            )
        ctx.done = ctx.in_place
        *dh, dw, db = ctx.saved_tensors
        scale = upstream

        def scaled(grad):
            grad = grad if ctx.in_place else grad.clone()
            scale_rows_(grad, scale)
            return grad

        nones[hidden_slot] = [scaled(g) if need else None for need, g in zip(ctx.hidden_grads, dh)]
        if ctx.mode == "scalar":
            nones[weight_slot] = scaled(dw) if ctx.weight_grad else None
            nones[bias_slot] = scaled(db) if ctx.bias_grad else None
        return tuple(nones)
    weight, bias, labels, log_norms, _, *hiddens = ctx.saved_tensors
    kind, ignore_index, backend, chunk_rows, compact, operand_dtype, softcap, logit_scale, params = ctx.options
    dh, dw, db = linear_streams_backward(
        kind, hiddens, weight, bias, labels, upstream, log_norms, ignore_index, backend, chunk_rows, compact,
        ctx.hidden_grads, ctx.weight_grad, ctx.bias_grad, operand_dtype, softcap, logit_scale, params,
    )
    nones[hidden_slot] = [g if need else None for g, need in zip(dh, ctx.hidden_grads)]
    nones[weight_slot] = dw if ctx.weight_grad else None
    nones[bias_slot] = db if ctx.bias_grad else None
    return tuple(nones)


linear_streams.register_autograd(_backward, setup_context=_setup_context)


def fused_streams(kind, hiddens, weight, bias, labels, ignore_index, backend, chunk_rows, compact, row_scale=None,
                  transform=(None, None), params=()):
    """Values [N] (``row_scale`` None) or the scalar sum(row_scale * values) (``row_scale`` [N] float32), through
    ``are_fast::linear_streams`` in the mode that what needs a gradient calls for.

    hiddens: contiguous [N, H] per stream; labels: int64 targets [N] or bool valid [N], as the kind's
    ``row_label`` says; transform: (softcap, logit_scale) as checked by ``checks.check_logit_transform``;
    params: the kind's float parameters (``registry.Kind.params``), checked.
    """
    grad_on = torch.is_grad_enabled()
    need_hidden = [grad_on and h.requires_grad for h in hiddens]
    need_weight = grad_on and weight.requires_grad
    need_bias = grad_on and bias is not None and bias.requires_grad
    # Under autocast the head's matmuls run in its dtype, in the backward too (which runs outside it).
    operand_dtype = autocast_operand_dtype(weight.device) if weight.dtype == torch.float32 else None
    if row_scale is not None and (need_weight or need_bias) and _low_precision_sweep(
            kind, backend, weight, bias, operand_dtype):
        # A trainable head in bf16/fp16: two low-precision sweeps (values, then every gradient) beat the one
        # "scalar" pass of the chunk driver, whose matmuls run on a float32 copy of the head.
        mode = "recompute"
    elif row_scale is not None and (need_weight or need_bias or any(need_hidden)):
        mode = "scalar"
    elif need_weight or need_bias:
        mode = "recompute"
    elif any(need_hidden):
        mode = "rescale"
    else:
        mode = "values"
    values, total, _, _, _, _ = linear_streams(
        kind, list(hiddens), weight, bias, labels, row_scale, ignore_index, backend, chunk_rows or 0, compact, mode,
        need_hidden, need_weight, need_bias, torch.compiler.is_compiling() and checks.label_checks_enabled(),
        operand_dtype, *transform, [float(p) for p in params],
    )
    return values if row_scale is None else total
