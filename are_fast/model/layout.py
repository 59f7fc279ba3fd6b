"""Batch layout shared by the compressor and the decoder: the released AutoRegEmbed rows (compressor: [bos]
text\\n instruction\\n <EMBED0..k-1>; decoder: k compressed vectors, then target + eos, labels -100 for the k),
right padding, and the routes (``ROUTES``: padded, packed, varlen) by which ``run_varlen`` runs rows of
different lengths through a transformers body, always returning padded hidden states. README "Training" (routes)
describes each route; ``default_route`` is the measured winner per device."""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from . import attention_precision

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
    tokenizer, texts: Sequence[str], instructions: Sequence[str], max_text_tokens: int | None = None,
    max_prefix_tokens: int | None = None,
) -> Tokenized:
    """[bos] + tokens(text + "\\n") + tokens(instruction + "\\n") per row; the text part is cut to max_text_tokens,
    and further where the whole prefix would exceed max_prefix_tokens (the instruction is kept whole)."""
    if len(texts) != len(instructions):
        raise ValueError(f"instructions: expected one per text ({len(texts)}), got {len(instructions)}")
    # Instructions are few and short: encode each distinct one once.
    distinct = sorted(set(instructions))
    by_instruction = dict(zip(distinct, _encode(tokenizer, [i + "\n" for i in distinct], None).ids))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    limits = {}
    for instruction, ids in by_instruction.items():
        limits[instruction] = max_text_tokens
        if max_prefix_tokens is not None:
            room = max_prefix_tokens - len(bos) - len(ids)
            if room < 1:
                raise ValueError(f"instructions: {instruction!r} takes {len(ids)} tokens, which leave no room for a "
                                 f"text in the {max_prefix_tokens} positions before the compressed tokens")
            limits[instruction] = room if max_text_tokens is None else min(max_text_tokens, room)
    text_ids = _encode(tokenizer, [t + "\n" for t in texts], None).ids
    cut = [row if limits[i] is None else row[: limits[i]] for row, i in zip(text_ids, instructions)]
    truncated = sum(len(a) != len(b) for a, b in zip(text_ids, cut))
    return Tokenized([bos + t + by_instruction[i] for t, i in zip(cut, instructions)], truncated)


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


ROUTES = ("padded", "packed", "varlen")
VARLEN_ATTENTION = "are_fast_varlen"  # ``varlen_attention`` is registered in transformers as "are_fast_varlen:<kernel>"
ATTENTION_PADDING = 0.02  # varlen's CPU path: padding per attention call, at most this fraction of its real tokens
_IN_VARLEN_CALL = contextvars.ContextVar("are_fast_in_varlen_call", default=False)


def default_route(device: torch.device | str) -> str:
    """The fastest route measured on this kind of device (benchmarks/test_bench_stage2.py, test_bench_encoder.py):
    "varlen" on CPU; "padded" on CUDA until the GPU benchmark has measured the others there."""
    return "varlen" if torch.device(device).type == "cpu" else "padded"


def check_route(route: str | None) -> str | None:
    """``route`` itself when it is None (the device's default) or one of ``ROUTES``; else a ValueError."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"route: expected one of {', '.join(ROUTES)} or None (the device's default), got {route!r}")
    return route


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per packed row, longest first, each row's total at most ``width``
    (a sequence longer than ``width`` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(width - lengths[i])
        else:
            rows[slot].append(i)
            free[slot] -= lengths[i]
    return rows


def computed_tokens(lengths: Sequence[int], route: str, one_row: bool = False) -> int:
    """Tokens the linear layers of a body compute for sequences of ``lengths`` on ``route``, padding included
    (``one_row``: "packed" packs everything into one row, as it does under flash_attention_2)."""
    if not lengths:
        return 0
    if route == "padded":
        return len(lengths) * max(lengths)
    if route == "packed" and not one_row:
        return len(pack_rows(lengths, max(lengths))) * max(lengths)
    return sum(lengths)


def _flash(backbone) -> bool:
    return "flash" in str(backbone.config._attn_implementation)


def _use_varlen_attention(backbone) -> None:
    """Switch the body's attention to ``varlen_attention`` for good (idempotent). Calls without cumulative lengths
    (the other routes) still run the body's own kernel, and activation checkpointing, which recomputes a layer
    during the backward, finds the same function the forward ran."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = backbone.config
    inner = config._attn_implementation
    if inner.startswith(VARLEN_ATTENTION):
        return
    if inner not in ALL_ATTENTION_FUNCTIONS and inner != "eager":
        raise ValueError(f"route: 'varlen' keeps the body's attention kernel for other calls, and {inner!r} is "
                         "not a registered one; load the model with attn_implementation='sdpa' or use another route")
    name = f"{VARLEN_ATTENTION}:{inner}"
    AttentionInterface.register(name, functools.partial(varlen_attention, inner=inner))
    AttentionMaskInterface.register(name, functools.partial(_varlen_mask, inner=inner))
    config._attn_implementation = name


