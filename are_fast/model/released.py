"""The stage-2 step as the released AutoRegEmbed code runs it: the oracle of the tests, the naive benchmark row.

Three model calls per batch (q->pos, pos->pos, then q->neg with the query encoded again for every negative),
each padded on its own, each a compressor call and a full causal-LM call whose [S, T, V] logits are
materialized and log-softmaxed. Same layout and numbers as ``are_fast.model.objectives.Stage2Model``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..ops import reference
from .compressor import Compressor
from .decoder import FrozenDecoder
from .layout import decoder_labels
from .objectives import Stage2Item


def _score(compressor: Compressor, decoder: FrozenDecoder, prefixes, targets) -> torch.Tensor:
    """log p(target | c(prefix)) per row [S] from materialized logits, DPO's get_batch_logps."""
    device = decoder.head[0].device
    compressed = compressor(compressor.collate(prefixes).to(device))
    ids, lengths = (t.to(device) for t in decoder.collate(targets))
    embeds = torch.cat([compressed, decoder.lm.get_input_embeddings()(ids)], dim=1)
    k = compressed.shape[1]
    mask = (torch.arange(embeds.shape[1], device=device) < (lengths + k).unsqueeze(1)).long()
    logits = decoder.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, float64 stays float64
    labels = decoder_labels(ids, lengths, k)[:, 1:]
    valid = labels != -100
    picked = logits[:, :-1].log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (picked * valid).sum(-1)


def released_stage2_loss(compressor: Compressor, decoder: FrozenDecoder, items: Sequence[Stage2Item],
                         beta: float = 0.1, tau: float = 0.1, ref_sign: float = 1.0) -> torch.Tensor:
    """The released stage-2 loss of a batch of rows (which carry their reference scores)."""
    n = len(items[0].neg_targets)
    lp_qp = _score(compressor, decoder, [i.query for i in items], [i.pos_target for i in items])
    lp_pp = _score(compressor, decoder, [i.pos_prefix for i in items], [i.pos_target for i in items])
    lp_qn = _score(compressor, decoder, [i.query for i in items for _ in range(n)],
                   [neg for i in items for neg in i.neg_targets]).view(len(items), n)
    ref_p = torch.tensor([i.ref_p for i in items], dtype=torch.float32, device=lp_qp.device)
    ref_n = torch.tensor([i.ref_n for i in items], dtype=torch.float32, device=lp_qp.device).view(len(items), n)
    return reference.alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n, beta, tau, ref_sign)
