"""Text embeddings from an AutoRegEmbed model, fast: ``are_fast.Encoder``.

    from are_fast import Encoder
    enc = Encoder.from_pretrained("out/stage2")          # CUDA + bfloat16 when present, else CPU + float32
    emb = enc.encode(["a text", "another"], instruction="This sentence means in one word:")   # [2, H] float32

An embedding is the mean of the k compressed vectors of ``are_fast.model.Compressor`` (the paper's pooling),
L2-normalized by default. Where the time goes and what this does about it:
- padding: texts are sorted by length and cut into batches under a token budget (``max_tokens`` padded tokens,
  or real tokens when packed), not a fixed count of texts in input order;
- padding in the model: rows run by the device's fastest route (``are_fast.model.layout``): on CPU "varlen",
  no padding outside attention; with flash-attn installed on CUDA, varlen with no padding at all;
- work nobody needs: no LM head (the compressor keeps only the model body), ``torch.inference_mode``, bfloat16
  on GPU;
- the CPU side: tokenization, sorting and collation of the next chunk run in a background thread while the
  model computes the current one (``encode_chunks``), which also feeds the file job (``are_fast.encoding.encode_job``).
Results come back in input order.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..model.compressor import Compressor, CompressorBatch
from ..model.layout import flash_attention_available

DEFAULT_MAX_TOKENS = {"cuda": 32768, "cpu": 8192}  # padded tokens per batch (see the benchmark)
CHUNK_TEXTS = 2048  # texts tokenized, sorted and collated together in the background thread


def plan_batches(lengths: Sequence[int], max_tokens: int, batch_size: int | None = None,
                 packed: bool = False) -> list[list[int]]:
    """Row indices cut into batches, longest rows first (an out-of-memory error shows up at once).

    A batch costs rows x its longest row (padded) or the sum of its rows (``packed``); it stays within
    ``max_tokens`` and ``batch_size`` rows, except a single row over the budget, which runs alone. Ties keep
    input order, so the plan depends on the lengths only.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current:
            rows = len(current) + 1
            cost = total + lengths[i] if packed else rows * lengths[current[0]]
            if cost > max_tokens or (batch_size is not None and rows > batch_size):
                batches.append(current)
                current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


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
    """``encode_chunks``' result for one chunk: embeddings [size, H] float32 on the CPU in the chunk's order."""

    source: Any
    embeddings: torch.Tensor
    tokens: int
    truncated: int


def _positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


def _check_texts(texts: Sequence) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts: expected strings, item {i} is {type(text).__name__}")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return dtype


