"""The online sweep of the generalized JSD (kind "jsd"), run by ``are_fast.ops.online.online_pass``.

The JSD is not linear in the log-ratio, so the KL sweep's running shift does not carry over: per block of rows,
sweep 1 finds both streams' log-sum-exps, sweep 2 sums S = sum p s and T = sum q t with the final probabilities
(value H(beta) - beta S - (1 - beta) T), and sweep 3 (gradients only) forms each block's gradients elementwise as
the PyTorch epilogue does (``torch_epilogues.jsd_terms``) and multiplies them by the head block. Each sweep takes
one [2 rows, block] logits product; the third one more for both hidden gradients.
"""
from __future__ import annotations

import torch

from . import logit_transforms, torch_epilogues
from .online import lowest, rescale, vocab_blocks


class JSDSweep:
    """JSD_beta(P || Q), P = softmax(a), Q = softmax(b), a = h_p W^T + b, b = h_q W^T + b (after the logit
    transforms), and its hidden gradients sum_v g beta p_v (S - s_v) D_a,v W_v (stream p) and
    sum_v g (1 - beta) q_v (T - t_v) D_b,v W_v (stream q), D the transform's derivative."""

    @staticmethod
    def block_slots(capped_grad: bool) -> int:
        """float32 [rows, block] buffers per block (``online.block_shape``): both streams' logits, the three
        temporaries of ``jsd_terms`` (d, s, t), and with a softcap's gradient both streams' derivatives."""
        return 7 if capped_grad else 5

    def __init__(self, rows, hidden_size, block_vocab, dtype, device, want_grad, need, transform, operand_dtype,
                 *, beta: float):
        self.beta = beta
        self.softcap, self.logit_scale = transform
        self.block_vocab = block_vocab
        # The gradient rows to multiply by the head: stream p's, stream q's or both (rows [p; q] of a block).
        self.grad_streams = [stream for stream in range(2) if want_grad and need[stream]]
        capped_grad = bool(self.grad_streams) and self.softcap is not None
        self.pair = torch.empty(2 * rows * block_vocab, dtype=dtype, device=device)  # logits [a; b], in place
        self.derivatives = torch.empty(2 * rows * block_vocab, dtype=dtype, device=device) if capped_grad else None
        self.stacked = torch.empty(2 * rows, hidden_size, dtype=operand_dtype, device=device)
        self.acc = torch.empty(2 * rows, hidden_size, dtype=dtype, device=device) if self.grad_streams else None

    def _blocks(self, stacked, close, matmuls, derivatives: bool = False):
        """Per vocabulary block of ``SweepMatmuls.pair_rows``'s (stacked, close): (first, last, transformed logits
        [2C, width] (rows [a; b]), dz'/dz: a [2C, width] tensor with ``derivatives`` and a softcap, else None)."""
        rows = stacked.shape[0]
        for first, last in vocab_blocks(matmuls.weight.shape[0], self.block_vocab):
            width = last - first
            logits = matmuls.pair_logits(stacked, close, first, last, self.pair[: rows * width].view(rows, width))
            derivative = None
            if derivatives and self.derivatives is not None:
                derivative = logit_transforms.apply_with_derivative_(
                    logits, self.softcap, self.logit_scale, self.derivatives[: rows * width].view(rows, width)
                )
            else:
                logit_transforms.apply_(logits, self.softcap, self.logit_scale)
            yield first, last, logits, derivative

    def run(self, chunk, matmuls, valid, ignore_index, scale):
        size = chunk[0].shape[0]
        stacked, close = matmuls.pair_rows(self.stacked[: 2 * size], chunk[0], chunk[1])
        kw = dict(dtype=self.pair.dtype, device=stacked.device)
        # Sweep 1: the log-sum-exps of the 2C rows [a; b].
        running_max = torch.full((2 * size,), lowest(kw["dtype"]), **kw)
        sums = torch.zeros(2 * size, **kw)
        for _, _, logits, _ in self._blocks(stacked, close, matmuls):
            factor = rescale(running_max, logits.amax(1))
            sums.mul_(factor).add_(logits.sub_(running_max.unsqueeze(1)).exp_().sum(1))
        # log p = (a - max) - log(sum): the two parts apart, as log_softmax does, so that a large common logit
        # offset is not rounded into every log-probability.
        maxima, log_sums = running_max.unsqueeze(1), sums.log_().unsqueeze(1)
        # Sweep 2: S = sum p s and T = sum q t.
        sum_ps, sum_qt = torch.zeros(size, **kw), torch.zeros(size, **kw)
        for _, _, logits, _ in self._blocks(stacked, close, matmuls):
            p, q, s, t = self._terms(logits.sub_(maxima).sub_(log_sums), size)
            sum_ps.add_(torch.linalg.vecdot(p, s))
            sum_qt.add_(torch.linalg.vecdot(q, t))
        values = torch.where(valid, torch_epilogues.jsd_value(sum_ps, sum_qt, self.beta), 0.0)
        if not self.grad_streams:
            return values, [None, None], None
        # Sweep 3: the gradients over the logits, block by block, and their product with the head.
        coef = torch.where(valid, scale, 0.0).unsqueeze(1)
        if self.derivatives is None and self.logit_scale is not None:  # a constant dz'/dz
            coef.mul_(self.logit_scale)
        lo, hi = self.grad_streams[0] * size, (self.grad_streams[-1] + 1) * size  # the rows to multiply
        acc = self.acc[: hi - lo].zero_()
        for first, last, logits, derivative in self._blocks(stacked, close, matmuls, derivatives=True):
            p, q, s, t = self._terms(logits.sub_(maxima).sub_(log_sums), size)
            torch_epilogues.jsd_gradients_(p, q, s, t, sum_ps, sum_qt, coef, self.beta)  # over logits, in place
            if derivative is not None:
                logits.mul_(derivative)
            matmuls.add_product(acc, logits[lo:hi], first, last)
        grads = [acc[stream * size - lo : (stream + 1) * size - lo] if stream in self.grad_streams else None
                 for stream in range(2)]
        return values, grads, None

    def _terms(self, log_probs, size):
        """``jsd_terms`` of a block's log-probabilities [2C, width] (rows [log p; log q]), p and q in place."""
        log_p, log_q = log_probs[:size], log_probs[size:]
        return torch_epilogues.jsd_terms(log_p, log_q, self.beta, log_p, log_q)
