"""MTEB's model interface over an ``Encoder``, for MTEB 1.x and 2.x, without importing mteb."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .encoder import Encoder


class MTEBModel:
    """MTEB's encoder interface over an ``Encoder``, for MTEB 1.x and 2.x, without importing mteb.

    MTEB 2.x calls ``encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset,
    prompt_type=None)``; 1.x calls ``encode(sentences, *, task_name, prompt_type=None)``. Both work here.

    The instruction of a call is the first of ``instructions["<task>-<prompt type>"]``,
    ``instructions["<task>"]``, ``instructions["<prompt type>"]`` (prompt type "query", "document" or
    "passage") and ``default_instruction`` that exists. ``encode_kwargs`` (max_tokens, normalize, ...) go to
    ``Encoder.encode``; MTEB's own batch_size is ignored, as the token budget sizes batches.

        results = mteb.evaluate(encoder.for_mteb({"query": "..."}), tasks)        # MTEB 2.x
    """

    def __init__(self, encoder: Encoder, instructions: Mapping[str, str] | None = None,
                 default_instruction: str | None = None, **encode_kwargs):
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.default_instruction = default_instruction
        self.encode_kwargs = encode_kwargs

    def instruction_for(self, task_name: str | None, prompt_type=None) -> str | None:
        """The instruction used for a task and prompt type (an enum or its string value)."""
        kind = getattr(prompt_type, "value", prompt_type)
        for key in (f"{task_name}-{kind}", task_name, kind):
            if key in self.instructions:
                return self.instructions[key]
        return self.default_instruction

    def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
               task_name: str | None = None, prompt_type=None, **kwargs):
        """[n, H] float32 numpy embeddings of a list of sentences (1.x) or a DataLoader of {"text": [...]} (2.x)."""
        if isinstance(inputs, str):
            raise TypeError("inputs: expected a list of sentences or a DataLoader of batches, got one string")
        if isinstance(inputs, Sequence):
            texts = list(inputs)
        else:  # MTEB 2.x: batches are dicts whose "text" holds the strings
            texts = [text for batch in inputs for text in batch["text"]]
        if task_metadata is not None:
            task_name = task_metadata.name
        kwargs = {"show_progress_bar": kwargs.get("show_progress_bar", False), **self.encode_kwargs}
        return self.encoder.encode(texts, self.instruction_for(task_name, prompt_type), **kwargs)

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarities [n, m] of embeddings [n, H] and [m, H]."""
        a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    def similarity_pairwise(self, a, b) -> torch.Tensor:
        """Cosine similarity [n] of row i of a with row i of b."""
        a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
        return F.cosine_similarity(a, b, dim=-1)