def _inner_attention(module, inner: str):
    """The attention function ``inner`` names: a registered kernel, or for "eager" the model's own eager function
    (each modeling file has its own: Gemma 2's softcaps its scores)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[inner]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"route: {type(module).__name__}'s modeling file has no eager_attention_forward to run "
                         "calls outside the 'varlen' route; load the model with attn_implementation='sdpa'")
    return eager


def _varlen_mask(*args, inner: str, **kwargs):
    """Mask function under ``varlen_attention``: none in a varlen call, else the body's own kernel's mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return None if _IN_VARLEN_CALL.get() else ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, **kwargs)


def _packing_index(packed: list[list[int]], sizes: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [P, W], position ids [P, W]) of packed rows: the flat index (row * width + position) each slot
    reads, -1 for padding, and each token's position within its sequence (a padding run restarts at 0, so it
    is a sequence of its own). P rows of W = the fullest row's tokens."""
    order = torch.tensor([i for members in packed for i in members], dtype=torch.int64)  # [S] sequences, in slots
    bins = torch.tensor([p for p, members in enumerate(packed) for _ in members], dtype=torch.int64)  # [S]
    lens = torch.tensor(sizes, dtype=torch.int64)[order]
    fill = torch.zeros(len(packed), dtype=torch.int64).index_add(0, bins, lens)  # [P] tokens per packed row
    pack_width = int(fill.max())
    start = lens.cumsum(0) - lens  # [S] where each sequence starts, counting over all slots
    start_in_row = start - (fill.cumsum(0) - fill)[bins]
    token_sequence = torch.repeat_interleave(torch.arange(len(order)), lens)  # [T]
    offset = torch.arange(len(token_sequence)) - start[token_sequence]
    slot = bins[token_sequence] * pack_width + start_in_row[token_sequence] + offset
    index = torch.full((len(packed) * pack_width,), -1, dtype=torch.int64)
    index[slot] = order[token_sequence] * width + offset
    positions = (torch.arange(pack_width) - fill.unsqueeze(1)).flatten()  # the padding's, from each row's fill
    positions[slot] = offset
    return index.view(len(packed), pack_width), positions.view(len(packed), pack_width)


