"""The frozen decoder: a copy of the base causal LM that scores target texts from compressed vectors.

It returns final hidden states, never logits: every log-probability is computed by the fused ops of
``are_fast.ops.functional`` from those states, the LM-head weight (``FrozenDecoder.head``) and the model's logit
transforms (``FrozenDecoder.logit_transform``: softcap, logit scale). Its parameters
have ``requires_grad=False``, so the fused ops skip all weight-gradient work, while gradients still flow
to the compressed vectors it reads.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .architecture import (AUTO, choose_route, linear_head, logit_transform, position_limit, route_problems,
                           token_limit)
from .layout import Tokenized, check_route, decoder_labels, enable_checkpointing, pad_right, run_varlen, target_ids


class FrozenDecoder(nn.Module):
    """A frozen causal LM over [k compressed vectors ; target token embeddings].

    Args:
        lm: an ``AutoModelForCausalLM`` (its body and its LM head, an ``nn.Linear``, are used; the transforms its
            config applies to the logits go to the fused ops: ``logit_transform``).
        tokenizer: the base tokenizer (targets are tokenized with it and end with its eos token).
        num_embed_tokens: k, the compressed vectors in front of every target (with the model's positions it
            bounds the target length).
        max_target_tokens: targets are cut to this many tokens before the eos (counted). "auto": 512, or what the
            model's positions leave after k and the eos when fewer; None: what they leave; a larger int than
            they leave is a ValueError naming both numbers.
        route: how streams of different lengths run through the body: "padded", "packed" or "varlen" (see
            ``are_fast.model.layout``); None: the fastest measured on the model's device that runs it exactly
            (``architecture.choose_route``). A route that cannot run the model exactly is refused here.
        checkpointing: per-layer activation checkpointing while gradients flow through it.
    """

    def __init__(self, lm, tokenizer, *, num_embed_tokens: int = 5, max_target_tokens: int | str | None = AUTO,
                 route: str | None = None, checkpointing: bool = False):
        super().__init__()
        linear_head(lm)
        self.logit_transform = logit_transform(lm)  # {"softcap", "logit_scale"} for the fused ops
        self.positions = position_limit(lm.config)
        self.max_target_tokens = token_limit(max_target_tokens, self.positions, num_embed_tokens + 1,
                                             "max_target_tokens", f"k={num_embed_tokens} compressed vectors and eos")
        self.lm = lm.requires_grad_(False)
        self.tokenizer = tokenizer
        self.route = check_route(route)
        self.route_problems = route_problems(lm.base_model)
        if self.route is not None:  # refused before any work
            choose_route(self.route, self.route_problems, None, type(lm).__name__)
        self.checkpointing = checkpointing
        if checkpointing:
            enable_checkpointing(lm)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenDecoder":
        """Always in eval mode (no dropout); with checkpointing, the decoder layers alone are flagged as
        training, because transformers only checkpoints a layer whose ``training`` flag is set."""
        super().train(False)
        if self.checkpointing and mode:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in self.lm.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True
        return self

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, H], bias [V] or None) of the LM head, frozen; the fused ops also take ``logit_transform``."""
        out = linear_head(self.lm)
        return out.weight, out.bias

    @property
    def resolved_route(self) -> str:
        """The route streams run by: ``route``, else the default of the model's device (or the one that runs it)."""
        return choose_route(self.route, self.route_problems, self.head[0].device, type(self.lm).__name__)

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """tokens(text) + [eos] per target text, cut to max_target_tokens (+ eos)."""
        return target_ids(self.tokenizer, texts, self.max_target_tokens)

    def forward(self, compressed: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor):
        """Score targets from compressed vectors.

        Args:
            compressed: [S, k, H] compressed vectors (gradients flow back to them).
            target: [S, T] int64 target ids with eos, right-padded; lengths: [S] real lengths.
        Returns:
            (hidden [S, 1 + T, H], labels [S, 1 + T] int64): the final hidden states (in the head's dtype) from the
            last compressed position on, and labels with -100 in front and over the padding. Position t predicts
            labels[:, t + 1], as the fused sequence ops expect; the first k - 1 positions are left out because
            they predict nothing (the released labels are -100 there), so no head work goes to them.
        """
        k = compressed.shape[1]
        if self.positions is not None and k + target.shape[1] > self.positions:
            raise ValueError(f"target: k={k} compressed vectors and {target.shape[1]} target tokens exceed the "
                             f"model's {self.positions} positions (max_position_embeddings)")
        embeds = self.lm.get_input_embeddings()(target)
        inputs = torch.cat([compressed.to(embeds.dtype), embeds], dim=1)
        hidden = run_varlen(self.lm.base_model, lengths + k, self.resolved_route, inputs_embeds=inputs)[:, k - 1:]
        # Under autocast the states come out in bf16 while the head may be fp32: the fused ops want one dtype.
        return hidden.to(self.head[0].dtype), decoder_labels(target, lengths, 1)

    def collate(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids per row -> (ids [S, T] right-padded, lengths [S])."""
        pad = next(t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None)
        return pad_right(rows, pad)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, device=None,
                        attn_implementation: str | None = None, trust_remote_code: bool = False,
                        **kwargs) -> "FrozenDecoder":
        """Load the base causal LM and its tokenizer from a model directory as a frozen decoder."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"path: expected a model directory, {str(path)!r} is not one")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        dec = cls(lm, tokenizer, **kwargs)
        return dec.to(device) if device is not None else dec
