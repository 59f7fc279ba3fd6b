"""The block products of the online sweeps (``are_fast.ops.online``), in the operand dtype the sweep runs in.

Full-precision operands (float32, float64): plain matmuls into and onto the sweep's compute-dtype buffers.
Low-precision operands (bfloat16, float16; ``are_fast.ops.sweep_precision`` picks when): PyTorch's CPU matmul
(oneDNN: AMX or AVX512-BF16) multiplies them with float32 accumulation but writes its output in the operand
dtype, and has no float32-output form (``mm(..., out_dtype=float32)`` is CUDA-only). So each product lands in a
low-precision scratch block and is upcast (a logits block, as naive bf16 code gets its logits) or added
(a block's share of an accumulator) into float32: every running statistic and every sum over blocks stays
float32; the only low-precision roundings are one per logit, per coefficient and per block's product.
The casts are elementwise passes over a block, a few per cent of the block's matmul time.
"""
from __future__ import annotations

import torch

from . import pair_streams


class SweepMatmuls:
    """The head in the operand dtype (cast once per pass) and the sweep's three block products.

    weight [V, H] (any float dtype), bias [V] or None; operand_dtype: the matmuls' operand dtype; compute_dtype:
    the dtype of the logits blocks, statistics and accumulators (float32, float64 for float64 operands).
    Attributes: ``weight`` [V, H] in the operand dtype, ``bias`` [V] in the compute dtype, ``low_precision``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, operand_dtype: torch.dtype,
                 compute_dtype: torch.dtype):
        self.weight = weight.to(operand_dtype)
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.operand_dtype, self.compute_dtype = operand_dtype, compute_dtype
        self.low_precision = operand_dtype != compute_dtype
        # Two low-precision scratch blocks, grown as needed: the operand block, the product block.
        self._scratch = [torch.empty(0, dtype=operand_dtype, device=weight.device) for _ in range(2)]

    def operand(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden rows [C, H] (any float dtype) in the operand dtype."""
        return rows.to(self.operand_dtype)

    def _low(self, index: int, rows: int, cols: int) -> torch.Tensor:
        """Low-precision scratch block ``index`` (0: operands, 1: products) as a [rows, cols] view."""
        if self._scratch[index].numel() < rows * cols:
            device = self._scratch[index].device
            self._scratch[index] = torch.empty(rows * cols, dtype=self.operand_dtype, device=device)
        return self._scratch[index][: rows * cols].view(rows, cols)

    def logits(self, hidden: torch.Tensor, first: int, last: int, out: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """out [C, last - first] (compute dtype) = hidden [C, H] (operand dtype) @ W[first:last].T + b[first:last]
        (without the bias when ``bias`` is False)."""
        block = self.weight[first:last]
        bias = None if self.bias is None or not bias else self.bias[first:last]
        if not self.low_precision:
            return torch.mm(hidden, block.T, out=out) if bias is None else torch.addmm(bias, hidden, block.T, out=out)
        out.copy_(torch.mm(hidden, block.T, out=self._low(0, *out.shape)))
        return out if bias is None else out.add_(bias)

    def pair_rows(self, out: torch.Tensor, rows_p: torch.Tensor, rows_q: torch.Tensor) -> tuple:
        """(out [2C, H] (operand dtype) = [h_p; x], close) for ``pair_logits``, from the streams' rows [C, H]:
        x = h_p - h_q on close rows, h_q elsewhere (``are_fast.ops.pair_streams``)."""
        size = rows_p.shape[0]
        out[:size] = rows_p
        out[size:], close = pair_streams.second_rows(rows_p, rows_q, self.compute_dtype)
        return out, close

    def pair_logits(self, rows: torch.Tensor, close: tuple, first: int, last: int, out: torch.Tensor) -> torch.Tensor:
        """out [2C, last - first] (compute dtype) = both streams' logits [a; b] from ``pair_rows``'s (rows, close):
        one product of the 2C rows, then b = a - x W on the close rows (``are_fast.ops.pair_streams``)."""
        size = rows.shape[0] // 2
        self.logits(rows, first, last, out, bias=False)
        pair_streams.second_logits_(out[:size], out[size:], close)
        return out if self.bias is None else out.add_(self.bias[first:last])

    def add_product(self, acc: torch.Tensor, coefficients: torch.Tensor, first: int, last: int) -> None:
        """acc [C, H] (compute dtype) += coefficients [C, last - first] (compute dtype) @ W[first:last]."""
        block = self.weight[first:last]
        if not self.low_precision:
            acc.addmm_(coefficients, block)
            return
        low = self._low(0, *coefficients.shape).copy_(coefficients)
        acc.add_(torch.mm(low, block, out=self._low(1, *acc.shape)))

    def add_weight_product(self, acc: torch.Tensor, coefficients: torch.Tensor, hidden: torch.Tensor) -> None:
        """acc [W, H] (compute dtype) += coefficients.T ([C, W] compute dtype, transposed) @ hidden [C, H]
        (operand dtype): a vocabulary block's share of the weight gradient."""
        if not self.low_precision:
            acc.addmm_(coefficients.T, hidden)
            return
        low = self._low(0, *coefficients.shape).copy_(coefficients)
        acc.add_(torch.mm(low.T, hidden, out=self._low(1, *acc.shape)))
