"""The two AutoRegEmbed objectives and the reference scores on a compressor and a frozen decoder: stage 1's
``compression_loss``, stage 2's ``alignment_loss``. A stage-2 step compresses each query once and runs all its
streams in one decoder call and one fused log-prob call (README "Training" compares it with the released code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..ops import functional as F, registry
from .compressor import Compressor, CompressorBatch
from .decoder import FrozenDecoder
from .layout import IGNORE_INDEX


@dataclass
class Stage1Item:
    """One tokenized stage-1 row: compressor prefix ids (context + instruction) and target ids (+ eos)."""

    prefix: list
    target: list

    @property
    def length(self) -> int:
        return len(self.prefix) + len(self.target)


@dataclass
class Stage2Item:
    """One tokenized stage-2 row: query and positive prefixes, positive and negative targets (n lists), the
    stage-1 reference scores when known, and the row id they belong to."""

    row_id: str
    query: list
    pos_prefix: list
    pos_target: list
    neg_targets: list
    ref_p: float | None = None
    ref_n: list | None = None

    @property
    def length(self) -> int:
        return len(self.query) + len(self.pos_prefix) + 2 * len(self.pos_target) + sum(map(len, self.neg_targets))


@dataclass
class DecoderTargets:
    """Target ids [S, T] (right-padded, with eos) and their lengths [S]."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "DecoderTargets":
        return DecoderTargets(self.ids.to(device), self.lengths.to(device))


@dataclass
class Stage1Batch:
    compressor: CompressorBatch  # B rows
    targets: DecoderTargets  # B rows

    def to(self, device) -> "Stage1Batch":
        return Stage1Batch(self.compressor.to(device), self.targets.to(device))

    @property
    def num_tokens(self) -> int:
        return self.compressor.num_tokens + int(self.targets.lengths.sum())


@dataclass
class Stage2Batch:
    queries: CompressorBatch  # B rows
    positives: CompressorBatch | None  # B rows (None for the reference scores, which need no pos->pos stream)
    targets: DecoderTargets  # pos (for q), pos (for pos, when positives are there), the negatives row-major [B, n]
    rows: int  # B
    num_negatives: int
    ref_p: torch.Tensor | None  # [B] float32
    ref_n: torch.Tensor | None  # [B, n] float32

    def to(self, device) -> "Stage2Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Stage2Batch(self.queries.to(device), move(self.positives), self.targets.to(device), self.rows,
                           self.num_negatives, move(self.ref_p), move(self.ref_n))

    @property
    def num_tokens(self) -> int:
        extra = self.positives.num_tokens if self.positives is not None else 0
        return self.queries.num_tokens + extra + int(self.targets.lengths.sum())


def collate_stage1(compressor: Compressor, decoder: FrozenDecoder, items: Sequence[Stage1Item]) -> Stage1Batch:
    return Stage1Batch(compressor.collate([i.prefix for i in items]),
                       DecoderTargets(*decoder.collate([i.target for i in items])))


def collate_stage2(compressor: Compressor, decoder: FrozenDecoder, items: Sequence[Stage2Item],
                   with_positives: bool = True) -> Stage2Batch:
    """Stack a batch's streams; ``with_positives=False`` leaves out the pos->pos stream and the positives'
    compression (the reference scores need neither). Queries and positives are padded apart (queries are
    often much longer than positives), the decoder streams together."""
    n = len(items[0].neg_targets)
    if any(len(i.neg_targets) != n for i in items):
        raise ValueError("items: every row of a batch needs the same number of negatives")
    targets = [i.pos_target for i in items] * (2 if with_positives else 1)
    targets += [neg for i in items for neg in i.neg_targets]
    have_refs = all(i.ref_p is not None for i in items)
    return Stage2Batch(
        compressor.collate([i.query for i in items]),
        compressor.collate([i.pos_prefix for i in items]) if with_positives else None,
        DecoderTargets(*decoder.collate(targets)),
        len(items),
        n,
        torch.tensor([i.ref_p for i in items], dtype=torch.float32) if have_refs else None,
        torch.tensor([i.ref_n for i in items], dtype=torch.float32).reshape(len(items), n) if have_refs else None,
    )


class Stage1Model(nn.Module):
    """Information compression: forward(batch) -> (loss, metrics)."""

    def __init__(self, compressor: Compressor, decoder: FrozenDecoder, backend: str | None = None):
        super().__init__()
        self.compressor, self.decoder, self.backend = compressor, decoder, backend

    def collate(self, items: Sequence[Stage1Item]) -> Stage1Batch:
        return collate_stage1(self.compressor, self.decoder, items)

    def forward(self, batch: Stage1Batch):
        compressed = self.compressor(batch.compressor)
        hidden, labels = self.decoder(compressed, batch.targets.ids, batch.targets.lengths)
        logp, _ = target_logprobs(hidden, labels, *self.decoder.head, backend=self.backend,
                                  **self.decoder.logit_transform)
        return -logp.mean(), {}  # transformers' causal-LM loss: the mean over all target tokens


