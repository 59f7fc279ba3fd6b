"""Input validation shared by every public op.

Every check raises ``TypeError`` (wrong kind of tensor) or ``ValueError`` (wrong shape, device or value) with
a message that names the argument and says what was expected, so bad input never reaches a kernel.

The label-range check is the only one that reads tensor values, which costs a host synchronisation. It is on
by default; turn it off for CUDA-graph capture or torch.compile with ``set_label_checks(False)`` or the
environment variable ``ARE_FAST_CHECK_LABELS=0``. With it off, an out-of-range label yields NaN, never a
silently wrong number.
"""
from __future__ import annotations

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


def check_tokens(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int
) -> None:
    """hidden [N, H] or [B, T, H]; targets with hidden's leading shape."""
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
    check_float(hidden_name, hidden)
    check_int("labels", labels)
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name}: expected [B, T, H], got shape {tuple(hidden.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:2])} ([B, T] of {hidden_name}), got {tuple(labels.shape)}")
    check_head(weight, bias, hidden.shape[-1], hidden.dtype)
    check_same_device(**{hidden_name: hidden}, weight=weight, labels=labels, bias=bias)
    check_label_range("labels", labels, weight.shape[0], ignore_index)
