"""Triton row epilogue for target log-probabilities: log-sum-exp, target logit and, in place, the gradient.

One program per row streams the row's logits twice: once for the online max / sum of exponentials, once
(only when a gradient is asked for) to write grad_scale * (onehot(target) - softmax) over the logits, or into
a gradient output of any float dtype. Same contract as ``are_fast.ops.torch_epilogues.logprob_epilogue``.

A low-precision gradient output may be the view of the first half of each float32 logits row's bytes
(``HeadMatmuls.gradient_out``): the row is written tile by tile in order, and a tile's 2-byte stores land
at most on float32 elements of that tile or earlier ones, all read before; one barrier per tile
(SYNC_TILES) keeps a warp from storing before the other warps of its program have loaded the tile. The target
logit is read before the first sweep, whose reductions order that read before any store (in place, another
warp's gradient store may land on x[target] first).

Logit transforms, in the kernel: each logit read becomes z' = c tanh(s z / c) (HAS_SOFTCAP) or s z, and the
gradient written is the one over z, times dz'/dz = s / cosh^2(s z / c) (or s), computed from the logit as
read in the same tile, before its bytes are overwritten.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def transformed(x, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """z' = softcap * tanh(logit_scale * x / softcap), or logit_scale * x without a softcap. tanh is formed
    from e = exp(-2|arg|), which stays exact where tanh saturates (e -> 0)."""
    if HAS_SOFTCAP:
        arg = x * (logit_scale / softcap)
        e = tl.exp(-2.0 * tl.abs(arg))
        tanh = (1.0 - e) / (1.0 + e)
        return tl.where(arg < 0, -tanh, tanh) * softcap
    else:
        return x * logit_scale


@triton.jit
def transform_derivative(x, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """dz'/dz at x: logit_scale / cosh^2(arg) = logit_scale * 4e / (1 + e)^2 with e = exp(-2|arg|)."""
    if HAS_SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(x * (logit_scale / softcap)))
        return logit_scale * 4.0 * e / ((1.0 + e) * (1.0 + e))
    else:
        return logit_scale


@triton.jit
def finite_or_zero(running_max):
    """The running max, or 0 while it is -inf (every logit so far -inf)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def padded_tile(row_ptr, cols, mask, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """A tile of a row's transformed logits, -inf on the lanes past the vocabulary (``mask`` False)."""
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, transformed(x, softcap, logit_scale, HAS_SOFTCAP), float("-inf"))


@triton.jit
def logsumexp_step(running_max, running_sum, x):
    """One tile x of an online log-sum-exp: (new running max, sum of exp(logit - new max) so far). Terms are
    relative to the running max, or to 0 while the row has shown only -inf logits (a masked vocabulary may fill
    whole tiles): exp() never sees -inf - -inf."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    shift = finite_or_zero(new_max)
    return new_max, running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)


@triton.jit
def _logprob_epilogue_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    targets_ptr,
    scale_ptr,
    out_ptr,
    vocab,
    ignore_index,
    softcap,
    logit_scale,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SYNC_TILES: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * stride_grad
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe_target = tl.where(in_range, target, 0)
    offsets = tl.arange(0, BLOCK_V)
    # Before the sweeps (see the module docstring), transformed like every logit read.
    target_logit = transformed(tl.load(row_ptr + safe_target).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + offsets
        x = padded_tile(row_ptr, cols, cols < vocab, softcap, logit_scale, HAS_SOFTCAP)
        running_max, running_sum = logsumexp_step(running_max, running_sum, x)
    # x - lse is formed as (x - max) - log_sum: rounding lse itself to float32 would cost ulp(max) (1e-3 at 1e4).
    log_sum = tl.log(running_sum)

    picked = (target_logit - running_max) - log_sum
    logp = tl.where(in_range, picked, float("nan"))
    tl.store(out_ptr + row, tl.where(valid, logp, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid & in_range, tl.load(scale_ptr + row).to(tl.float32), 0.0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if SYNC_TILES:
                tl.debug_barrier()
            onehot = tl.where(cols == safe_target, 1.0, 0.0)
            capped = transformed(x, softcap, logit_scale, HAS_SOFTCAP)
            derivative = transform_derivative(x, softcap, logit_scale, HAS_SOFTCAP)
            grad = scale * (onehot - tl.exp((capped - running_max) - log_sum)) * derivative
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# Launch options of both kernels. FP fusion (FMA contraction) stays on, as Triton <= 3.9 defaults: named here so
# Triton 3.9 does not warn that its default will change, and the kernels' rounding does not change with it.
LAUNCH_OPTIONS = {"num_warps": 8, "enable_fp_fusion": True}


def block_size(vocab: int) -> int:
    """Vocabulary tile: the row's length rounded up to a power of two, at most 4096."""
    return min(4096, triton.next_power_of_2(vocab))


def check_grad_out(name: str, grad_out: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """The tensor the kernel writes the gradient into (``logits`` itself when ``grad_out`` is None)."""
    if grad_out is None:
        return logits
    if not grad_out.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a float gradient output, got {grad_out.dtype}")
    if grad_out.shape != logits.shape or grad_out.stride(1) != 1 or grad_out.device != logits.device:
        raise ValueError(
            f"{name}: expected shape {tuple(logits.shape)} with contiguous rows on {logits.device}, got "
            f"{tuple(grad_out.shape)} with strides {grad_out.stride()} on {grad_out.device}"
        )
    return grad_out


def shares_memory(grad: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the kernel writes a different-dtype view of the logits' bytes (then it syncs each tile)."""
    return grad is not logits and grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


def transform_arguments(softcap: float | None, logit_scale: float | None) -> tuple[float, float]:
    """The kernels' (softcap, logit_scale) arguments: 1.0 for an absent one (HAS_SOFTCAP says which)."""
    return (1.0 if softcap is None else float(softcap)), (1.0 if logit_scale is None else float(logit_scale))


def check_block(block_v: int | None, vocab: int) -> int:
    """The tile a launcher uses: ``block_v`` (a power of two) when given, else ``block_size(vocab)``."""
    if block_v is None:
        return block_size(vocab)
    if not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v: expected a power of two, got {block_v!r}")
    return block_v


def logprob_epilogue(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """logits [C, V] float32 (row-contiguous), targets [C] int64, grad_scale [C] or None, grad_out [C, V]
    (any float dtype, contiguous rows; may be HeadMatmuls.gradient_out's view of the logits) or None
    -> log-probs [C] float32. softcap, logit_scale: the logit transforms (None: none).

    block_v: the vocabulary tile (a power of two; default ``block_size(V)``), smaller in tests to get many tiles.
    """
    if logits.dtype != torch.float32:
        raise TypeError(f"logits: the Triton epilogue takes float32 logits, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits: rows must be contiguous")
    grad = check_grad_out("grad_out", grad_out, logits)
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    targets = targets.contiguous()
    write_grad = grad_scale is not None
    scale = grad_scale.contiguous() if write_grad else out  # unread when WRITE_GRAD is False
    _logprob_epilogue_kernel[(rows,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        targets,
        scale,
        out,
        vocab,
        ignore_index,
        *transform_arguments(softcap, logit_scale),
        BLOCK_V=check_block(block_v, vocab),
        WRITE_GRAD=write_grad,
        SYNC_TILES=write_grad and shares_memory(grad, logits),
        HAS_SOFTCAP=softcap is not None,
        **LAUNCH_OPTIONS,
    )
    return out
