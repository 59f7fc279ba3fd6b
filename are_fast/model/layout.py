"""Batch layout shared by the compressor and the decoder: tokenization, right padding, variable-length runs.

The released AutoRegEmbed layout, which this module reproduces:
- compressor row: [bos, if the tokenizer has one] + tokens(text + "\\n") + tokens(instruction + "\\n"), then the k
  special tokens <EMBED0>..<EMBED{k-1}> right after the last real token (right padding);
- decoder row: [k compressed vectors ; embeddings of tokens(target) + eos], labels [-100] * k + target + [eos].

``run_varlen`` runs a backbone over right-padded rows either padded (attention mask) or packed into one row
with restarting position ids (transformers then keeps the sequences apart; with flash-attention 2 this is the
varlen kernel, so no compute goes to padding). Either way it returns padded hidden states, so the loss code
sees one layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    """Token ids per row and how many rows were cut to the maximum length."""

    ids: list  # list[list[int]]
    truncated: int = 0


def _encode(tokenizer, texts: Sequence[str], max_tokens: int | None) -> Tokenized:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    if max_tokens is None:
        return Tokenized(ids)
    cut = sum(len(row) > max_tokens for row in ids)
    return Tokenized([row[:max_tokens] for row in ids], cut)


def compressor_prefix_ids(
    tokenizer, texts: Sequence[str], instructions: Sequence[str], max_text_tokens: int | None = None
) -> Tokenized:
    """[bos] + tokens(text + "\\n") + tokens(instruction + "\\n") per row; the text part is cut to max_text_tokens."""
    if len(texts) != len(instructions):
        raise ValueError(f"instructions: expected one per text ({len(texts)}), got {len(instructions)}")
    text_ids = _encode(tokenizer, [t + "\n" for t in texts], max_text_tokens)
    # Instructions are few and short: encode each distinct one once.
    distinct = sorted(set(instructions))
    by_instruction = dict(zip(distinct, _encode(tokenizer, [i + "\n" for i in distinct], None).ids))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + t + by_instruction[i] for t, i in zip(text_ids.ids, instructions)]
    return Tokenized(rows, text_ids.truncated)


def target_ids(tokenizer, texts: Sequence[str], max_target_tokens: int | None = None) -> Tokenized:
    """tokens(text)[:max_target_tokens] + [eos] per row."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: the decoder targets end with an eos token, but this tokenizer has none")
    tok = _encode(tokenizer, texts, max_target_tokens)
    return Tokenized([row + [eos] for row in tok.ids], tok.truncated)


def pad_right(rows: Sequence[Sequence[int]], value: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids [R, max_len + extra] int64 right-padded with ``value``, lengths [R] int64)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    width = int(lengths.max()) + extra if len(rows) else extra
    out = torch.full((len(rows), width), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return out, lengths


def decoder_labels(target: torch.Tensor, lengths: torch.Tensor, num_compressed: int) -> torch.Tensor:
    """target [S, T] right-padded, lengths [S] -> labels [S, k + T]: -100 over the k vectors and the padding."""
    valid = torch.arange(target.shape[1], device=target.device) < lengths.to(target.device).unsqueeze(1)
    labels = torch.where(valid, target, IGNORE_INDEX)
    return torch.cat([labels.new_full((target.shape[0], num_compressed), IGNORE_INDEX), labels], dim=1)


def run_varlen(backbone, lengths: torch.Tensor, pack: bool, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Final hidden states [R, L, H] of right-padded rows (ids [R, L] or embeddings [R, L, H]).

    ``backbone`` is a transformers base model (LlamaModel, ...) returning ``last_hidden_state`` (after the final
    norm). Positions at or past a row's length hold unspecified values. ``pack=True`` concatenates the real tokens
    of all rows into one row with position ids restarting per sequence and no attention mask.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    rows, width = source.shape[:2]
    valid = torch.arange(width, device=source.device) < lengths.to(source.device).unsqueeze(1)  # [R, L]
    if not pack:
        kwargs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        return backbone(**kwargs, attention_mask=valid.long(), use_cache=False).last_hidden_state
    positions = torch.arange(width, device=source.device).expand(rows, width)[valid].unsqueeze(0)
    flat = source[valid].unsqueeze(0)
    kwargs = {"input_ids": flat} if input_ids is not None else {"inputs_embeds": flat}
    hidden = backbone(**kwargs, position_ids=positions, use_cache=False).last_hidden_state[0]
    out = hidden.new_zeros(rows, width, hidden.shape[-1])
    return out.masked_scatter(valid.unsqueeze(-1), hidden)


def enable_checkpointing(model) -> None:
    """Per-layer activation checkpointing (non-reentrant) on a transformers model, across transformers 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def flash_attention_available() -> bool:
    """True when the flash-attn package imports (then attn_implementation="flash_attention_2" can pack)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
