"""The products with the LM head that the chunk driver needs, in the precision it needs them.

Logits and softmax statistics are float32 (float64 for float64 inputs). The matmul operands are the head's
dtype, or under autocast (``autocast_operand_dtype``) the autocast dtype. Three modes:

- ``same``: float32/float64 operands, plain matmuls into the chunk buffer.
- ``fp32_out``: bfloat16/float16 operands, float32 accumulation and output (``torch.mm(..., out_dtype=
  torch.float32, out=buffer)``): the logits land in the chunk buffer, the epilogue writes the gradient in the
  operand dtype (``gradient_out``), the hidden gradient is one low-precision matmul, and the weight gradient is
  accumulated in place in float32 (``addmm`` with ``out_dtype`` into the accumulator where PyTorch takes a
  float32 ``self``, else one float32 scratch [V, H] per pass and an add). Chosen where a probe of the device
  finds the float32-output matmul (CUDA with a PyTorch that has ``out_dtype``; for bfloat16 a GPU with native
  bfloat16).
  Forced on a device without it (CPU), it runs a faithful emulation: the same code, with the float32-output
  products computed as float32 matmuls of the low-precision operands (exact upcasts), so tests on CPU run
  every branch the GPU runs.
- ``upcast``: low-precision operands where no float32-output matmul exists: one float32 copy of the head
  per pass, float32 matmuls.

``use_mode(mode)`` forces the mode of low-precision heads (tests; the environment variable
ARE_FAST_HEAD_MATMULS does the same: auto, fp32_out or upcast) and records every ``HeadMatmuls`` made.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from . import pair_streams
from .forcing import Forcing

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)
MODES = ("fp32_out", "upcast")  # the modes a low-precision head can be forced to
_forcing = Forcing("mode", "ARE_FAST_HEAD_MATMULS", MODES)


def use_mode(mode: str | None = None):
    """Force the mode of low-precision heads inside the block (None: automatic) and yield the list of every
    ``HeadMatmuls`` made inside it, so a test can assert which mode (and emulation) each pass used."""
    return _forcing.use(mode)


def _has_autocast(device_type: str) -> bool:
    # CPU and CUDA always have autocast; asking torch only for other devices keeps the question out of a
    # compiled graph (torch 2.11's dynamo cannot trace torch.amp.is_autocast_available).
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def autocast_operand_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype an enabled autocast region on ``device`` asks matmuls for, else None."""
    if not _has_autocast(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    return dtype if dtype in _LOW_PRECISION else None


def autocast_off(device: torch.device):
    """A context in which autocast leaves ``device``'s ops alone (HeadMatmuls picks the precision)."""
    if not _has_autocast(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


_support_cache: dict = {}


def fp32_out_support(device: torch.device, dtype: torch.dtype) -> dict:
    """What PyTorch offers on ``device`` for ``dtype`` operands with float32 outputs, probed once on tiny
    tensors (argument checks raise before any launch): {"mm": float32-output mm, "mm_out": it writes into
    ``out=``, "addmm_inplace": addmm accumulates into a float32 ``self`` given as ``out``}."""
    key = (device.type, device.index, dtype)
    if key not in _support_cache:
        found = dict(mm=False, mm_out=False, addmm_inplace=False)
        native_bf16 = device.type != "cuda" or dtype != torch.bfloat16 or torch.cuda.is_bf16_supported(False)
        if hasattr(torch.ops.aten.mm, "dtype") and native_bf16:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
            for name, probe in (
                ("mm", lambda: torch.mm(a, a, out_dtype=torch.float32)),
                ("mm_out", lambda: torch.mm(a, a, out_dtype=torch.float32, out=acc)),
                ("addmm_inplace", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
            ):
                try:
                    with torch.no_grad():
                        probe()
                    found[name] = True
                except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
                    pass
            found["mm_out"] &= found["mm"]
            found["addmm_inplace"] &= found["mm"]
        if device.type == "cuda" and not found["mm"]:
            logger.warning(
                "are_fast: no %s matmul with float32 output on %s with torch %s: low-precision LM heads run "
                "float32 matmuls on an upcast copy of the head (correct, several times slower)",
                dtype, torch.cuda.get_device_name(device), torch.__version__,
            )
        _support_cache[key] = found
    return _support_cache[key]


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with low-precision operands, float32 accumulation and output (into ``out`` when given)."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b with low-precision operands, in place."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _emulated_mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``_mm_fp32_out`` on a device without it: the upcasts are exact, so float32 matmuls give the same
    products up to summation order."""
    return torch.mm(a.to(torch.float32), b.to(torch.float32), out=out)


def _emulated_addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a.to(torch.float32), b.to(torch.float32))


# What the emulation claims to support; tests switch entries off to run the fallbacks on CPU.
EMULATED_SUPPORT = dict(mm=True, mm_out=True, addmm_inplace=True)


class HeadMatmuls:
    """The three products with the LM head, in the precision the driver needs.

    weight [V, H], bias [V] or None; operand_dtype: the matmul operands' dtype (default the weight's; autocast
    passes its low-precision dtype for a float32 head). Attributes: ``mode`` (see the module docstring),
    ``emulated`` (fp32_out without device support), ``operand_dtype``, ``compute_dtype`` (logits and
    statistics), ``grad_dtype`` (what the epilogue writes the logits' gradient as).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, operand_dtype: torch.dtype | None = None):
        operand = operand_dtype or weight.dtype
        if operand != weight.dtype and not (weight.dtype == torch.float32 and operand in _LOW_PRECISION):
            raise ValueError(f"operand_dtype: a {weight.dtype} head cannot run its matmuls in {operand}")
        self.operand_dtype = operand
        self.compute_dtype = torch.float64 if operand == torch.float64 else torch.float32
        self.emulated = False
        self._scratch = None
        if operand == self.compute_dtype:
            self.mode = "same"
        else:
            support = fp32_out_support(weight.device, operand)
            self.mode = _forcing.forced() or ("fp32_out" if support["mm"] else "upcast")
            self.emulated = self.mode == "fp32_out" and not support["mm"]
            self._support = dict(EMULATED_SUPPORT) if self.emulated else support
            self._mm = _emulated_mm_fp32_out if self.emulated else _mm_fp32_out
            self._addmm_ = _emulated_addmm_fp32_ if self.emulated else _addmm_fp32_
        self.grad_dtype = operand if self.mode == "fp32_out" else self.compute_dtype
        self.weight = weight.to(operand)  # rounded to the operand dtype first, as autocast would
        if self.mode == "upcast":
            self.weight = self.weight.to(self.compute_dtype)
        self.bias = None if bias is None else bias.to(self.compute_dtype)
        _forcing.record(self)

    def _product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """a @ b (fp32_out) written into ``out`` (float32) where PyTorch can; returns the product (``out``,
        or a fresh tensor where its float32-output matmul takes no out=)."""
        return self._mm(a, b, out) if self._support["mm_out"] else self._mm(a, b)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """hidden [C, H] -> logits [C, V] in the compute dtype, written into ``out`` [C, V] when possible (without
        the bias when ``bias`` is False)."""
        hidden = hidden.to(self.operand_dtype)
        with_bias = bias and self.bias is not None
        if self.mode == "fp32_out":
            result = self._product(hidden, self.weight.T, out)
            return result.add_(self.bias) if with_bias else result
        hidden = hidden.to(self.compute_dtype)
        if not with_bias:
            return torch.mm(hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, hidden, self.weight.T, out=out)

    def pair_logits(self, rows_p: torch.Tensor, rows_q: torch.Tensor, out_a: torch.Tensor,
                    out_b: torch.Tensor) -> list:
        """[a, b]: a pair's logits [C, V] (compute dtype) of the streams' rows [C, H], written into out_a and out_b
        when possible; b = a - (h_p - h_q) W on the rows where the streams are close
        (``are_fast.ops.pair_streams``)."""
        second, close = pair_streams.second_rows(rows_p, rows_q, self.compute_dtype)
        logits_a = self.logits(rows_p, out_a)
        products = self.logits(second, out_b, bias=False)
        return [logits_a, pair_streams.second_logits_(logits_a, products, close, self.bias)]

    def gradient_out(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Where the epilogue writes the gradient of ``logits`` [C, V] (float32, row-contiguous): None when
        it overwrites the logits in place (same dtype), else a ``grad_dtype`` view of the first half of each
        logits row's bytes ([C, V], row stride 2V): no second buffer, no cast pass. Epilogues that cannot
        write it row-sequentially (the PyTorch one) stage through a temporary (see torch_epilogues)."""
        if self.grad_dtype == logits.dtype:
            return None
        return logits.view(self.grad_dtype)[:, : logits.shape[1]]

    def hidden_grad(self, grad_logits: torch.Tensor, out: torch.Tensor) -> None:
        """out [C, H] (the hidden dtype) = grad_logits [C, V] (``grad_dtype``) @ weight."""
        if self.mode == "fp32_out" and out.dtype != self.operand_dtype:  # autocast: a float32 hidden
            result = self._product(grad_logits, self.weight, out)
            if result is not out:
                out.copy_(result)
        elif out.dtype == grad_logits.dtype:  # same, or low-precision operands with a low-precision output
            torch.mm(grad_logits, self.weight, out=out)
        else:
            out.copy_(grad_logits @ self.weight)

    def add_weight_grad(self, acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """acc [V, H] (compute dtype) += grad_logits.T [V, C] @ hidden [C, H], without a [V, H] temporary
        per chunk."""
        hidden = hidden.to(self.operand_dtype)
        if self.mode != "fp32_out":
            acc.addmm_(grad_logits.T, hidden.to(self.compute_dtype))
        elif self._support["addmm_inplace"]:
            self._addmm_(acc, grad_logits.T, hidden)
        else:  # one float32 scratch per pass, reused by every chunk
            if self._scratch is None:
                self._scratch = torch.empty_like(acc)
            acc.add_(self._product(grad_logits.T, hidden, self._scratch))
