"""The online sweep: a frozen LM head's log-probabilities and hidden gradients without any logits chunk.

For a frozen head the hidden gradient of log softmax(h W^T + b)[t] is W[t] - softmax(h W^T + b) @ W: the
attention output of query h over keys W and values W. Like flash attention, this module computes it in one
sweep over vocabulary blocks with an online softmax (running row maximum, rescaled running sums), so a block
of rows meets each block of the head once, the two matmuls per block have cache-sized operands, and the only
[rows, vocab] buffer is one block (a few MiB), whatever N and V are. The chunk driver
(``are_fast.ops.chunked``) instead holds a [C, V] logits chunk per stream and streams the whole head through
the cache once per chunk, which on a CPU limits the chunk size to the memory budget and the speed to the
memory bandwidth.

Scope: float32/float64 heads, and bfloat16/float16 heads (or a float32 head under bf16/fp16 autocast), whose
block matmuls run with low-precision operands where ``are_fast.ops.sweep_precision`` finds that faster, else on a
float32 copy of the head (``are_fast.ops.sweep_matmuls``; statistics and accumulators float32 either way). A
frozen head: every op, each kind by its own sweep class (``registry.Kind.online``: the log-probability and KL
sweeps here, the JSD's three sweeps in ``are_fast.ops.online_jsd``), which declares its block buffers
(``block_slots``) and takes the kind's params by keyword. A trainable head: the log-probability ops whose
per-row upstream gradient is unknown in the forward (token, sequence): the values sweep also returns each
row's log-sum-exp, and the backward (``online_weight_pass``) sweeps once more with the final probabilities (4
block matmuls per row in all, the minimum without holding the logits). The ``online`` backend
(``are_fast.ops.backends``) routes everything else to the chunk driver.

Precision: every sum is relative to its row's running maximum. The target's probability is kept out of the
running sums, so the gradient's target term (1 - p_t) W[t] is formed from the sum of the other probabilities,
never as 1 - p_t, and a confident target's log-probability is -log1p(others / e_t), not a difference of
nearly equal logarithms. For the KL the sums hold p (log p - log q) as the sweep ends (see ``_KLSweep``); the
JSD's gradient is formed elementwise with the final sums, as its PyTorch epilogue does.

Logit transforms (``softcap``, ``logit_scale``: ``are_fast.ops.logit_transforms``): each block of logits is
transformed in place as it is formed, so the running maxima and sums are over the transformed logits z'. The
hidden gradient becomes sum_v dL/dz'_v * dz'_v/dz_v * W_v: a softcap's elementwise derivative is kept in a
block buffer of its own and weighs each block before its matmul with the head; a scale alone multiplies
each row's gradient.
"""
from __future__ import annotations

import os

import torch

from . import logit_transforms, registry, sweep_precision
from .chunked import PassResult
from .sweep_matmuls import SweepMatmuls

# Bytes of the [rows, vocab-block] buffers of all streams together, and the rows per block. Low-precision
# operands take larger blocks, sized per float32 buffer ("slot"): AMX reaches its rate only on large products,
# and 1024 x 2048 blocks measured best on the issue-18 Xeon (bf16, 2 threads, N=4096, V=32000: token_logprobs
# 1.38 s at H=1024 and 0.44 s at H=256 against 1.43 s and 0.53 s for 1024 x 8192, 1.70 s and 0.46 s for
# 1024 x 1024), still far below the chunk driver's memory.
_BLOCK_BYTES = 2 << 20
_BLOCK_ROWS = 512
_LOW_PRECISION_SLOT = (8 << 20, 1024)  # bytes per float32 buffer, rows


