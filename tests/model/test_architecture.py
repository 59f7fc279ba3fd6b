"""What the model layer reads from a model's architecture (are_fast.model.architecture): logit transforms, the
head, the routes that run it exactly, and the lengths its positions allow."""
import logging

import pytest
import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from _families import build

from are_fast.model import Compressor, FrozenDecoder
from are_fast.model.architecture import (DEFAULT_MAX_TOKENS, choose_route, logit_transform, route_problems,
                                         token_limit)


@pytest.mark.parametrize("family, expected", [
    ("llama", {"softcap": None, "logit_scale": None}),
    ("gemma2", {"softcap": 3.0, "logit_scale": None}),
    ("gemma3", {"softcap": 5.0, "logit_scale": None}),
    ("granite", {"softcap": None, "logit_scale": 0.25}),  # logits / logits_scaling (4)
    ("cohere", {"softcap": None, "logit_scale": 0.5}),
])
def test_logit_transforms_come_from_the_config(family, expected):
    assert logit_transform(build(family)) == expected
    assert FrozenDecoder(build(family), ByT5Tokenizer()).logit_transform == expected


class OutputScaledLlama(LlamaForCausalLM):
    """A model whose code scales its logits by a key the fused ops do not model."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.output_multiplier
        return out


def test_logit_keys_count_where_the_models_code_reads_them():
    lm = build("llama")
    lm.config.final_logit_softcapping, lm.config.logit_scale = 30.0, 2.0  # stray keys: transformers' Llama ignores them
    assert logit_transform(lm) == {"softcap": None, "logit_scale": None}


def test_unmodelled_logit_keys_and_heads_are_refused_by_name():
    lm = OutputScaledLlama(build("llama").config)
    lm.config.output_multiplier = 2.0
    with pytest.raises(ValueError, match="output_multiplier=2.0 changes the logits"):
        FrozenDecoder(lm, ByT5Tokenizer())
    lm = build("llama")
    lm.lm_head = torch.nn.Sequential(lm.lm_head)
    with pytest.raises(ValueError, match="output embeddings are an nn.Linear.*got Sequential"):
        FrozenDecoder(lm, ByT5Tokenizer())


def test_every_family_runs_on_every_route():
    from _families import FAMILIES

    assert {name: route_problems(build(name)) for name in FAMILIES} == dict.fromkeys(FAMILIES, {})


def test_a_route_that_cannot_run_the_model_is_refused_or_left_by_default(caplog):
    lm = build("llama")
    lm.config.attention_chunk_size = 8
    with pytest.raises(ValueError, match=r"route: 'varlen' cannot run LlamaForCausalLM exactly: chunked attention "
                                         r"\(attention_chunk_size=8\); use 'padded' or 'packed'"):
        FrozenDecoder(lm, ByT5Tokenizer(), route="varlen")
    with pytest.raises(ValueError, match="'varlen' cannot run LlamaModel exactly: chunked attention"):
        Compressor(lm, ByT5Tokenizer(), 2, route="varlen")
    with caplog.at_level(logging.WARNING, logger="are_fast.model.architecture"):
        decoder = FrozenDecoder(lm, ByT5Tokenizer())  # the CPU default is varlen: it falls back to packed
        assert decoder.resolved_route == decoder.resolved_route == "packed"
    assert [r.getMessage() for r in caplog.records] == [
        "LlamaForCausalLM: the 'varlen' route cannot run it exactly (chunked attention (attention_chunk_size=8)); "
        "using 'packed'"]  # said once

    body = build("llama").model
    body.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    assert route_problems(body) == {"varlen": "attention sinks"}
    type(body)._supports_attention_backend = False  # as in most remote code
    try:
        problems = route_problems(body)
    finally:
        del type(body)._supports_attention_backend
    assert set(problems) == {"packed", "varlen"} and "_supports_attention_backend" in problems["packed"]
    assert choose_route(None, problems, "cpu", "m") == "padded"
    with pytest.raises(ValueError, match="'packed' cannot run m exactly: LlamaModel does not pass attention"):
        choose_route("packed", problems, "cpu", "m")

    lm = build("gemma3")
    lm.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match=r"'padded' cannot run .* bidirectional attention.*no route can"):
        FrozenDecoder(lm, ByT5Tokenizer(), route="padded")
    with pytest.raises(ValueError, match="no route runs Gemma3ForCausalLM exactly: bidirectional attention"):
        FrozenDecoder(lm, ByT5Tokenizer()).resolved_route


def test_token_limits():
    assert token_limit("auto", None, 5, "x", "k") == DEFAULT_MAX_TOKENS
    assert token_limit("auto", 4096, 5, "x", "k") == DEFAULT_MAX_TOKENS
    assert token_limit("auto", 40, 5, "x", "k") == 35
    assert token_limit(None, 40, 5, "x", "k") == 35 and token_limit(None, None, 5, "x", "k") is None
    assert token_limit(35, 40, 5, "x", "k") == 35
    with pytest.raises(ValueError, match=r"x: 36 tokens do not fit the model's 40 positions \(max_position_embeddings\) "
                                         r"with k; give at most 35"):
        token_limit(36, 40, 5, "x", "k")
    with pytest.raises(ValueError, match="the model's 5 positions leave no room for text after k"):
        token_limit("auto", 5, 5, "x", "k")
    with pytest.raises(ValueError, match="expected a positive int, None or 'auto', got 0"):
        token_limit(0, 40, 5, "x", "k")


def _short_gpt2(positions=32):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                                      eos_token_id=1, bos_token_id=None)).eval()


LONG = "a text far longer than this model's thirty-two positions, in bytes " * 2


def test_default_lengths_stay_within_the_positions_and_larger_ones_are_errors():
    compressor = Compressor(_short_gpt2(), ByT5Tokenizer(), 3)
    assert compressor.max_text_tokens == 32 - 3  # ByT5 has no bos
    rows = compressor.tokenize([LONG, "short"], "in one word:")
    instruction = len(compressor.tokenizer("in one word:\n", add_special_tokens=False).input_ids)
    assert [len(r) for r in rows.ids] == [32 - 3, len("short\n") + instruction] and rows.truncated == 1
    assert compressor.compress([LONG, "short"], "in one word:").shape == (2, 3, 32)  # no IndexError
    with pytest.raises(ValueError, match="max_text_tokens: 512 tokens do not fit the model's 32 positions"):
        Compressor(_short_gpt2(), ByT5Tokenizer(), 3, max_text_tokens=512)
    with pytest.raises(ValueError, match="instructions: .* takes 30 tokens, which leave no room"):
        compressor.tokenize(["x"], "i" * 29)

    decoder = FrozenDecoder(_short_gpt2(), ByT5Tokenizer(), num_embed_tokens=3)
    assert decoder.max_target_tokens == 32 - 3 - 1  # k and eos
    targets = decoder.tokenize([LONG])
    assert len(targets.ids[0]) == 32 - 3 and targets.truncated == 1
    ids, lengths = decoder.collate(targets.ids)
    hidden, _ = decoder(torch.randn(1, 3, 32), ids, lengths)
    assert torch.isfinite(hidden).all()
    with pytest.raises(ValueError, match="target: k=4 compressed vectors and 29 target tokens exceed the model's 32"):
        decoder(torch.randn(1, 4, 32), ids, lengths)
    with pytest.raises(ValueError, match="max_target_tokens: 512 tokens do not fit the model's 32 positions "
                                         r"\(max_position_embeddings\) with k=3 compressed vectors and eos; give at "
                                         "most 28"):
        FrozenDecoder(_short_gpt2(), ByT5Tokenizer(), num_embed_tokens=3, max_target_tokens=512)


def test_encoder_defaults_fit_the_positions(tmp_path):
    from are_fast import Encoder

    _short_gpt2().save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    encoder = Encoder.from_pretrained(tmp_path, "cpu", num_embed_tokens=3)
    assert encoder.max_length == 32 - 3
    assert encoder.encode([LONG, "short"], prompt="in one word:").shape == (2, 32)  # no IndexError
    with pytest.raises(ValueError, match="max_text_tokens: 512 tokens do not fit the model's 32 positions"):
        Encoder.from_pretrained(tmp_path, "cpu", num_embed_tokens=3, max_length=512)
