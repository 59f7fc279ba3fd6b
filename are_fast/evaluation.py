"""Triplet accuracy: how often cos(e(q), e(pos)) > cos(e(q), e(neg)) for held-out stage-2 rows.

The embedding e(text) is the mean of the k compressed vectors of text + instruction, as in the paper.
"""
from __future__ import annotations

import torch

from .model import Compressor


@torch.inference_mode()
def embed(compressor: Compressor, texts, instructions, batch_size: int = 64) -> torch.Tensor:
    """[n, H] float32 mean-of-k embeddings, in input order."""
    device = compressor.backbone.get_input_embeddings().weight.device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = compressor.collate(compressor.tokenize(texts[start: start + batch_size],
                                                       instructions[start: start + batch_size]).ids)
        out.append(compressor(batch.to(device)).float().mean(1).cpu())
    return torch.cat(out) if out else torch.empty(0, compressor.hidden_size)


def triplet_accuracy(compressor: Compressor, rows, batch_size: int = 64) -> float:
    """Fraction of (row, negative) pairs ranked right; rows are dicts with query, pos, neg (list), instruction."""
    was_training = compressor.training
    compressor.eval()
    instr = [r["instruction"] for r in rows]
    q = torch.nn.functional.normalize(embed(compressor, [r["query"] for r in rows], instr, batch_size), dim=-1)
    pos = torch.nn.functional.normalize(embed(compressor, [r["pos"] for r in rows], instr, batch_size), dim=-1)
    n = len(rows[0]["neg"]) if rows else 0
    negs = embed(compressor, [neg for r in rows for neg in r["neg"]], [i for i in instr for _ in range(n)], batch_size)
    negs = torch.nn.functional.normalize(negs, dim=-1).view(len(rows), n, -1)
    right = (q * pos).sum(-1, keepdim=True) > torch.einsum("bh,bnh->bn", q, negs)
    compressor.train(was_training)
    return float(right.float().mean()) if rows else float("nan")
