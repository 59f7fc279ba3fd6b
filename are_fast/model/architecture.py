"""What the model layer reads from a transformers causal LM besides its weights, decided here only: the logit
transform of its head (softcap, logit scale; an unmodelled one is refused by name), the linear head the fused ops
read, the routes that run it exactly (``choose_route``) and its position limits. README "Training" lists the
families."""
from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from .layout import ROUTES, default_route

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # text and target tokens kept by default, when the model's positions leave as many
AUTO = "auto"  # a length limit of DEFAULT_MAX_TOKENS, or fewer when the model's positions leave fewer
# Config keys that change the logits and that the fused ops do not model (MuseSpark/Glimmer scale logits by
# output_multiplier ahead of their softcap).
UNMODELLED_LOGIT_KEYS = ("output_multiplier",)
_FALLBACK = ("varlen", "packed", "padded")  # fastest first, on the devices measured


def text_config(config):
    """The text model's config (a multimodal config's text part; else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(lm) -> dict:
    """{"softcap": c or None, "logit_scale": s or None}: the fused ops' keywords that reproduce the causal LM's
    logits softcap(s * (hidden @ weight.T + bias)). A config key counts where the LM's modeling code reads it
    (a Llama config that carries a stray final_logit_softcapping gets plain logits from transformers, so here
    too). ValueError naming a logit-changing key that is not modelled."""
    config = text_config(lm.config)
    read = functools.partial(_code_reads, type(lm))
    for key in UNMODELLED_LOGIT_KEYS:
        if getattr(config, key, None) not in (None, 1, 1.0) and read(key):
            raise ValueError(f"lm: its config's {key}={getattr(config, key)} changes the logits in a way the fused "
                             "ops do not model; use a model without it")
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None and read("logit_scale"):  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None and read("logits_scaling"):  # Granite: / logits_scaling
        if not config.logits_scaling:
            raise ValueError("lm: its config's logits_scaling is 0 (the logits would be divided by 0)")
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: c tanh(logits / c)
    softcap = float(softcap) if softcap is not None and read("final_logit_softcapping") else None
    return {"softcap": softcap, "logit_scale": None if scale == 1.0 else scale}


@functools.cache
def _code_reads(cls: type, key: str) -> bool:
    """Whether the source of ``cls`` (a causal LM class, its own modeling file's part of the MRO) names ``key``;
    True when the source cannot be read (then the config is taken at its word)."""
    sources = []
    for klass in cls.__mro__:
        if klass.__module__.startswith(("transformers.modeling_", "transformers.generation", "torch.", "builtins")):
            continue
        try:
            sources.append(inspect.getsource(klass))
        except (OSError, TypeError):
            return True
    return any(key in source for source in sources)


def linear_head(lm) -> nn.Linear:
    """The causal LM's output layer, which must be an ``nn.Linear`` (logits = hidden @ weight.T + bias, before the
    ``logit_transform``); a head tied to the input embeddings is read the same way."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        found = "none" if head is None else type(head).__name__
        raise ValueError(f"lm: expected a causal LM whose output embeddings are an nn.Linear (the fused ops read its "
                         f"weight and bias), got {found} in {type(lm).__name__}")
    return head


def route_problems(model) -> dict[str, str]:
    """{route: the model's feature that route cannot run exactly}, for the routes of ``layout.ROUTES`` that cannot
    run ``model`` (a transformers body or causal LM); {} when every route can.

    - not causal (``use_bidirectional_attention``): no route (AutoRegEmbed needs a causal LM);
    - a model that transformers does not mark as passing the attention arguments (position ids, cumulative
      lengths, windows) through to its layers (``_supports_attention_backend``, unset in most remote code):
      "packed" needs its masks built from position ids, "varlen" its attention called with the lengths;
    - attention sinks or chunked attention (``attention_chunk_size``): "varlen" models neither.
    Sliding windows (per layer), attention softcapping, learned positions and embedding scales run on every route.
    """
    config = text_config(model.config)
    if getattr(config, "use_bidirectional_attention", False):
        return dict.fromkeys(ROUTES, "bidirectional attention (use_bidirectional_attention)")
    problems = {}
    if getattr(config, "attention_chunk_size", None):
        problems["varlen"] = f"chunked attention (attention_chunk_size={config.attention_chunk_size})"
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        problems["varlen"] = "attention sinks"
    if not getattr(type(model), "_supports_attention_backend", False):
        reason = (f"{type(model).__name__} does not pass attention arguments through to its layers (transformers' "
                  "_supports_attention_backend is not set)")
        problems.update(packed=reason, varlen=reason)
    return problems


def choose_route(requested: str | None, problems: dict[str, str], device, model_name: str = "the model") -> str:
    """The route rows run by: ``requested`` when given (ValueError naming the feature when it is in ``problems``),
    else the device's default (``layout.default_route``), or the fastest route that runs the model exactly
    instead (logged once)."""
    if requested is not None:
        if requested in problems:
            others = [r for r in ROUTES if r not in problems]
            raise ValueError(f"route: {requested!r} cannot run {model_name} exactly: {problems[requested]}; "
                             + (f"use {' or '.join(map(repr, others))}" if others else "no route can"))
        return requested
    route = default_route(device)
    if route not in problems:
        return route
    fallback = next((r for r in _FALLBACK[_FALLBACK.index(route):] if r not in problems), None)
    if fallback is None:
        raise ValueError(f"route: no route runs {model_name} exactly: {problems[route]}")
    _say_once(f"{model_name}: the {route!r} route cannot run it exactly ({problems[route]}); using {fallback!r}")
    return fallback


@functools.cache
def _say_once(message: str) -> None:
    logger.warning(message)


def position_limit(config) -> int | None:
    """The model's positions (``max_position_embeddings``; GPT-2's ``n_positions``); None when it names none."""
    value = getattr(text_config(config), "max_position_embeddings", None)
    return int(value) if value else None


def token_limit(requested: int | str | None, positions: int | None, reserved: int, option: str,
                reserved_for: str) -> int | None:
    """Tokens a text may keep when ``reserved`` of the model's ``positions`` go to other tokens (``reserved_for``
    says which, for the message).

    requested "auto": ``DEFAULT_MAX_TOKENS``, or what the positions leave when fewer; None: what they leave (no
    limit when the model names no positions); an int: itself, a ValueError naming both numbers when the
    positions leave fewer.
    """
    room = None if positions is None else positions - reserved
    if room is not None and room < 1:
        raise ValueError(f"{option}: the model's {positions} positions leave no room for text after {reserved_for}")
    if requested == AUTO:
        return DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
    if requested is None:
        return room
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"{option}: expected a positive int, None or {AUTO!r}, got {requested!r}")
    if room is not None and requested > room:
        raise ValueError(f"{option}: {requested} tokens do not fit the model's {positions} positions "
                         f"(max_position_embeddings) with {reserved_for}; give at most {room}")
    return requested
