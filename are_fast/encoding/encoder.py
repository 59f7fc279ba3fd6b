"""``are_fast.Encoder``: text embeddings from an AutoRegEmbed model (the mean of the k compressed vectors), with
sentence-transformers' call shape, in input order. Speed: length-sorted batches under a token budget
(``batching``), the device's fastest padding route, no LM head, tokenization in a background thread
(``pipeline``). README "Encoding" has the defaults and the options."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..model.compressor import Compressor
from ..model.st_files import read_sentence_transformers_files, write_sentence_transformers_files
from ..model.layout import flash_attention_available
from .batching import DEFAULT_MAX_TOKENS, check_positive
from .defaults import NORMALIZE, default_dtype
from .pipeline import EncodedChunk, PreparedChunk, check_texts, pipelined, prepare_chunk, run_chunk

CHUNK_TEXTS = 2048  # texts tokenized, sorted and collated together in the background thread


def _as_matrix(embeddings, name: str) -> torch.Tensor:
    """[n, H] float32 from a numpy array or tensor [n, H] or [H] (a list of [H] tensors is stacked)."""
    if isinstance(embeddings, (list, tuple)) and embeddings and isinstance(embeddings[0], torch.Tensor):
        embeddings = torch.stack(embeddings)
    out = torch.as_tensor(embeddings, dtype=torch.float32)
    if out.dim() == 1:
        out = out.unsqueeze(0)
    if out.dim() != 2:
        raise ValueError(f"{name}: expected embeddings [n, H] or [H], got shape {tuple(out.shape)}")
    return out


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The given dtype (a torch dtype or its name), else ``defaults.default_dtype(device)``."""
    if dtype is None:
        return default_dtype(device)
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
        prompts: named instructions, as sentence-transformers' ``prompts`` ({"query": "...", ...}).
        default_prompt_name: the prompt used when a call names none (None: no instruction).
        path: the folder the model came from (``save_sentence_transformers`` writes there by default).
    """

    def __init__(self, compressor: Compressor, *, device=None, max_tokens: int | None = None,
                 batch_size: int | None = None, prompts: Mapping[str, str] | None = None,
                 default_prompt_name: str | None = None, path: str | os.PathLike | None = None):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor: expected an are_fast.model.Compressor, got {type(compressor).__name__}")
        check_positive("max_tokens", max_tokens)
        check_positive("batch_size", batch_size)
        self.prompts = dict(prompts or {})
        for name, text in self.prompts.items():
            if not isinstance(text, str):
                raise TypeError(f"prompts: expected strings, {name!r} is {type(text).__name__}")
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name: {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.path = None if path is None else os.fspath(path)
        self.compressor = compressor.eval()
        weight = compressor.backbone.get_input_embeddings().weight
        self.device = torch.device(device) if device is not None else weight.device
        if weight.device != self.device:
            self.compressor.to(self.device)
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS.get(self.device.type, DEFAULT_MAX_TOKENS["cuda"])
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, *,
                        max_length: int | None | str = "auto", num_embed_tokens: int | None = None,
                        max_tokens: int | None = None, batch_size: int | None = None, pack: bool | None = None,
                        attn_implementation: str | None = None, trust_remote_code: bool = False,
                        prompts: Mapping[str, str] | None = None,
                        default_prompt_name: str | None = None) -> "Encoder":
        """Load a model directory written by our trainer (or a released AutoRegEmbed checkpoint).

        device: default CUDA when available, else CPU. dtype: default bfloat16 on CUDA and on a CPU with bf16
        matrix units (AMX, AVX512-BF16) where a bf16 matmul measures faster than a float32 one (once per process:
        ``are_fast.ops.sweep_precision.automatic``), else float32; ``repr`` shows which.
        max_length: texts are cut to this many tokens (counted); "auto": the folder's sentence-transformers
        module config when it has one (the training ``--max-text-tokens``), else 512 or what the model's positions
        leave after k and the instruction when fewer; None: what they leave (``Compressor``'s max_text_tokens).
        num_embed_tokens: k, default read from the tokenizer's <EMBED{i}> tokens. pack: True runs rows
        without padding (the "varlen" route of ``are_fast.model.layout``), False padded; default: the device's
        fastest route (``default_route``), and on CUDA with flash-attn installed "varlen" (then
        ``attn_implementation`` defaults to "flash_attention_2"). prompts / default_prompt_name: default those of the folder's
        ``config_sentence_transformers.json`` (the training instruction); given prompts are added to them.
        Raises ValueError naming the path when it is not a loadable model directory.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"model: {path!r} is not a directory (expected a saved model directory)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model: {path!r} has no config.json (expected a saved model directory)")
        saved = read_sentence_transformers_files(path)
        if max_length == "auto":
            max_length = saved.get("max_length", "auto")  # the Compressor resolves "auto" against the positions
        elif isinstance(max_length, str):
            raise ValueError(f"max_length: expected a positive int, None or 'auto', got {max_length!r}")
        else:
            check_positive("max_length", max_length)
        prompts = {**saved.get("prompts", {}), **(prompts or {})}
        if default_prompt_name is None:
            default_prompt_name = saved.get("default_prompt_name")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(dtype, device)
        flash_default = pack is None and device.type == "cuda" and flash_attention_available()
        if flash_default:
            pack = True
        if pack and attn_implementation is None and flash_attention_available():
            attn_implementation = "flash_attention_2"
        # A chosen route is checked against the model (architecture.choose_route); the flash default is not a
        # choice of the caller's, so a model that cannot take it keeps the device's default.
        route = None if pack is None or flash_default else "varlen" if pack else "padded"
        try:
            comp = Compressor.from_pretrained(path, num_embed_tokens, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code, max_text_tokens=max_length,
                                              route=route)
        except (OSError, KeyError) as err:  # transformers' errors for unreadable or unknown checkpoints
            raise ValueError(f"model: could not load {path!r} as a transformers model: {err}") from err
        if flash_default and "varlen" not in comp.route_problems:
            comp.route = "varlen"
        return cls(comp, device=device, max_tokens=max_tokens, batch_size=batch_size, prompts=prompts,
                   default_prompt_name=default_prompt_name, path=path)

    def __repr__(self) -> str:
        return (f"Encoder(path={self.path!r}, k={self.num_embed_tokens}, hidden_size={self.hidden_size}, "
                f"max_length={self.max_length}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"device={self.device}, route={self.compressor.resolved_route}, max_tokens={self.max_tokens}, "
                f"batch_size={self.batch_size}, prompts={self.prompts!r}, "
                f"default_prompt_name={self.default_prompt_name!r})")

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
                      instruction: str | None = None, normalize: bool = NORMALIZE, max_tokens: int | None = None,
                      batch_size: int | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> Iterator[EncodedChunk]:
        """Encode a stream of chunks; the next chunk is read and prepared in a background thread meanwhile.

        ``read(chunk)`` returns the chunk's texts (default: the chunk is a sequence of texts); it runs in the
        background thread, so parsing input overlaps compute too. ``normalize``: L2-normalize each embedding.
        Yields one ``EncodedChunk`` per chunk, in order.
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

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The instruction of a call: ``prompt``, else ``prompts[prompt_name]``, else the default prompt, else None."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected a string or None, got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name: {prompt_name!r} is not one of the prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        return None if self.default_prompt_name is None else self.prompts[self.default_prompt_name]

    def encode(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int | None = None, show_progress_bar: bool | None = None, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, normalize_embeddings: bool = NORMALIZE, *,
               max_tokens: int | None = None):
        """Embed texts; the arguments and their defaults are those of sentence-transformers' ``encode``.

        Args:
            sentences: n strings (or one string).
            prompt_name: a key of ``prompts``; its text is the instruction.
            prompt: the instruction itself ("This sentence means in one word:"); it wins over ``prompt_name``.
                With neither, the default prompt (``default_prompt_name``), if any. Unlike sentence-transformers,
                which puts a prompt before the text, the instruction goes after it, where AutoRegEmbed was trained
                with it: [bos] text\\n instruction\\n <EMBED0>..<EMBED{k-1}>.
            batch_size: cap on texts per batch. Default None, not sentence-transformers' 32: the ``max_tokens``
                budget sizes batches (many short texts or few long ones), which a fixed count cannot do.
            show_progress_bar: a tqdm bar; None: shown when the "are_fast" logger is at INFO or DEBUG.
            convert_to_numpy: return a numpy array [n, H]; ``convert_to_tensor``: a torch tensor [n, H] (wins);
                neither: a list of n tensors [H]. Tensors are on the CPU, whatever the device.
            normalize_embeddings: L2-normalize each embedding (cosine similarity = dot product); default off, as
                in sentence-transformers and ``are-fast encode`` (``are_fast.encoding.defaults``).
            max_tokens: token budget per batch (default: the encoder's).

        Returns:
            [n, H] float32 (or [H] for one string), row i the embedding of sentences[i].
        """
        instruction = self.resolve_prompt(prompt_name, prompt)
        if show_progress_bar is None:
            show_progress_bar = logging.getLogger("are_fast").getEffectiveLevel() <= logging.INFO
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        check_texts(texts)
        # Character length orders the chunks; each chunk is then sorted exactly by its token lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = [order[i: i + CHUNK_TEXTS] for i in range(0, len(order), CHUNK_TEXTS)]
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), unit="text", disable=not show_progress_bar, desc="encode") as bar:
            for done in self.encode_chunks(chunks, lambda idx: [texts[i] for i in idx], instruction=instruction,
                                           normalize=normalize_embeddings, max_tokens=max_tokens,
                                           batch_size=batch_size, on_batch=lambda n, _tokens: bar.update(n)):
                out[torch.tensor(done.source, dtype=torch.int64)] = done.embeddings
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.numpy()
        return out if single else list(out)

    @staticmethod
    def similarity(embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarities [n, m] float32 of embeddings [n, H] (or [H]) and [m, H] (numpy or torch)."""
        a, b = _as_matrix(embeddings1, "embeddings1"), _as_matrix(embeddings2, "embeddings2")
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    @staticmethod
    def similarity_pairwise(embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity [n] float32 of row i of embeddings1 [n, H] with row i of embeddings2 [n, H]."""
        a, b = _as_matrix(embeddings1, "embeddings1"), _as_matrix(embeddings2, "embeddings2")
        if a.shape != b.shape:
            raise ValueError(f"embeddings2: expected the shape of embeddings1 {tuple(a.shape)}, got {tuple(b.shape)}")
        return F.cosine_similarity(a, b, dim=-1)

    def save_sentence_transformers(self, path: str | os.PathLike | None = None) -> str:
        """Make a folder load with ``SentenceTransformer(path, trust_remote_code=True)``; returns the folder.

        path None (or the folder this encoder was loaded from): only the sentence-transformers files are
        written there (``are_fast.model.st_files``), the weights are left as they are. Another path: the model
        is saved there first (weights in this encoder's dtype). The prompts are this encoder's.
        """
        target = self.path if path is None else os.fspath(path)
        if target is None:
            raise ValueError("path: this encoder was not loaded from a folder; give the folder to write")
        same = self.path is not None and os.path.isdir(target) and os.path.samefile(target, self.path)
        if not same:
            self.compressor.save_pretrained(target)
        write_sentence_transformers_files(target, self.compressor, self.prompts, self.default_prompt_name)
        return target
