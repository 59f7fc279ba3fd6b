"""Text embeddings from an AutoRegEmbed model, fast: ``are_fast.Encoder``.

    from are_fast import Encoder
    enc = Encoder.from_pretrained("out/stage2")          # CUDA + bfloat16 when present, else CPU + float32
    emb = enc.encode(["a text", "another"], instruction="This sentence means in one word:")   # [2, H] float32

An embedding is the mean of the k compressed vectors of ``are_fast.model.Compressor`` (the paper's pooling),
L2-normalized by default. Where the time goes and what this does about it:
- padding: texts are sorted by length and cut into batches under a token budget (``max_tokens`` padded tokens,
  or real tokens when packed), not a fixed count of texts in input order;
- attention over padding: with flash-attn installed on CUDA the rows run packed (varlen), no padding at all;
- work nobody needs: no LM head (the compressor keeps only the model body), ``torch.inference_mode``, bfloat16
  on GPU;
- the CPU side: tokenization, sorting and collation of the next chunk run in a background thread while the
  model computes the current one (``encode_chunks``, built on ``are_fast.encoding.pipeline``), which also feeds
  the file job (``are_fast.encoding.encode_job``).
Results come back in input order. Batch planning: ``batching``; MTEB's interface: ``mteb_adapter``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..model.compressor import Compressor
from ..model.layout import flash_attention_available
from .batching import DEFAULT_MAX_TOKENS, check_positive
from .mteb_adapter import MTEBModel
from .pipeline import EncodedChunk, PreparedChunk, check_texts, pipelined, prepare_chunk, run_chunk

CHUNK_TEXTS = 2048  # texts tokenized, sorted and collated together in the background thread


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
        check_positive("max_tokens", max_tokens)
        check_positive("batch_size", batch_size)
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
        tokenizer's <EMBED{i}> tokens. pack: run rows packed (varlen); default: on CUDA when flash-attn is
        installed (then ``attn_implementation`` defaults to "flash_attention_2"). Raises ValueError naming the
        path when it is not a loadable model directory.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"model: {path!r} is not a directory (expected a saved model directory)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model: {path!r} has no config.json (expected a saved model directory)")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(dtype, device)
        if pack is None:
            pack = device.type == "cuda" and flash_attention_available()
        if pack and attn_implementation is None and flash_attention_available():
            attn_implementation = "flash_attention_2"
        try:
            comp = Compressor.from_pretrained(path, num_embed_tokens, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code, max_text_tokens=max_length,
                                              pack=pack)
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

    def encode_chunks(self, chunks: Iterable, read: Callable[[Any], Sequence[str]] | None = None, *,
                      instruction: str | None = None, normalize: bool = True, max_tokens: int | None = None,
                      batch_size: int | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> Iterator[EncodedChunk]:
        """Encode a stream of chunks; the next chunk is read and prepared in a background thread meanwhile.

        ``read(chunk)`` returns the chunk's texts (default: the chunk is a sequence of texts); it runs in the
        background thread, so parsing input overlaps compute too. Yields one ``EncodedChunk`` per chunk, in order.
        """
        check_positive("max_tokens", max_tokens)
        check_positive("batch_size", batch_size)

        def prepare(chunk) -> PreparedChunk:
            texts = chunk if read is None else read(chunk)
            check_texts(texts)
            return prepare_chunk(self.compressor, texts, instruction, max_tokens or self.max_tokens,
                                 batch_size or self.batch_size, source=chunk)

        def run(chunk: PreparedChunk) -> EncodedChunk:
            embeddings = run_chunk(self.compressor, chunk, self.device, normalize, on_batch)
            return EncodedChunk(chunk.source, embeddings, chunk.tokens, chunk.truncated)

        return pipelined(chunks, prepare, run)

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
        check_texts(texts)
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
