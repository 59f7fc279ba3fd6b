"""Input validation shared by every public op.

Every check raises ``TypeError`` (wrong kind of tensor) or ``ValueError`` (wrong shape, device or value) with
a message that names the argument and says what was expected, so bad input never reaches a kernel.

The label-range check is the only one that reads tensor values, which costs a host synchronisation. It is on
by default; turn it off for CUDA-graph capture or torch.compile with ``set_label_checks(False)`` or the
environment variable ``ARE_FAST_CHECK_LABELS=0``. With it off, an out-of-range label yields NaN, never a
silently wrong number.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_label_checks = os.environ.get("ARE_FAST_CHECK_LABELS", "1") not in ("0", "false", "False")


def set_label_checks(enabled: bool) -> None:
    """Turn the label-range check (one host synchronisation per call) on or off."""
    global _label_checks
    _label_checks = bool(enabled)


def label_checks_enabled() -> bool:
    return _label_checks


def _expect_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    _expect_tensor(name, tensor)
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float32, bfloat16, float16 or float64), got {tensor.dtype}")


def check_int(name: str, tensor: torch.Tensor) -> None:
    _expect_tensor(name, tensor)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of token ids, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_head(weight: torch.Tensor, bias: torch.Tensor | None, hidden_size: int, hidden_dtype: torch.dtype) -> None:
    """weight: [V, H] LM head; bias: optional [V]; both of the hidden states' dtype."""
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D LM head [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden_size:
        raise ValueError(f"weight: expected [V, H] with H={hidden_size} (the hidden size), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary size V must be at least 1")
    if weight.dtype != hidden_dtype:
        raise TypeError(f"weight: expected the hidden states' dtype {hidden_dtype}, got {weight.dtype}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (one entry per vocabulary row), got {tuple(bias.shape)}")
        if bias.dtype != hidden_dtype:
            raise TypeError(f"bias: expected the hidden states' dtype {hidden_dtype}, got {bias.dtype}")


def check_label_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Reject labels outside [0, V) other than ignore_index (one host sync; skipped when checks are off).
    Under torch.compile tracing it is skipped here and runs inside the fused op instead."""
    if not _label_checks or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{name}: labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {first}"
        )


def check_ignore_index(ignore_index) -> None:
    """ignore_index: a Python int (the label value that marks non-targets)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int (the label of non-target positions, usually -100), "
                        f"got {type(ignore_index).__name__}")


def check_chunk_rows(chunk_rows) -> None:
    """chunk_rows: None (the backend's budget) or a positive int (rows per chunk of the fused backends)."""
    if chunk_rows is None:
        return
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral):
        raise TypeError(f"chunk_rows: expected None or a positive int, got {type(chunk_rows).__name__} {chunk_rows!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected None or a positive int, got {chunk_rows}")


def _check_positive(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name}: expected {what} (a finite real number), got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected {what}, got {value}")


def check_logit_transform(softcap, logit_scale) -> tuple:
    """softcap, logit_scale: None (no transform) or a positive finite real; returned as floats (or None)."""
    _check_positive_or_none("softcap", softcap, "None or a positive cap c (logits -> c tanh(logits / c))")
    _check_positive_or_none("logit_scale", logit_scale, "None or a positive scale s (logits -> s logits)")
    return tuple(None if value is None else float(value) for value in (softcap, logit_scale))


def _check_positive_or_none(name: str, value, what: str) -> None:
    if value is not None:
        _check_positive(name, value, what)


def check_alignment(lp_qp, lp_pp, lp_qn, ref_p, ref_n, beta, tau, ref_sign, distance) -> tuple:
    """Check alignment_loss's inputs ([B], [B], [B, n], [B], [B, n], optional [B] distance; beta, tau > 0,
    ref_sign +1 or -1) and return the six tensors in the compute dtype: float64 when the policy's log-probs
    ``lp_qp`` are float64 (the fused ops give float64 for float64 inputs: gradcheck, float64 oracles), else
    float32 (the documented result dtype, whatever mix of float dtypes comes in)."""
    tensors = {"lp_qp": lp_qp, "lp_pp": lp_pp, "lp_qn": lp_qn, "ref_p": ref_p, "ref_n": ref_n}
    if distance is not None:
        tensors["distance"] = distance
    for name, value in tensors.items():
        check_float(name, value)
    if lp_qp.dim() != 1:
        raise ValueError(f"lp_qp: expected [B], got shape {tuple(lp_qp.shape)}")
    batch = lp_qp.shape[0]
    for name in ("lp_pp", "ref_p", "distance"):
        if name in tensors and tuple(tensors[name].shape) != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},) like lp_qp, got {tuple(tensors[name].shape)}")
    if lp_qn.dim() != 2 or lp_qn.shape[0] != batch:
        raise ValueError(f"lp_qn: expected [B, n] with B={batch}, got shape {tuple(lp_qn.shape)}")
    if ref_n.shape != lp_qn.shape:
        raise ValueError(f"ref_n: expected the shape of lp_qn {tuple(lp_qn.shape)}, got {tuple(ref_n.shape)}")
    check_same_device(**tensors)
    _check_positive("beta", beta, "a positive scale")
    _check_positive("tau", tau, "a positive temperature")
    if ref_sign not in (1, -1) or isinstance(ref_sign, bool):
        raise ValueError(f"ref_sign: expected +1.0 (as released) or -1.0 (DPO-consistent), got {ref_sign!r}")
    dtype = torch.float64 if lp_qp.dtype == torch.float64 else torch.float32
    cast = [t.to(dtype) if t is not None else None for t in (lp_qp, lp_pp, lp_qn, ref_p, ref_n, distance)]
    return tuple(cast)


def check_tokens(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int
) -> None:
    """hidden [N, H] or [B, T, H]; targets with hidden's leading shape."""
    check_ignore_index(ignore_index)
    check_float("hidden", hidden)
    check_int("targets", targets)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(targets.shape)}"
        )
    check_head(weight, bias, hidden.shape[-1], hidden.dtype)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_label_range("targets", targets, weight.shape[0], ignore_index)


def check_sequences(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    hidden_name: str = "hidden",
) -> None:
    """hidden [B, T, H]; labels [B, T]."""
    check_ignore_index(ignore_index)
    check_float(hidden_name, hidden)
    check_int("labels", labels)
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name}: expected [B, T, H], got shape {tuple(hidden.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:2])} ([B, T] of {hidden_name}), got {tuple(labels.shape)}")
    check_head(weight, bias, hidden.shape[-1], hidden.dtype)
    check_same_device(**{hidden_name: hidden}, weight=weight, labels=labels, bias=bias)
    check_label_range("labels", labels, weight.shape[0], ignore_index)