def supported(weight: torch.Tensor, bias: torch.Tensor | None, operand_dtype, weight_grad: bool, bias_grad: bool) -> bool:
    """Whether the online sweep can run this pass: a frozen head in its compute dtype, a low-precision head, or
    a float32 head under low-precision autocast (``operand_dtype``); low-precision ones unless the sweep path
    is forced to ``chunk``. A trainable head's log-probabilities take ``online_pass`` for the values and
    ``online_weight_pass`` for the gradients."""
    if bias is not None and bias.dtype != weight.dtype:
        return False
    full = weight.dtype in (torch.float32, torch.float64) and operand_dtype in (None, weight.dtype)
    low = weight.dtype in sweep_precision.LOW_PRECISION and operand_dtype in (None, weight.dtype)
    autocast = weight.dtype == torch.float32 and operand_dtype in sweep_precision.LOW_PRECISION
    if (low or autocast) and not sweep_precision.takes_sweep():
        return False
    return (full or low or autocast) and not weight_grad and not bias_grad


def block_operand_dtype(weight: torch.Tensor, operand_dtype=None) -> torch.dtype:
    """The dtype of a pass's block-matmul operands: a full-precision head's own; for a low-precision head (or
    autocast's ``operand_dtype`` over a float32 one) the one ``sweep_precision.choose`` picks for the device."""
    low = operand_dtype if operand_dtype in sweep_precision.LOW_PRECISION else weight.dtype
    if low not in sweep_precision.LOW_PRECISION:
        return weight.dtype
    return sweep_precision.choose(weight.device, low).operand_dtype