def run_varlen(backbone, lengths: torch.Tensor, route: str, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Final hidden states [R, L, H] of right-padded rows (ids [R, L] or embeddings [R, L, H]) run by ``route``.

    ``backbone`` is a transformers base model (LlamaModel, ...) returning ``last_hidden_state`` (after the final
    norm); lengths [R] int64 are the rows' real lengths. Positions at or past a row's length hold unspecified
    values (zeros off the padded route). Gradients flow to ``inputs_embeds`` and the body on every route.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    key = "input_ids" if input_ids is not None else "inputs_embeds"
    rows, width = source.shape[:2]
    if route == "padded":
        # Right padding under causal attention: no real position ever sees the padding, so the rows need no
        # padding mask. With one, a padding query past a sliding window sees no key at all and the eager kernel
        # turns it into NaN, which the next layer spreads to every position through 0 * NaN (Gemma 2).
        ones = torch.ones(rows, width, dtype=torch.int64, device=source.device)
        return backbone(**{key: source}, attention_mask=ones, use_cache=False).last_hidden_state
    check_route(route)
    sizes = lengths.tolist()
    if route == "packed" and not _flash(backbone):
        packed = pack_rows(sizes, max(sizes))
    else:
        packed = [list(range(rows))]
    index, positions = _packing_index(packed, sizes, width)
    index, positions = index.to(source.device), positions.to(source.device)
    real = index >= 0
    flat = source.reshape(rows * width, *source.shape[2:])[index.clamp(min=0)]
    kwargs = {key: flat, "position_ids": positions, "use_cache": False}
    if route == "varlen" and not _flash(backbone):
        cu = torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(source.device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(sizes), max_length_k=max(sizes))
        _use_varlen_attention(backbone)
        token = _IN_VARLEN_CALL.set(True)
        try:
            hidden = backbone(**kwargs).last_hidden_state
        finally:
            _IN_VARLEN_CALL.reset(token)
    else:
        hidden = backbone(**kwargs).last_hidden_state
    out = hidden.new_zeros(rows * width, hidden.shape[-1])
    return out.index_copy(0, index[real], hidden[real]).view(rows, width, -1)


def flash_varlen(varlen_attn, q, k, v, cu_seq_lens, max_length, scaling, sliding_window=None):
    """Causal attention within each packed sequence by torch's ``varlen_attn`` (passed in: the flash kernel,
    CUDA, float16/bfloat16). q [N, heads, d], k and v [N, kv_heads, d], cu_seq_lens [S + 1] int32 -> [N, heads, d].
    ``sliding_window``: each query sees at most this many keys, itself included (transformers' meaning).

    torch 2.13's varlen_attn takes grouped key/value heads (enable_gqa); torch 2.11's does not, so there each
    key/value head is repeated for the query heads that share it.
    """
    grouped = {}
    if k.shape[1] != q.shape[1]:
        if _takes_gqa(varlen_attn):
            grouped["enable_gqa"] = True
        else:
            share = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(share, dim=1), v.repeat_interleave(share, dim=1)
    left = -1 if sliding_window is None else sliding_window - 1  # flash counts the keys before the query
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
                       window_size=(left, 0), **grouped)


@functools.cache
def _takes_gqa(varlen_attn) -> bool:
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, *,
                     cu_seq_lens_q=None, max_length_q=None, sliding_window=None, softcap=None,
                     inner: str | None = None, **kwargs):
    """transformers attention function of the "varlen" route: causal attention within each packed sequence.

    query [1, heads, N, d], key and value [1, kv_heads, N, d] (all sequences in one row); cu_seq_lens_q [S + 1]
    int32 cumulative lengths; max_length_q the longest. ``sliding_window`` (a query sees at most this many keys,
    itself included) and ``softcap`` (scores s -> c tanh(s / c)) are the layer's, as transformers passes them.
    Returns ([1, N, heads, d], None). Without cu_seq_lens_q the call goes to the attention function ``inner``
    (the body's own kernel).
    """
    if cu_seq_lens_q is None:
        if inner is None:
            raise ValueError("varlen attention: expected cu_seq_lens_q (run the body through layout.run_varlen)")
        return _inner_attention(module, inner)(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, sliding_window=sliding_window, softcap=softcap,
                                               **kwargs)
    if kwargs.get("s_aux") is not None:  # refused before any work by architecture.route_problems; a last guard
        raise ValueError("route: 'varlen' does not model attention sinks (s_aux); use the padded route")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, d]
    dropout = dropout if module.training else 0.0
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout and softcap is None:
        from torch.nn.attention.varlen import varlen_attn

        out = flash_varlen(varlen_attn, q, k, v, cu_seq_lens_q, max_length_q, scaling, sliding_window)
        return out.unsqueeze(0), None
    # Elsewhere: sequences of similar length share one causal attention call over a padded block.
    sizes = cu_seq_lens_q.diff().tolist()
    if cu_seq_lens_q[0] != 0 or sum(sizes) != q.shape[0]:
        raise ValueError(f"varlen attention: cu_seq_lens_q must run from 0 to the {q.shape[0]} packed tokens, got "
                         f"{cu_seq_lens_q[0]} to {cu_seq_lens_q[-1]}")
    read, slot, shapes = padded_blocks(tuple(sizes), q.device)
    # split, not slices: a slice's backward writes into a zeroed copy of the whole tensor, one per block
    counts = [groups * width for groups, width in shapes]
    pieces = zip(*(t.index_select(0, read).split(counts) for t in (q, k, v)))  # [P, heads, d] laid out by block
    parts = []
    for (groups, width), blocks in zip(shapes, pieces):
        blocks = (t.view(groups, width, *t.shape[1:]).transpose(1, 2) for t in blocks)
        out = block_attention(*blocks, scaling, dropout, sliding_window, softcap)  # [G, heads, width, d]
        parts.append(out.transpose(1, 2).reshape(groups * width, out.shape[1], out.shape[3]))
    out = (parts[0] if len(parts) == 1 else torch.cat(parts)).index_select(0, slot)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=32)
