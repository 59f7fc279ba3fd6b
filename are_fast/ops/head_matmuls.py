"""The products with the LM head that the chunk driver needs, in the precision it needs them.

Logits and softmax statistics are float32 (float64 for float64 inputs). Low-precision heads use a
float32-output matmul on CUDA where PyTorch has one, and an upcast copy of the head elsewhere.
"""
from __future__ import annotations

import torch


def _cuda_fp32_out_mm_available() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


class HeadMatmuls:
    """The three products with the LM head, in the precision the driver needs.

    weight [V, H], bias [V] or None. Modes: "same" (float32/float64 head: plain matmuls), "fp32_out"
    (low-precision head on CUDA: low-precision operands, float32 outputs) and "upcast" (low-precision head
    elsewhere: one float32 copy of the head per pass).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.dtype = weight.dtype
        self.compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if weight.dtype == self.compute_dtype:
            self.mode = "same"
        elif weight.is_cuda and _cuda_fp32_out_mm_available():
            self.mode = "fp32_out"
        else:
            self.mode = "upcast"
        self.weight = weight.to(self.compute_dtype) if self.mode == "upcast" else weight
        self.bias = None if bias is None else bias.to(self.compute_dtype)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """hidden [C, H] -> logits [C, V] in the compute dtype, written into ``out`` when possible."""
        if self.mode == "fp32_out":
            result = torch.mm(hidden, self.weight.T, out_dtype=self.compute_dtype)
            return result if self.bias is None else result.add_(self.bias)
        hidden = hidden.to(self.compute_dtype)
        if self.bias is None:
            return torch.mm(hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, hidden, self.weight.T, out=out)

    def hidden_grad(self, grad_logits: torch.Tensor, out: torch.Tensor) -> None:
        """out [C, H] (the hidden dtype) = grad_logits [C, V] @ weight."""
        if self.mode == "same":
            torch.mm(grad_logits, self.weight, out=out)
        elif self.mode == "fp32_out":
            torch.mm(grad_logits.to(self.dtype), self.weight, out=out)
        else:
            out.copy_(grad_logits @ self.weight)

    def add_weight_grad(self, acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """acc [V, H] (compute dtype) += grad_logits.T [V, C] @ hidden [C, H]."""
        if self.mode == "fp32_out":
            acc.add_(torch.mm(grad_logits.to(self.dtype).T, hidden, out_dtype=self.compute_dtype))
        else:
            acc.addmm_(grad_logits.T, hidden.to(self.compute_dtype))