def sweep_matmuls(weight: torch.Tensor, bias: torch.Tensor | None, operand_dtype=None) -> SweepMatmuls:
    """The block products of one pass, in ``block_operand_dtype``'s dtype."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return SweepMatmuls(weight, bias, block_operand_dtype(weight, operand_dtype), compute)


def block_shape(active: int, vocab: int, slots: int, rows: int | None = None, low_precision: bool = False):
    """(rows, vocabulary entries) per block: ``rows`` (default 512, 1024 for ``low_precision`` operands) rows,
    and as many vocabulary entries as keep ``slots`` float32 [rows, block] buffers (a sweep's ``block_slots``)
    within 2 MiB (8 MiB per buffer for low-precision operands; ARE_FAST_BLOCK_BYTES overrides the total)."""
    slot_bytes, low_rows = _LOW_PRECISION_SLOT
    default_bytes, default_rows = (slot_bytes * slots, low_rows) if low_precision else (_BLOCK_BYTES, _BLOCK_ROWS)
    budget = int(os.environ.get("ARE_FAST_BLOCK_BYTES", default_bytes))
    block_rows = max(1, min(rows or default_rows, active))
    block_vocab = max(16, budget // (4 * slots * block_rows))
    block_vocab -= block_vocab % 16
    return block_rows, min(block_vocab, vocab)


def online_pass(
    kind: str,
    hiddens: list,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor | None = None,
    hidden_grads=(),
    rows: torch.Tensor | None = None,
    block_rows: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    operand_dtype: torch.dtype | None = None,
    params: dict | None = None,
) -> PassResult:
    """Values [N] and, with ``grad_scale`` [N], the hidden gradients of sum(grad_scale * values).

    kind "logprob": hiddens [h] with h [N, H], labels int64 targets [N]; values log p(target), 0 where the
    target is ignore_index, NaN where it is otherwise outside [0, V). kind "kl": hiddens [h_p, h_q], labels
    bool valid [N]; values KL(softmax(h_p W^T + b) || softmax(h_q W^T + b)), 0 on rows that are not valid; kind
    "jsd" likewise (``are_fast.ops.online_jsd``). params: the kind's float parameters by name (JSD's beta).
    rows: optional int64 [M] rows that count (the others get value 0 and zero gradients); block_rows: rows per
    block (tests use small blocks to reach every edge); softcap, logit_scale: the logit transforms;
    operand_dtype: autocast's for a float32 head. Same contract as ``chunked.fused_linear_pass`` for a frozen head.
    """
    n_rows, hidden_size = hiddens[0].shape
    matmuls = sweep_matmuls(weight, bias, operand_dtype)
    vocab, dtype, device = weight.shape[0], matmuls.compute_dtype, weight.device
    want_grad = grad_scale is not None
    compact = rows is not None
    active = rows.numel() if compact else n_rows
    new = torch.zeros if compact else torch.empty
    values = new(n_rows, dtype=dtype, device=device)
    needs = list(hidden_grads) + [False] * (len(hiddens) - len(hidden_grads))
    dh = [new(h.shape, dtype=h.dtype, device=device) if want_grad and need else None for h, need in zip(hiddens, needs)]
    log_norms = new(n_rows, dtype=dtype, device=device) if kind == "logprob" else None
    if active == 0:
        return PassResult(values, dh, None, None, log_norms)
    sweep = registry.online_sweep(kind)
    if sweep is None:
        raise ValueError(f"kind: {kind!r} has no online sweep (are_fast.ops.registry)")
    slots = sweep.block_slots(want_grad and softcap is not None)
    step, block_vocab = block_shape(active, vocab, slots, block_rows, matmuls.low_precision)
    state = sweep(step, hidden_size, block_vocab, dtype, device, want_grad, [g is not None for g in dh],
                  (softcap, logit_scale), matmuls.operand_dtype, **(params or {}))
    for start in range(0, active, step):
        stop = min(start + step, active)
        sel = rows[start:stop] if compact else slice(start, stop)
        chunk = [matmuls.operand(h[sel]) for h in hiddens]
        scale = None if grad_scale is None else grad_scale[sel].to(dtype)
        chunk_values, chunk_grads, chunk_norms = state.run(chunk, matmuls, labels[sel], ignore_index, scale)
        values[sel] = chunk_values
        if log_norms is not None:
            log_norms[sel] = chunk_norms
        for stream, grad in enumerate(chunk_grads):
            if dh[stream] is not None:
                if compact:
                    dh[stream].index_copy_(0, sel, grad.to(dh[stream].dtype))
                else:
                    dh[stream][sel] = grad
    return PassResult(values, dh, None, None, log_norms)


def online_weight_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor,
    log_norms: torch.Tensor,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    rows: torch.Tensor | None = None,
    block_rows: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    operand_dtype: torch.dtype | None = None,
) -> PassResult:
    """The gradients of sum(grad_scale * log p(target)) for a trainable head, given each row's log-sum-exp from
    the forward (``online_pass``'s ``log_norms`` [N]): with the final probabilities known, one sweep forms per
    block the logits, their gradient g (onehot - p) and its products with the head (hidden gradient [N, H]) and
    with the rows (weight gradient [V, H], bias gradient [V]): 3 matmuls per block and no [C, V] chunk.
    hidden [N, H], targets int64 [N], grad_scale [N]; rows: optional int64 [M] rows that count; softcap,
    logit_scale: the logit transforms (the log-sum-exp is that of the transformed logits); operand_dtype:
    autocast's for a float32 head. The weight and bias gradients accumulate in float32 (float64)."""
    n_rows, hidden_size = hidden.shape
    matmuls = sweep_matmuls(weight, bias, operand_dtype)
    vocab, dtype, device = weight.shape[0], matmuls.compute_dtype, weight.device
    compact = rows is not None
    active = rows.numel() if compact else n_rows
    dh = (torch.zeros if compact else torch.empty)(hidden.shape, dtype=hidden.dtype, device=device) if hidden_grad else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=device) if weight_grad else None
    db = torch.zeros(vocab, dtype=dtype, device=device) if bias_grad else None
    slots = 2 if softcap is not None else 1  # a logits block, and a softcap's derivative
    step, block_vocab = block_shape(max(active, 1), vocab, slots, block_rows, matmuls.low_precision)
    buffer = torch.empty(step * block_vocab, dtype=dtype, device=device)
    capped = torch.empty_like(buffer) if softcap is not None else None  # the softcap's derivative per block
    acc = torch.empty(step * hidden_size, dtype=dtype, device=device) if hidden_grad else None
    for start in range(0, active, step):
        stop = min(start + step, active)
        sel = rows[start:stop] if compact else slice(start, stop)
        chunk, chunk_targets, size = matmuls.operand(hidden[sel]), targets[sel], stop - start
        counted = (chunk_targets != ignore_index) & (chunk_targets >= 0) & (chunk_targets < vocab)
        scale = torch.where(counted, grad_scale[sel].to(dtype), 0.0)
        norm = torch.where(counted, log_norms[sel], torch.inf).unsqueeze(1)  # p = 0 on rows that do not count
        chunk_acc = acc[: size * hidden_size].view(size, hidden_size).zero_() if acc is not None else None
        for first, last in vocab_blocks(vocab, block_vocab):
            width = last - first
            logits = matmuls.logits(chunk, first, last, buffer[: size * width].view(size, width))
            derivative = logit_transforms.apply_with_derivative_(
                logits, softcap, logit_scale, None if capped is None else capped[: size * width].view(size, width)
            )
            grad = logits.sub_(norm).exp_().mul_(-scale.unsqueeze(1))  # -g p, in place
            here, index = _targets_in_block(chunk_targets, counted, first, width)
            grad.scatter_add_(1, index, torch.where(here, scale, 0.0).unsqueeze(1))
            if derivative is not None:  # the gradient over the raw logits
                grad.mul_(derivative)
            if chunk_acc is not None:
                matmuls.add_product(chunk_acc, grad, first, last)
            if dw is not None:
                matmuls.add_weight_product(dw[first:last], grad, chunk)
            if db is not None:
                db[first:last].add_(grad.sum(0))
        if dh is not None:
            if compact:
                dh.index_copy_(0, sel, chunk_acc.to(dh.dtype))
            else:
                dh[sel] = chunk_acc
    dw = None if dw is None else dw.to(weight.dtype)  # accumulated in the compute dtype
    return PassResult(None, [dh], dw, None if db is None else db.to(bias.dtype))


