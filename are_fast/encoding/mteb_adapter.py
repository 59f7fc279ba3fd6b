"""MTEB's model interface over an ``are_fast.Encoder`` (needs the ``mteb`` extra only to run MTEB itself).

    import mteb
    from are_fast.encoding.mteb_adapter import MTEBModel
    results = mteb.evaluate(MTEBModel(encoder, {"query": "..."}), tasks, cache=None)

MTEB 2.x calls ``encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset,
prompt_type=None)`` and reads the model's ``mteb_model_meta``; MTEB 1.x called ``encode(sentences, *,
task_name, prompt_type=None)``. Both call shapes work here; the package is imported only for the metadata.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from .encoder import Encoder


class MTEBModel:
    """MTEB's encoder interface over an ``Encoder``.

    The instruction of a call is the first of ``instructions["<task>-<prompt type>"]``,
    ``instructions["<task>"]``, ``instructions["<prompt type>"]`` (prompt type "query" or "document"),
    ``default_instruction`` and the encoder's default prompt (the training instruction) that exists.
    ``encode_kwargs`` (max_tokens, normalize_embeddings, ...) go to ``Encoder.encode``. MTEB's own
    ``batch_size`` (it always sends one, 32 by default) is ignored: the encoder's token budget sizes batches.
    """

    def __init__(self, encoder: Encoder, instructions: Mapping[str, str] | None = None,
                 default_instruction: str | None = None, **encode_kwargs):
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.default_instruction = default_instruction
        self.encode_kwargs = encode_kwargs

    @property
    def mteb_model_meta(self):
        """MTEB 2.x's ``ModelMeta`` for this encoder: its name ("are_fast/<folder>"), H, max length, cosine.

        ``mteb.evaluate`` evaluates a plain object only when it has this attribute (otherwise it tries to load
        a model by name). Imports mteb."""
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        folder = os.path.basename(os.path.normpath(self.encoder.path)) if self.encoder.path else "encoder"
        n_parameters = sum(p.numel() for p in self.encoder.compressor.parameters())
        return ModelMeta.create_empty({
            "name": f"are_fast/{folder}", "embed_dim": self.encoder.hidden_size,
            "max_tokens": self.encoder.max_length, "n_parameters": n_parameters,
            "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"], "use_instructions": True,
        })

    def instruction_for(self, task_name: str | None, prompt_type=None) -> str | None:
        """The instruction used for a task and prompt type (an enum or its string value); None: the encoder's
        default prompt."""
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
        options = {"show_progress_bar": kwargs.get("show_progress_bar", False), **self.encode_kwargs}
        return self.encoder.encode(texts, prompt=self.instruction_for(task_name, prompt_type), **options)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarities [n, m] of embeddings [n, H] and [m, H]."""
        return self.encoder.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity [n] of row i of embeddings1 with row i of embeddings2."""
        return self.encoder.similarity_pairwise(embeddings1, embeddings2)
