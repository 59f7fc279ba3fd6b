"""Triplet accuracy of held-out stage-2 rows: how often cos(e(q), e(pos)) > cos(e(q), e(neg)), against each
row's hard negatives and against random other rows' texts; e(text) is the mean of the k compressed vectors."""
from __future__ import annotations

import random

import torch

from ..model import Compressor


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


def random_negative_index(num_rows: int, num_negatives: int, seed: int = 0) -> torch.Tensor:
    """[num_rows, num_negatives] int64 indices into the 2 * num_rows texts (queries, then positives) of other
    rows: row i never gets its own texts. Needs at least num_negatives + 1 rows."""
    if num_rows <= num_negatives:
        raise ValueError(f"rows: random negatives need more than {num_negatives} rows, got {num_rows}")
    rng = random.Random(seed)
    index = []
    for i in range(num_rows):
        others = rng.sample([j for j in range(num_rows) if j != i], num_negatives)
        index.append([j + num_rows * rng.randrange(2) for j in others])
    return torch.tensor(index, dtype=torch.int64)


def triplet_accuracies(compressor: Compressor, rows, seed: int = 0, batch_size: int = 64) -> dict:
    """{"hard": fraction of (row, own negative) pairs ranked right, "random": the same against as many random
    negatives per row (``random_negative_index``)}. Rows are dicts with query, pos, neg (list), instruction.
    Each text is embedded once; the compressor's train/eval mode is restored."""
    if not rows:
        raise ValueError("rows: triplet accuracy needs at least one row")
    was_training = compressor.training
    compressor.eval()
    n, instr = len(rows[0]["neg"]), [r["instruction"] for r in rows]
    texts = [r["query"] for r in rows] + [r["pos"] for r in rows] + [neg for r in rows for neg in r["neg"]]
    emb = torch.nn.functional.normalize(embed(compressor, texts, instr + instr + [i for i in instr for _ in range(n)],
                                              batch_size), dim=-1)
    compressor.train(was_training)
    q, pos, negs = emb[: len(rows)], emb[len(rows): 2 * len(rows)], emb[2 * len(rows):].view(len(rows), n, -1)
    positive = (q * pos).sum(-1, keepdim=True)  # [B, 1]
    hard = positive > torch.einsum("bh,bnh->bn", q, negs)
    rand = positive > torch.einsum("bh,bnh->bn", q, emb[random_negative_index(len(rows), n, seed)])
    return {"hard": int(hard.sum()) / hard.numel(), "random": int(rand.sum()) / rand.numel()}
