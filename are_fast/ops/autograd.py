"""The one autograd Function behind every fused op.

``LinearStreamsFunction`` maps 1+ streams of hidden states [N, H] through a shared LM head to per-row values
[N] given by an epilogue (log-probability of a target, or KL between two streams). It saves only what the
backward needs:
- frozen head (weight and bias need no gradient): the hidden gradients are computed during the forward
  with unit scale, so the backward only rescales rows: no recomputation, no weight-gradient work;
- trainable head: the hidden states are saved and the backward recomputes the logits chunk by chunk;
- no gradient needed (e.g. reference scores under inference_mode): values only.
"""
from __future__ import annotations

import torch

from .chunked import Epilogue, fused_linear_pass
from .head_matmuls import autocast_operand_dtype


class LinearStreamsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, epilogue: Epilogue, chunk_rows, weight, bias, *hiddens):
        need_weight, need_bias = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_hidden = tuple(ctx.needs_input_grad[4:])
        ctx.epilogue, ctx.chunk_rows = epilogue, chunk_rows
        # Under autocast the head's matmuls run in its dtype, in the backward too (which runs outside it).
        ctx.operand_dtype = operand = autocast_operand_dtype(weight.device) if weight.dtype == torch.float32 else None
        if need_weight or need_bias:
            ctx.mode = "recompute"
            ctx.save_for_backward(weight, bias, *hiddens)
            return fused_linear_pass(hiddens, weight, bias, epilogue, chunk_rows=chunk_rows, operand_dtype=operand).values
        if any(need_hidden):
            ctx.mode = "rescale"
            unit = torch.ones(hiddens[0].shape[0], dtype=torch.float32, device=weight.device)
            result = fused_linear_pass(
                hiddens, weight, bias, epilogue, grad_scale=unit, hidden_grads=need_hidden, chunk_rows=chunk_rows,
                operand_dtype=operand,
            )
            ctx.save_for_backward(*[g for g in result.hidden_grads if g is not None])
            ctx.need_hidden = need_hidden
            return result.values
        ctx.mode = "none"
        return fused_linear_pass(hiddens, weight, bias, epilogue, chunk_rows=chunk_rows, operand_dtype=operand).values

    @staticmethod
    def backward(ctx, grad_values):
        if ctx.mode == "rescale":
            unit_grads = iter(ctx.saved_tensors)
            scale = grad_values.unsqueeze(1)
            grads = []
            for need in ctx.need_hidden:
                unit_grad = next(unit_grads) if need else None
                grads.append(None if unit_grad is None else (scale * unit_grad).to(unit_grad.dtype))
            return (None, None, None, None, *grads)
        weight, bias, *hiddens = ctx.saved_tensors
        result = fused_linear_pass(
            hiddens,
            weight,
            bias,
            ctx.epilogue,
            grad_scale=grad_values.contiguous(),
            hidden_grads=ctx.needs_input_grad[4:],
            weight_grad=ctx.needs_input_grad[2],
            bias_grad=ctx.needs_input_grad[3],
            chunk_rows=ctx.chunk_rows,
            operand_dtype=ctx.operand_dtype,
        )
        return (None, None, result.weight_grad, result.bias_grad, *result.hidden_grads)
