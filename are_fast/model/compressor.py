"""The compressor: any Hugging Face causal LM turns a text into k compressed vectors [B, k, H] float: the
<EMBED0>..<EMBED{k-1}> tokens (the released checkpoints' names) appended after each row's last real token, the
body's final hidden states at those k positions; no LM head. Their mean is the AutoRegEmbed embedding."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .architecture import AUTO, choose_route, position_limit, route_problems, token_limit
from .layout import Tokenized, check_route, compressor_prefix_ids, enable_checkpointing, pad_right, run_varlen


def embed_token_names(num_embed_tokens: int) -> list[str]:
    """["<EMBED0>", ..., "<EMBED{k-1}>"]."""
    return [f"<EMBED{i}>" for i in range(num_embed_tokens)]


def count_embed_tokens(tokenizer) -> int:
    """How many consecutive <EMBED{i}> tokens, from <EMBED0>, the tokenizer's vocabulary holds."""
    vocab = tokenizer.get_vocab()
    k = 0
    while f"<EMBED{k}>" in vocab:
        k += 1
    return k


@dataclass
class CompressorBatch:
    """A collated compressor batch: ids [B, L] (prefix + k special tokens, right padding), lengths [B] (real
    tokens including the k special ones) and embed_positions [B, k] (where the k special tokens sit)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    embed_positions: torch.Tensor

    def to(self, device) -> "CompressorBatch":
        return CompressorBatch(self.input_ids.to(device), self.lengths.to(device), self.embed_positions.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


class Compressor(nn.Module):
    """Compresses texts into k vectors with a transformers model body.

    Args:
        model: an ``AutoModelForCausalLM`` or a base ``AutoModel`` (LlamaModel, Qwen2Model, ...); only its body
            (``model.base_model``) is kept.
        tokenizer: its tokenizer; the <EMBED{i}> tokens are added when missing and the input embeddings grow to
            match (new rows start at the mean of the old ones).
        num_embed_tokens: k (5 in the paper).
        max_text_tokens: texts are cut to this many tokens (counted in ``Tokenized.truncated``). "auto": 512, or
            what the model's positions leave after the bos and k when fewer; None: what they leave; a larger int
            than they leave is a ValueError naming both numbers. Whatever the limit, a row's instruction is kept
            whole and its text cut further when the positions leave no room for both (counted).
        route: how rows of different lengths run through the body: "padded", "packed" or "varlen" (see
            ``are_fast.model.layout``); None: the fastest measured on the body's device that runs it exactly
            (``architecture.choose_route``). A route that cannot run the model exactly is refused here.
    """

    def __init__(self, model, tokenizer, num_embed_tokens: int = 5, *, max_text_tokens: int | str | None = AUTO,
                 route: str | None = None):
        super().__init__()
        if num_embed_tokens < 1:
            raise ValueError(f"num_embed_tokens: expected at least 1, got {num_embed_tokens}")
        self.backbone = model.base_model
        self.tokenizer = tokenizer
        self.num_embed_tokens = num_embed_tokens
        self.positions = position_limit(model.config)
        bos = 0 if tokenizer.bos_token_id is None else 1
        self.max_text_tokens = token_limit(max_text_tokens, self.positions, num_embed_tokens + bos, "max_text_tokens",
                                           f"k={num_embed_tokens} compressed tokens" + (" and bos" if bos else ""))
        self.route = check_route(route)
        self.route_problems = route_problems(self.backbone)
        if self.route is not None:  # refused before any work
            choose_route(self.route, self.route_problems, None, type(self.backbone).__name__)
        names = embed_token_names(num_embed_tokens)
        missing = [n for n in names if n not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)  # never split, like released checkpoints
        self.embed_token_ids = tokenizer.convert_tokens_to_ids(names)
        old_rows = self.backbone.get_input_embeddings().num_embeddings
        if old_rows <= max(self.embed_token_ids):
            # New rows start at the mean of the old ones: deterministic, unlike transformers' sampled default.
            self.backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                weight = self.backbone.get_input_embeddings().weight
                weight[old_rows:] = weight[:old_rows].mean(0)
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def resolved_route(self) -> str:
        """The route rows run by: ``route``, else the default of the body's device (or the one that runs it)."""
        return choose_route(self.route, self.route_problems, self.device, type(self.backbone).__name__)

    @property
    def pack(self) -> bool:
        """True when rows run without padding in the linear layers (a batch then costs its real tokens)."""
        return self.resolved_route != "padded"

    @property
    def hidden_size(self) -> int:
        return self.backbone.get_input_embeddings().embedding_dim

    def enable_checkpointing(self) -> None:
        """Per-layer activation checkpointing of the body (non-reentrant, so no input-grad hooks are needed)."""
        enable_checkpointing(self.backbone)

    def tokenize(self, texts: Sequence[str], instructions: str | Sequence[str] | None = None) -> Tokenized:
        """Prefix ids per text: [bos] + text + "\\n" + instruction + "\\n" (no special tokens yet)."""
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions or ""] * len(texts)
        max_prefix = None if self.positions is None else self.positions - self.num_embed_tokens
        return compressor_prefix_ids(self.tokenizer, texts, instructions, self.max_text_tokens, max_prefix)

    def collate(self, prefixes: Sequence[Sequence[int]]) -> CompressorBatch:
        """Prefix ids per row -> a right-padded batch with the k special tokens after each row's last token."""
        k = self.num_embed_tokens
        ids, lengths = pad_right(prefixes, self.pad_token_id, extra=k)
        positions = lengths.unsqueeze(1) + torch.arange(k)
        ids.scatter_(1, positions, torch.tensor(self.embed_token_ids).expand(len(prefixes), k))
        return CompressorBatch(ids, lengths + k, positions)

    def forward(self, batch: CompressorBatch) -> torch.Tensor:
        """The final hidden states at the k special positions: [B, k, H] in the body's (or autocast) dtype."""
        hidden = run_varlen(self.backbone, batch.lengths, self.resolved_route, input_ids=batch.input_ids)
        index = batch.embed_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)

    def compress(self, texts: Sequence[str], instructions: str | Sequence[str] | None = None) -> torch.Tensor:
        """Texts (and one instruction or one per text) -> [B, k, H] on the body's device."""
        return self(self.collate(self.tokenize(texts, instructions).ids).to(self.device))

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write a Hugging Face model directory (body weights as safetensors, config, tokenizer with the
        <EMBED{i}> tokens), the layout of released AutoRegEmbed checkpoints. A peft LoRA body is merged first.
        ``state_dict``: the body's weights to write instead of its own (the full tensors gathered from FSDP shards)."""
        body = self.backbone
        if hasattr(body, "merge_and_unload"):  # peft: export plain weights that any loader reads
            body = body.merge_and_unload()
            self.backbone = body
        body.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_embed_tokens: int | None = None, *, dtype=None,
                        device=None, attn_implementation: str | None = None, trust_remote_code: bool = False,
                        **kwargs) -> "Compressor":
        """Load a model directory (a base LM, our checkpoint or a released AutoRegEmbed one) as a compressor.

        num_embed_tokens: k; None reads it from the tokenizer's <EMBED{i}> tokens (an error when it has none).
        Other keyword arguments go to ``Compressor`` (max_text_tokens, route).
        """
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"path: expected a model directory, {str(path)!r} is not one")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if num_embed_tokens is None:
            num_embed_tokens = count_embed_tokens(tokenizer)
            if num_embed_tokens == 0:
                raise ValueError(f"num_embed_tokens: the tokenizer in {str(path)!r} has no <EMBED0> token; give k")
        model = AutoModel.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        comp = cls(model, tokenizer, num_embed_tokens, **kwargs)
        return comp.to(device) if device is not None else comp


def load_compressor(path, num_embed_tokens: int | None = None, **kwargs) -> Compressor:
    """``Compressor.from_pretrained``: a saved model directory as a compressor."""
    return Compressor.from_pretrained(path, num_embed_tokens, **kwargs)