def target_logprobs(hidden, labels, weight, bias=None, backend=None, softcap=None, logit_scale=None):
    """Log-probabilities of every target token of right-padded streams, in one fused call.

    Only the positions that predict a target reach the LM head (padding and ignored positions cost nothing).
    Args: hidden [S, T, H], labels [S, T] (position t predicts labels[:, t + 1]), the head (weight [V, H], bias)
    and its logit transforms (``FrozenDecoder.logit_transform``).
    Returns: (logprobs [M] float32, row [M] int64: the stream each target belongs to), M = number of targets.
    """
    valid = labels[:, 1:] != IGNORE_INDEX
    rows = valid.nonzero()[:, 0]
    logp = F.token_logprobs(hidden[:, :-1][valid], weight, labels[:, 1:][valid], bias, backend=backend,
                            softcap=softcap, logit_scale=logit_scale)
    return logp, rows


def stream_logprobs(compressor: Compressor, decoder: FrozenDecoder, batch: Stage2Batch, backend=None):
    """All decoder streams of a stage-2 batch in one decoder call and one fused log-prob call (per-stream sums
    of ``target_logprobs``, i.e. ``sequence_logprobs`` without head work on padding).

    Returns (hidden [S, 1 + T, H], labels [S, 1 + T], logprobs [S] float32), rows in ``collate_stage2``'s order:
    q->pos (B), pos->pos (B, when the batch has positives), q->neg row-major (nB).
    """
    c_q = compressor(batch.queries)
    streams = [c_q] + ([compressor(batch.positives)] if batch.positives is not None else [])
    streams.append(c_q.repeat_interleave(batch.num_negatives, dim=0))
    hidden, labels = decoder(torch.cat(streams), batch.targets.ids, batch.targets.lengths)
    logp, rows = target_logprobs(hidden, labels, *decoder.head, backend=backend, **decoder.logit_transform)
    # Sums in float64: the alignment loss takes differences of these large, close sums.
    sums = torch.zeros(hidden.shape[0], dtype=torch.float64, device=logp.device).index_add(0, rows, logp.double())
    return hidden, labels, sums.to(logp.dtype)


# Stage 2's distances between pos|c(q) and pos|c(pos): the released log-likelihood gap, then every pair op's.
DISTANCES = ("logprob", *registry.DISTANCES)


class Stage2Model(nn.Module):
    """Conditional distribution alignment: forward(batch) -> (loss, metrics).

    Args:
        beta, tau, ref_sign: as in ``are_fast.alignment_loss`` (released values: 0.1, 0.1, +1).
        distance: "logprob" (released: |log p(pos|c(q)) - log p(pos|c(pos))|), or a pair op's distance name from
            the op registry (``DISTANCES``: "kl", ``conditional_kl``; "jsd", ``conditional_jsd`` at beta 0.5,
            bounded and symmetric) between the decoder streams pos|c(q) and pos|c(pos), summed over the
            positive's tokens.
    """

    def __init__(self, compressor: Compressor, decoder: FrozenDecoder, *, beta: float = 0.1, tau: float = 0.1,
                 ref_sign: float = 1.0, distance: str = "logprob", backend: str | None = None):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance: expected one of {', '.join(DISTANCES)}, got {distance!r}")
        self.compressor, self.decoder = compressor, decoder
        self.beta, self.tau, self.ref_sign, self.distance, self.backend = beta, tau, ref_sign, distance, backend

    def collate(self, items: Sequence[Stage2Item]) -> Stage2Batch:
        if any(i.ref_p is None for i in items):
            raise ValueError("items: stage 2 needs the reference scores of every row (run the ref-scores job)")
        return collate_stage2(self.compressor, self.decoder, items)

    def forward(self, batch: Stage2Batch):
        b, n = batch.rows, batch.num_negatives
        hidden, labels, logp = stream_logprobs(self.compressor, self.decoder, batch, self.backend)
        lp_qp, lp_pp, lp_qn = logp[:b], logp[b: 2 * b], logp[2 * b:].view(b, n)
        distance = None
        if self.distance != "logprob":
            weight, bias = self.decoder.head
            pair_op = getattr(F, registry.DISTANCES[self.distance])
            distance = pair_op(hidden[:b], hidden[b: 2 * b], weight, labels[:b], bias=bias, backend=self.backend,
                               **self.decoder.logit_transform)
        loss = F.alignment_loss(lp_qp, lp_pp, lp_qn, batch.ref_p, batch.ref_n, self.beta, self.tau, self.ref_sign,
                                distance)
        return loss, {"margin": float((lp_qp.detach().unsqueeze(1) - lp_qn.detach()).mean())}


@torch.inference_mode()
def reference_scores(compressor: Compressor, decoder: FrozenDecoder, items: Sequence[Stage2Item],
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ref_p [B] = log p(pos | c(q)) and ref_n [B, n] = log p(neg_j | c(q)), float32, in inference mode: each
    query compressed once, all streams in one decoder call and one fused log-prob call."""
    device = decoder.head[0].device
    batch = collate_stage2(compressor, decoder, items, with_positives=False).to(device)
    _, _, logp = stream_logprobs(compressor, decoder, batch, backend)
    b = batch.rows
    return logp[:b].float(), logp[b:].float().view(b, batch.num_negatives)