def padded_blocks(sizes: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """How the CPU path of ``varlen_attention`` lays packed sequences of ``sizes`` out as padded blocks, one per
    group of ``attention_groups``: (read [P] int64, the packed token each of the P block slots reads; slot [N]
    int64, the block slot of each packed token; shapes, (sequences, width) per block in slot order). A padding
    slot reads its own sequence's first token: causal masking hides it from every real query and its own output
    is dropped, so it only needs to be finite where the sequence is (no copy of another sequence, no zero fill).
    Cached: every layer of a call, and the backward, use the same layout."""
    starts = torch.tensor((0, *sizes[:-1])).cumsum(0)
    read, slot, shapes, base = [], torch.empty(sum(sizes), dtype=torch.int64), [], 0
    for group in attention_groups(sizes):
        width = sizes[group[0]]
        lengths, first = torch.tensor([sizes[i] for i in group]), starts[group]
        position = torch.arange(width)
        real = position < lengths[:, None]  # [G, width]
        tokens = first[:, None] + torch.where(real, position, 0)
        slot[tokens[real]] = base + torch.arange(len(group) * width).view(len(group), width)[real]
        read.append(tokens.flatten())
        shapes.append((len(group), width))
        base += len(group) * width
    return torch.cat(read).to(device), slot.to(device), tuple(shapes)


def block_attention(q, k, v, scaling=None, dropout=0.0, sliding_window=None, softcap=None):
    """Causal attention over blocks: q [G, heads, L, d], k and v [G, kv_heads, L, d] -> [G, heads, L, d].

    ``sliding_window``: query i sees keys i - sliding_window < j <= i (a banded mask); ``softcap``: scores
    s -> c tanh(s / c) before the mask, which sdpa cannot do, so then the attention is written out (softmax in
    float32, as transformers' eager kernels do). ``scaling`` None: 1 / sqrt(d). bf16/fp16 blocks on a CPU run in
    float32 where that measures faster (``attention_precision``); the result keeps q's dtype.
    """
    length = q.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < length else None
    allowed = None
    if window is not None or softcap is not None:
        i = torch.arange(length, device=q.device)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - (window or length))  # [L, L]
    if softcap is None:
        dtype = q.dtype
        if attention_precision.upcast(q, k):  # a bf16/fp16 CPU kernel that measured slower than float32's
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=allowed is None,
                                             scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
        return out.to(dtype)
    share = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(share, dim=1), v.repeat_interleave(share, dim=1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout, training=dropout > 0)
    return probs @ v


def attention_groups(sizes: Sequence[int], slack: float = ATTENTION_PADDING) -> list[list[int]]:
    """Sequences (indices, longest first) grouped so that padding each group to its longest sequence adds at most
    ``slack`` of the group's real tokens: the groups of the CPU path of ``varlen_attention``."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if groups and (len(groups[-1]) + 1) * sizes[groups[-1][0]] <= (1 + slack) * (total + sizes[i]):
            groups[-1].append(i)
            total += sizes[i]
        else:
            groups.append([i])
            total = sizes[i]
    return groups


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
