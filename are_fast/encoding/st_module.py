"""An AutoRegEmbed model as a sentence-transformers 6 module (the ``st`` extra): it tokenizes as ``Encoder``
does (the prompt after the text), runs the compressor and pools the k compressed states by their mean, so both
give the same vectors. ``load_sentence_transformer(path)`` loads without ``trust_remote_code``; README
"Encoding" says why the flag is safe here."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule

from ..model.compressor import Compressor, CompressorBatch
from ..model.st_files import MODULE_CONFIG_FILE, module_config, read_sentence_transformers_files, write_module_config
from .defaults import default_dtype
from .pipeline import check_texts


class AutoRegEmbedModule(InputModule):
    """The compressor as a sentence-transformers input module with mean-of-k pooling.

    ``preprocess(texts, prompt)`` -> {"input_ids" [B, L] int64, "lengths" [B] int64, "embed_positions" [B, k]
    int64}; ``forward`` adds "token_embeddings" [B, k, H] float32 (the k compressed states),
    "attention_mask" [B, k] (ones: every state counts) and "sentence_embedding" [B, H] float32 (their mean).
    """

    config_file_name = MODULE_CONFIG_FILE
    config_keys = ["num_embed_tokens", "max_length"]
    save_in_root = True  # the transformers files sit in the model folder's root, as are_fast.Encoder reads them

    def __init__(self, compressor: Compressor):
        super().__init__()
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor: expected an are_fast.model.Compressor, got {type(compressor).__name__}")
        self.compressor = compressor
        self.tokenizer = compressor.tokenizer  # sentence-transformers' model.tokenizer reads it

    @property
    def num_embed_tokens(self) -> int:
        return self.compressor.num_embed_tokens

    @property
    def max_length(self) -> int | None:
        """Text tokens kept per input (None: no limit); ``SentenceTransformer.max_seq_length`` is the same."""
        return self.compressor.max_text_tokens

    @property
    def max_seq_length(self) -> int | None:
        return self.compressor.max_text_tokens

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        self.compressor.max_text_tokens = value

    def get_config_dict(self) -> dict[str, Any]:
        return module_config(self.num_embed_tokens, self.max_length)

    def get_embedding_dimension(self) -> int:
        """H."""
        return self.compressor.hidden_size

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Tokenize texts with the prompt as the AutoRegEmbed instruction (after the text) and collate them."""
        check_texts(inputs)
        batch = self.compressor.collate(self.compressor.tokenize(list(inputs), prompt).ids)
        return {"input_ids": batch.input_ids, "lengths": batch.lengths, "embed_positions": batch.embed_positions}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        batch = CompressorBatch(features["input_ids"], features["lengths"], features["embed_positions"])
        states = self.compressor(batch).float()  # [B, k, H]; float32 like are_fast.Encoder
        features["token_embeddings"] = states
        features["attention_mask"] = torch.ones(states.shape[:2], dtype=torch.int64, device=states.device)
        features["sentence_embedding"] = states.mean(1)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """The transformers files (safetensors weights, config, tokenizer) and this module's config."""
        self.compressor.save_pretrained(output_path)
        write_module_config(output_path, self.num_embed_tokens, self.max_length)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, **kwargs) -> "AutoRegEmbedModule":
        """Load the folder's compressor. ``model_kwargs`` may give ``dtype`` (default: ``defaults.default_dtype``
        of the device sentence-transformers picks by default, as Encoder and the file job; the device is not known
        here); any ``trust_remote_code`` is ignored: the transformers model is always loaded without remote code."""
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path, **hub)
        folder = cls.load_dir_path(model_name_or_path, **hub)
        dtype = (model_kwargs or {}).get("dtype", (model_kwargs or {}).get("torch_dtype"))
        if dtype is None:
            dtype = default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        compressor = Compressor.from_pretrained(folder, config.get("num_embed_tokens"), dtype=dtype,
                                                max_text_tokens=config.get("max_length", "auto"))
        return cls(compressor)


def load_sentence_transformer(path: str | os.PathLike, device=None, **kwargs) -> SentenceTransformer:
    """``SentenceTransformer(path, trust_remote_code=True)`` without the flag: the module is built here and
    handed to sentence-transformers with the folder's prompts. ``kwargs`` go to ``SentenceTransformer``."""
    path = os.fspath(path)
    saved = read_sentence_transformers_files(path)
    if "max_length" not in saved:
        raise ValueError(f"model: {path!r} has no {MODULE_CONFIG_FILE} (write it with "
                         "are_fast.Encoder.save_sentence_transformers or are_fast.model.st_files)")
    module = AutoRegEmbedModule.load(path)
    kwargs.setdefault("prompts", saved.get("prompts"))
    kwargs.setdefault("default_prompt_name", saved.get("default_prompt_name"))
    kwargs.setdefault("similarity_fn_name", "cosine")
    return SentenceTransformer(modules=[module], device=device, **kwargs)
