"""The encoding pipeline: CPU work (tokenize, plan, collate) for the next chunk overlaps model work on this one.

    chunk = prepare_chunk(compressor, texts, instruction, max_tokens=8192)        # CPU: PreparedChunk
    emb = run_chunk(compressor, chunk, device, normalize=True)                     # model: [n, H] float32, CPU
    for done in pipelined(chunks, prepare, run): ...                              # both, overlapped

``pipelined`` runs ``prepare`` in one background thread, one chunk ahead of ``run``: tokenization is Python
and Rust work that releases the GIL for long stretches, and torch releases it inside every kernel, so on a
GPU the model never waits for the tokenizer and on a CPU the two share the cores.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F

from ..model.compressor import Compressor, CompressorBatch
from .batching import plan_batches

Result = TypeVar("Result")


@dataclass
class PreparedChunk:
    """A chunk ready for the model: collated batches (rows = positions within the chunk) and its counts."""

    source: Any  # what the caller passed as the chunk
    size: int  # texts
    batches: list[tuple[torch.Tensor, CompressorBatch]]  # row positions within the chunk [B] int64, the batch
    tokens: int  # real tokens, the k special ones included
    truncated: int  # texts cut to max_length


@dataclass
class EncodedChunk:
    """One chunk's result: embeddings [size, H] float32 on the CPU in the chunk's order, and its counts."""

    source: Any
    embeddings: torch.Tensor
    tokens: int
    truncated: int


def check_texts(texts: Sequence) -> None:
    """TypeError naming the first item that is not a string."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts: expected strings, item {i} is {type(text).__name__}")


def prepare_chunk(compressor: Compressor, texts: Sequence[str], instruction: str | None, max_tokens: int,
                  batch_size: int | None = None, source=None) -> PreparedChunk:
    """CPU work for a chunk of texts: tokenize (with the instruction), plan batches, collate them."""
    tokenized = compressor.tokenize(texts, instruction)
    k = compressor.num_embed_tokens
    lengths = [len(ids) + k for ids in tokenized.ids]
    plan = plan_batches(lengths, max_tokens, batch_size, compressor.pack)
    batches = [(torch.tensor(rows, dtype=torch.int64), compressor.collate([tokenized.ids[i] for i in rows]))
               for rows in plan]
    return PreparedChunk(source, len(texts), batches, sum(lengths), tokenized.truncated)


def run_chunk(compressor: Compressor, chunk: PreparedChunk, device: torch.device, normalize: bool,
              on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Model work for a prepared chunk: embeddings [size, H] float32 on the CPU, in the chunk's order.

    An embedding is the mean of the k compressed vectors (in float32), L2-normalized when ``normalize``.
    ``on_batch(texts, tokens)`` is called after each batch (progress bars).
    """
    out = torch.empty(chunk.size, compressor.hidden_size, dtype=torch.float32, device=device)
    with torch.inference_mode():
        for rows, batch in chunk.batches:
            vectors = compressor(batch.to(device))  # [B, k, H]
            emb = vectors.float().mean(1)
            out[rows.to(device)] = F.normalize(emb, dim=-1) if normalize else emb
            if on_batch is not None:
                on_batch(len(rows), batch.num_tokens)
    return out.cpu()


def pipelined(chunks: Iterable, prepare: Callable[[Any], PreparedChunk],
              run: Callable[[PreparedChunk], Result]) -> Iterator[Result]:
    """``run(prepare(chunk))`` for each chunk, in order, with ``prepare`` one chunk ahead in a background thread.

    An exception in ``prepare`` surfaces here, at the chunk it belongs to.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="are-fast-prepare") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(prepare, chunk))
            if len(pending) > 1:  # one chunk prepared ahead of the one computing
                yield run(pending.popleft().result())
        while pending:
            yield run(pending.popleft().result())