class Encoder:
    """Embeds texts with a compressor; ``from_pretrained`` loads a model directory.

    Args:
        compressor: an ``are_fast.model.Compressor`` (its ``max_text_tokens`` is the truncation length).
        device: where it runs (default: the compressor's device).
        max_tokens: default token budget per batch (default: 32768 on CUDA, 8192 on CPU).
        batch_size: default cap on texts per batch (default: none, the budget decides).
    """

    def __init__(self, compressor: Compressor, *, device=None, max_tokens: int | None = None,
                 batch_size: int | None = None):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor: expected an are_fast.model.Compressor, got {type(compressor).__name__}")
        _positive("max_tokens", max_tokens)
        _positive("batch_size", batch_size)
        self.compressor = compressor.eval()
        weight = compressor.backbone.get_input_embeddings().weight
        self.device = torch.device(device) if device is not None else weight.device
        if weight.device != self.device:
            self.compressor.to(self.device)
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS.get(self.device.type, DEFAULT_MAX_TOKENS["cuda"])
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, *, max_length: int | None = 512,
                        num_embed_tokens: int | None = None, max_tokens: int | None = None,
                        batch_size: int | None = None, pack: bool | None = None,
                        attn_implementation: str | None = None, trust_remote_code: bool = False) -> "Encoder":
        """Load a model directory written by our trainer (or a released AutoRegEmbed checkpoint).

        device: default CUDA when available, else CPU. dtype: default bfloat16 on CUDA, float32 elsewhere.
        max_length: texts are cut to this many tokens (counted). num_embed_tokens: k, default read from the
        tokenizer's <EMBED{i}> tokens. pack: True runs rows without padding (the "varlen" route of
        ``are_fast.model.layout``), False padded; default: the device's fastest route (``default_route``), and on
        CUDA with flash-attn installed "varlen" (then ``attn_implementation`` defaults to "flash_attention_2").
        Raises ValueError naming the path when it is not a loadable model directory.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"model: {path!r} is not a directory (expected a saved model directory)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model: {path!r} has no config.json (expected a saved model directory)")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(dtype, device)
        if pack is None and device.type == "cuda" and flash_attention_available():
            pack = True
        if pack and attn_implementation is None and flash_attention_available():
            attn_implementation = "flash_attention_2"
        route = None if pack is None else "varlen" if pack else "padded"
        try:
            comp = Compressor.from_pretrained(path, num_embed_tokens, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code, max_text_tokens=max_length,
                                              route=route)
        except (OSError, KeyError) as err:  # transformers' errors for unreadable or unknown checkpoints
            raise ValueError(f"model: could not load {path!r} as a transformers model: {err}") from err
        return cls(comp, device=device, max_tokens=max_tokens, batch_size=batch_size)

    @property
    def hidden_size(self) -> int:
        """H, the embedding size."""
        return self.compressor.hidden_size

    @property
    def num_embed_tokens(self) -> int:
        """k, the compressed vectors averaged into one embedding."""
        return self.compressor.num_embed_tokens

    @property
    def max_length(self) -> int | None:
        """Texts are cut to this many tokens (None: no limit)."""
        return self.compressor.max_text_tokens

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (embeddings are always returned in float32)."""
        return self.compressor.backbone.get_input_embeddings().weight.dtype

    def prepare(self, texts: Sequence[str], instruction: str | None = None, *, source=None,
                max_tokens: int | None = None, batch_size: int | None = None) -> PreparedChunk:
        """CPU work for a chunk of texts: tokenize (with the instruction), plan batches, collate them."""
        tokenized = self.compressor.tokenize(texts, instruction)
        k = self.num_embed_tokens
        lengths = [len(ids) + k for ids in tokenized.ids]
        plan = plan_batches(lengths, max_tokens or self.max_tokens, batch_size or self.batch_size,
                            self.compressor.pack)
        batches = [(torch.tensor(rows, dtype=torch.int64), self.compressor.collate([tokenized.ids[i] for i in rows]))
                   for rows in plan]
        return PreparedChunk(source, len(texts), batches, sum(lengths), tokenized.truncated)

    def run(self, chunk: PreparedChunk, normalize: bool = True,
            on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Model work for a prepared chunk: embeddings [size, H] float32 on the CPU, in the chunk's order.

        ``on_batch(texts, tokens)`` is called after each batch (progress bars).
        """
        out = torch.empty(chunk.size, self.hidden_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for rows, batch in chunk.batches:
                vectors = self.compressor(batch.to(self.device))  # [B, k, H]
                emb = vectors.float().mean(1)
                out[rows.to(self.device)] = F.normalize(emb, dim=-1) if normalize else emb
                if on_batch is not None:
                    on_batch(len(rows), batch.num_tokens)
        return out.cpu()

    def encode_chunks(self, chunks: Iterable, read: Callable[[Any], Sequence[str]] | None = None, *,
                      instruction: str | None = None, normalize: bool = True, max_tokens: int | None = None,
                      batch_size: int | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> Iterator[EncodedChunk]:
        """Encode a stream of chunks; the next chunk is read and prepared in a background thread meanwhile.

        ``read(chunk)`` returns the chunk's texts (default: the chunk is a sequence of texts); it runs in the
        background thread, so parsing input overlaps compute too. Yields one ``EncodedChunk`` per chunk, in order.
        """
        _positive("max_tokens", max_tokens)
        _positive("batch_size", batch_size)

        def prepare(chunk) -> PreparedChunk:
            texts = chunk if read is None else read(chunk)
            _check_texts(texts)
            return self.prepare(texts, instruction, source=chunk, max_tokens=max_tokens, batch_size=batch_size)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="are-fast-prepare") as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(prepare, chunk))
                if len(pending) > 1:  # one chunk prepared ahead of the one computing
                    yield self._finish(pending.popleft().result(), normalize, on_batch)
            while pending:
                yield self._finish(pending.popleft().result(), normalize, on_batch)

    def _finish(self, chunk: PreparedChunk, normalize: bool, on_batch) -> EncodedChunk:
        return EncodedChunk(chunk.source, self.run(chunk, normalize, on_batch), chunk.tokens, chunk.truncated)

    def encode(self, texts: str | Sequence[str], instruction: str | None = None, batch_size: int | None = None,
               max_tokens: int | None = None, normalize: bool = True, convert_to: str = "numpy",
               show_progress_bar: bool = False):
        """Embed texts; the call shape follows sentence-transformers' ``encode``.

        Args:
            texts: a list of n strings (or one string).
            instruction: appended after each text, as in AutoRegEmbed ("This sentence means in one word:").
            batch_size: cap on texts per batch (default: the encoder's, none: the token budget decides).
            max_tokens: token budget per batch (default: the encoder's).
            normalize: L2-normalize each embedding (cosine similarity = dot product).
            convert_to: "numpy" (np.ndarray) or "torch" (a CPU tensor).
            show_progress_bar: a tqdm bar with texts/s.

        Returns:
            [n, H] float32 (or [H] for one string), row i the embedding of texts[i].
        """
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to: expected 'numpy' or 'torch', got {convert_to!r}")
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a string or None, got {type(instruction).__name__}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        _check_texts(texts)
        # Character length orders the chunks; each chunk is then sorted exactly by its token lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = [order[i: i + CHUNK_TEXTS] for i in range(0, len(order), CHUNK_TEXTS)]
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), unit="text", disable=not show_progress_bar, desc="encode") as bar:
            for done in self.encode_chunks(chunks, lambda idx: [texts[i] for i in idx], instruction=instruction,
                                           normalize=normalize, max_tokens=max_tokens, batch_size=batch_size,
                                           on_batch=lambda n, _tokens: bar.update(n)):
                out[torch.tensor(done.source, dtype=torch.int64)] = done.embeddings
        if single:
            out = out[0]
        return out.numpy() if convert_to == "numpy" else out

    def for_mteb(self, instructions: Mapping[str, str] | None = None, default_instruction: str | None = None,
                 **encode_kwargs) -> "MTEBModel":
        """This encoder behind MTEB's model interface (see ``MTEBModel``)."""
        return MTEBModel(self, instructions, default_instruction, **encode_kwargs)


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