def vocab_blocks(vocab: int, block_vocab: int):
    return ((start, min(start + block_vocab, vocab)) for start in range(0, vocab, block_vocab))


def _targets_in_block(targets: torch.Tensor, counted: torch.Tensor, first: int, width: int):
    """Which rows' targets ([C] int64) fall in the vocabulary block [first, first + width), among the rows
    ``counted`` ([C] bool), and each target's column in the block as a [C, 1] index (clamped for the others)."""
    local = targets - first
    here = counted & (local >= 0) & (local < width)
    return here, local.clamp(0, width - 1).unsqueeze(1)


def lowest(dtype: torch.dtype) -> float:
    """The running maximum's start: the lowest finite value, not -inf, so that a block of -inf logits (a masked
    vocabulary) rescales by exp(0) and subtracts a finite maximum, never exp(-inf + inf) = NaN."""
    return torch.finfo(dtype).min


def rescale(running_max: torch.Tensor, block_max: torch.Tensor) -> torch.Tensor:
    """Updates running_max [C] in place to max(running_max, block_max); returns exp(old - new) [C]."""
    new_max = torch.maximum(running_max, block_max)
    factor = torch.exp(running_max - new_max)
    running_max.copy_(new_max)
    return factor


class _LogprobSweep:
    """log p(target) and its unit hidden gradient (1 - p_t) W[t] - sum_{v != t} p_v W_v, scaled per row."""

    @staticmethod
    def block_slots(capped_grad: bool) -> int:
        """float32 [rows, block] buffers per block (``block_shape``): the logits, and a softcap's derivative."""
        return 2 if capped_grad else 1

    def __init__(self, rows, hidden_size, block_vocab, dtype, device, want_grad, need, transform, operand_dtype):
        self.want_grad = want_grad and need[0]
        # One buffer: a block of logits during the sweep, the rows W[t] of the targets after it.
        width = max(block_vocab, hidden_size) if self.want_grad else block_vocab
        self.buffer = torch.empty(rows * width, dtype=dtype, device=device)
        self.block_vocab = block_vocab
        self.acc = torch.empty(rows, hidden_size, dtype=dtype, device=device) if self.want_grad else None
        self.softcap, self.logit_scale = transform
        capped_grad = self.want_grad and self.softcap is not None
        self.derivative = torch.empty(rows * block_vocab, dtype=dtype, device=device) if capped_grad else None

    def run(self, chunk, matmuls, targets, ignore_index, scale):
        hidden = chunk[0]
        size = hidden.shape[0]
        vocab = matmuls.weight.shape[0]
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < vocab)
        kw = dict(dtype=self.buffer.dtype, device=hidden.device)
        running_max = torch.full((size,), lowest(kw["dtype"]), **kw)
        others = torch.zeros(size, **kw)  # sum_{v != t} exp(l_v - max)
        target_logit = torch.zeros(size, **kw)
        target_derivative = torch.ones(size, **kw)  # dz'/dz at the target
        acc = self.acc[:size] if self.want_grad else None
        if acc is not None:
            acc.zero_()
        for first, last in vocab_blocks(vocab, self.block_vocab):
            width = last - first
            block = self.buffer[: size * width].view(size, width)
            logits = matmuls.logits(hidden, first, last, block)
            if self.derivative is None:
                derivative = logit_transforms.apply_(logits, self.softcap, self.logit_scale)
            else:
                derivative = logit_transforms.apply_with_derivative_(
                    logits, self.softcap, self.logit_scale, self.derivative[: size * width].view(size, width)
                )
            here, index = _targets_in_block(targets, in_range, first, width)
            target_logit = torch.where(here, logits.gather(1, index).squeeze(1), target_logit)
            if self.derivative is not None:
                target_derivative = torch.where(here, derivative.gather(1, index).squeeze(1), target_derivative)
            factor = rescale(running_max, logits.amax(1))
            probs = logits.sub_(running_max.unsqueeze(1)).exp_()  # exp(l - running max), in place
            probs.scatter_(1, index, torch.where(here, 0.0, probs.gather(1, index).squeeze(1)).unsqueeze(1))
            others.mul_(factor).add_(probs.sum(1))
            if acc is not None:
                weighted = probs.mul_(derivative) if self.derivative is not None else probs  # d/dz'_v -> d/dz_v
                matmuls.add_product(acc.mul_(factor.unsqueeze(1)), weighted, first, last)
        target_term = torch.exp(target_logit - running_max)
        total = others + target_term
        # log p_t = -log1p(others / e_t): exact for a confident target, where (l_t - max) - log(total) would
        # lose log(1 + tiny) to rounding; the plain form elsewhere (e_t may underflow there).
        confident = others < target_term
        logp = torch.where(confident, -torch.log1p(others / target_term), target_logit - running_max - torch.log(total))
        logp = torch.where(valid, torch.where(in_range, logp, torch.nan), 0.0)
        log_norm = running_max + torch.log(total)
        if acc is None:
            return logp, [None], log_norm
        coef = torch.where(valid & in_range, scale / total, 0.0)
        if self.derivative is None and self.logit_scale is not None:  # a constant dz'/dz
            coef.mul_(self.logit_scale)
        safe = torch.where(in_range, targets, 0)
        # g (others / total) d_t W[t] - (g / total) acc, d_t = dz'/dz at the target
        target_rows = self.buffer[: size * hidden.shape[1]].view(size, -1)
        target_rows.copy_(matmuls.weight.index_select(0, safe))
        grad = acc.mul_(-coef.unsqueeze(1)).addcmul_(target_rows, (coef * others * target_derivative).unsqueeze(1))
        return logp, [grad], log_norm


class _KLSweep:
    """KL(p || q) with p = softmax(a), q = softmax(b), a = h_p W^T + b, b = h_q W^T + b, and its hidden
    gradients sum_v p_v (d_v - E_p[d]) W_v (stream p, d = a - b) and sum_v (q_v - p_v) W_v (stream q).

    The log-ratio is summed as d - shift with shift the running lse_a - lse_b (re-based as it moves), so at the
    end the sums hold p (log p - log q) itself: a small KL is not the difference of two large terms. Likewise
    stream q's gradient sums (e_b - rho e_a) W with rho the running sum_b / sum_a (re-based as it moves), so at
    the end it holds sum_b (q - p) W: not the difference of two O(1) sums, which bf16 products would round.
    (The low-precision logits themselves: ``SweepMatmuls.pair_logits``.)

    With logit transforms a and b are the transformed logits; a softcap's derivatives D_a, D_b (one more
    [2 rows, block] buffer) weigh the slots, and a fourth slot e_a D_b gives stream q's p-term."""

    @staticmethod
    def block_slots(capped_grad: bool) -> int:
        """float32 [rows, block] buffers per block (``block_shape``): three slots, with a softcap's gradient four
        and both streams' derivatives."""
        return 6 if capped_grad else 3

    def __init__(self, rows, hidden_size, block_vocab, dtype, device, want_grad, need, transform, operand_dtype):
        # Both streams' gradients come from the same three sums, so they are formed whichever ``need`` asks for.
        # Slots: 0 e_a = exp(a - max_a), 1 e_b - rho e_a with e_b = exp(b - max_b), 2 e_a (d - shift) (with a
        # softcap's gradient times D_a, D_b, D_a, and 3 e_a D_b); one matmul serves all.
        self.softcap, self.logit_scale = transform
        capped_grad = want_grad and self.softcap is not None
        self.slots = 4 if capped_grad else 3
        self.blocks = torch.empty(self.slots, rows, block_vocab, dtype=dtype, device=device)
        self.derivatives = torch.empty(2 * rows * block_vocab, dtype=dtype, device=device) if capped_grad else None
        self.stacked = torch.empty(2 * rows, hidden_size, dtype=operand_dtype, device=device)
        # Accumulators, same slots: sum e_a W, sum (e_b - rho e_a) W, sum e_a (d - shift) W (, sum e_a D_b W).
        self.acc = torch.empty(self.slots, rows, hidden_size, dtype=dtype, device=device) if want_grad else None

    def run(self, chunk, matmuls, valid, ignore_index, scale):
        size = chunk[0].shape[0]
        vocab = matmuls.weight.shape[0]
        width_max = self.blocks.shape[2]
        stacked, close = matmuls.pair_rows(self.stacked[: 2 * size], chunk[0], chunk[1])
        kw = dict(dtype=self.blocks.dtype, device=stacked.device)
        max_a, max_b = torch.full((size,), lowest(kw["dtype"]), **kw), torch.full((size,), lowest(kw["dtype"]), **kw)
        sum_a, sum_b, sum_ad = torch.zeros(size, **kw), torch.zeros(size, **kw), torch.zeros(size, **kw)
        shift = None  # the running lse_a - lse_b, so that the sums hold p (log p - log q) as the sweep ends
        acc = None
        slots = self.slots
        if self.acc is not None:
            acc = self.acc.view(-1)[: slots * size * self.acc.shape[2]].view(slots, size, -1)  # packed, like the blocks
            acc.zero_()
        for first, last in vocab_blocks(vocab, width_max):
            width = last - first
            # Logits of both streams in one matmul: the buffer's first two slots, rows [a; b].
            pair = self.blocks.view(-1)[: 2 * size * width].view(2 * size, width)
            matmuls.pair_logits(stacked, close, first, last, pair)
            if self.derivatives is None:
                logit_transforms.apply_(pair, self.softcap, self.logit_scale)
            else:  # D_a; D_b, rows as in pair
                derivatives = logit_transforms.apply_with_derivative_(
                    pair, self.softcap, self.logit_scale, self.derivatives[: 2 * size * width].view(2 * size, width)
                )
            logits_a, logits_b = pair[:size], pair[size:]
            ratio = torch.sub(logits_a, logits_b, out=_slot(self.blocks, 2, size, width))  # d = a - b
            factor_a, factor_b = rescale(max_a, logits_a.amax(1)), rescale(max_b, logits_b.amax(1))
            exp_a = logits_a.sub_(max_a.unsqueeze(1)).exp_()
            exp_b = logits_b.sub_(max_b.unsqueeze(1)).exp_()
            sum_ad.mul_(factor_a)
            earlier_a = sum_a.mul_(factor_a).clone()  # the earlier blocks' mass, in this block's scale
            earlier_b = sum_b.mul_(factor_b).clone()
            sum_a.add_(exp_a.sum(1))
            sum_b.add_(exp_b.sum(1))
            if acc is not None:
                acc[0].mul_(factor_a.unsqueeze(1))
                acc[1].mul_(factor_b.unsqueeze(1))
                acc[2].mul_(factor_a.unsqueeze(1))
                if slots == 4:
                    acc[3].mul_(factor_a.unsqueeze(1))
            # lse_a - lse_b as (max_a - max_b) + log(sum_a / sum_b): no rounding of a common logit offset
            new_shift = (max_a - max_b) + (torch.log(sum_a) - torch.log(sum_b))
            if shift is not None:  # re-base the earlier blocks' sums on the new shift
                # nothing to re-base where the earlier blocks have no mass (the shift was NaN: log 0 - log 0)
                moved = torch.where(earlier_a > 0, new_shift - shift, 0.0)
                sum_ad.sub_(moved * earlier_a)
                if acc is not None:
                    acc[2].addcmul_(acc[0], moved.unsqueeze(1), value=-1)
            shift = new_shift
            ratio.sub_(shift.unsqueeze(1)).mul_(exp_a).masked_fill_(exp_a == 0, 0.0)  # p = 0 (-inf logit): 0, not NaN
            sum_ad.add_(ratio.sum(1))
            if acc is not None:
                # Slot 1 holds e_b - rho e_a, rho = sum_b / sum_a so far (the p-term's slot: e_a, or e_a D_b), so
                # that stream q's gradient sum (q - p) W is one sum, not the difference of two rounded O(1) sums;
                # the earlier blocks' share is re-based as rho moves, like the shift above.
                rho, earlier_rho = _mass_ratio(sum_b, sum_a), _mass_ratio(earlier_b, earlier_a)
                p_slot = 3 if slots == 4 else 0
                acc[1].addcmul_(acc[p_slot], (rho - earlier_rho).unsqueeze(1), value=-1)
                if slots == 4:  # gradients over z' -> over z: weigh by D_a (slots 0, 2) and D_b (1, 3)
                    derivative_a, derivative_b = derivatives[:size], derivatives[size:]
                    torch.mul(exp_a, derivative_b, out=_slot(self.blocks, 3, size, width))
                    exp_a.mul_(derivative_a)
                    exp_b.mul_(derivative_b)
                    ratio.mul_(derivative_a)
                exp_b.addcmul_(_slot(self.blocks, p_slot, size, width), rho.unsqueeze(1), value=-1)
                everything = self.blocks.view(-1)[: slots * size * width].view(slots * size, width)
                matmuls.add_product(acc.view(slots * size, -1), everything, first, last)
        # KL = E_p[d] - (lse_a - lse_b) = E_p[d - shift], the shift being lse_a - lse_b of the whole row
        mean_ratio = sum_ad / sum_a
        values = torch.where(valid, mean_ratio, 0.0)
        if acc is None:
            return values, [None, None], None
        coef = torch.where(valid, scale, 0.0)
        if slots == 3 and self.logit_scale is not None:  # a constant dz'/dz
            coef.mul_(self.logit_scale)
        coef_a, coef_b = (coef / sum_a).unsqueeze(1), (coef / sum_b).unsqueeze(1)
        grad_p = acc[2].addcmul_(acc[0], mean_ratio.unsqueeze(1), value=-1).mul_(coef_a)
        grad_q = acc[1].mul_(coef_b)  # (sum (e_b - rho e_a) W) / sum_b = sum (q - p) W, rho = sum_b / sum_a
        return values, [grad_p, grad_q], None


def _mass_ratio(sum_b: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """sum_b / sum_a [C], 0 where stream p has no mass yet (a masked vocabulary block): nothing to re-base."""
    return torch.where(sum_a > 0, sum_b / sum_a, 0.0)


def _slot(blocks: torch.Tensor, slot: int, size: int, width: int) -> torch.Tensor:
    """The contiguous [size, width] view of slot ``slot`` when the slots are packed as [slots, size, width]."""
    return blocks.view(-1)[slot * size * width : (slot + 1) * size * width].view(size, width)
