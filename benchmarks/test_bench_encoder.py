"""Encoding throughput (texts/s): ``are_fast.Encoder`` against the usual padded batch loop, on one text mix.

The texts are the query, pos and neg fields of ../shared/data/medi_nli_sample.jsonl (next to the repository)
when that file is present, else a generated mix with log-normal character lengths (median ~90, like it).
The model is a random-init Llama with a byte-level tokenizer (the layout of a trained checkpoint, k=5):
CPU: H=128, 2 layers, vocabulary 1024 (the LM head is ~21% of a token's forward FLOPs, as in 1B-class models;
small so that the CPU suite takes about a minute); CUDA: Llama-3.2-1B's shape (H=2048, 16 layers, vocabulary
128256) in bfloat16.

Rows of one group, side by side:
- naive: batches of 64 texts in input order, padded to the longest, the full causal-LM forward (LM head and
  logits included) under no_grad, the k hidden states read from ``output_hidden_states``;
- naive-no-head: the same batches through the model body only (what dropping the head alone buys);
- encoder-<route>: ``Encoder.encode`` (length-sorted token-budget batches, background tokenization, no head,
  inference mode) with the rows run by one route of ``are_fast.model.layout``: "padded" (attention mask),
  "packed" (several sequences per row, transformers' packed-sequence mask under sdpa), "varlen" (one row,
  attention per sequence), "flex" (packed rows under attn_implementation="flex_attention", a document
  BlockMask; skipped where torch cannot run FlexAttention, e.g. when its CPU kernel fails to compile).
A second group, encode-dtype-<config>, times ``Encoder.encode`` of one model in float32 and in bfloat16 side by
side (CPU: a ~100M-parameter Llama shape, H=768, 12 layers, vocabulary 32000; CUDA: the 1B shape above), with
the bf16 row's speed-up over float32 and its per-row cosine to the float32 vectors (the README's figures).
``extra_info`` holds texts, real tokens, computed tokens (tokens the linear layers run, padding included),
padding_fraction (computed - real) / computed, attention_tokens (query rows attention computes, padding
included: the varlen route's CPU path pads each group of similar-length sequences), texts_per_s, and for the
encoder rows speedup_vs_naive (mean time of the naive row / the encoder's, same session).
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile

import pytest
import torch

from are_fast.encoding.encoder import Encoder
from are_fast.encoding.pipeline import prepare_chunk
from are_fast.model import Compressor
from are_fast.model.layout import attention_groups, computed_tokens, pack_rows

from .cases import bench_device, smoke_mode

MEDI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                    "medi_nli_sample.jsonl")
INSTRUCTION = "This sentence means in one word:"
K = 5
NAIVE_BATCH = 64
CONFIGS = {  # LlamaConfig fields per device; smoke mode shrinks the CPU one
    "cpu": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024),
    "cuda": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
}
TEXTS = {"cpu": 256, "cuda": 3000, "smoke": 96}
DTYPE_CONFIGS = {  # the dtype comparison's model: ~100M parameters on CPU (the bf16 default's figure)
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000),
    "cuda": CONFIGS["cuda"],
    "smoke": CONFIGS["smoke"],
}
DTYPE_TEXTS = {"cpu": 192, "cuda": 3000, "smoke": 32}
_dtype_runs: dict = {}  # dtype -> (mean seconds, embeddings) of this session
_means: dict = {}  # impl -> mean seconds of this session (the speed-up is read side by side)


def bench_texts(count: int) -> tuple[list[str], str]:
    """``count`` texts and where they come from."""
    if os.path.isfile(MEDI):
        with open(MEDI, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        texts = [row[field] for row in rows for field in ("query", "pos", "neg")]
        return texts[:count], "medi_nli_sample.jsonl"
    rng = random.Random(0)
    words = ["the", "a", "model", "reads", "every", "text", "quickly", "and", "writes", "vectors", "of", "meaning"]
    texts = []
    for _ in range(count):
        chars = min(600, int(rng.lognormvariate(math.log(90), 0.6)))
        text = ""
        while len(text) < chars:
            text += rng.choice(words) + " "
        texts.append(text.strip())
    return texts, "log-normal mix (medi_nli_sample.jsonl not found)"


def _saved_model(path: str, fields: dict) -> None:
    """A random-init Llama with ``fields`` and a byte-level tokenizer, saved as a trained checkpoint (k=K)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the naive rows load the body checkpoint with a fresh random LM head
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(**fields, max_position_embeddings=2048, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    Compressor(LlamaForCausalLM(config), tokenizer, K).save_pretrained(path)


@pytest.fixture(scope="module")
def setup():
    """(device, model directory, texts, source, dtype, config name) of this run."""
    device = bench_device()
    name = "smoke" if smoke_mode() else device.type
    with tempfile.TemporaryDirectory() as path:
        _saved_model(path, CONFIGS[name])
        texts, source = bench_texts(TEXTS[name])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        yield device, path, texts, source, dtype, name


def _naive(lm, comp: Compressor, texts, device, head: bool):
    """The padded loop: fixed batches in input order; returns [n, H] float32 unit embeddings."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), NAIVE_BATCH):
            batch = comp.collate(comp.tokenize(texts[start: start + NAIVE_BATCH], INSTRUCTION).ids).to(device)
            mask = (torch.arange(batch.input_ids.shape[1], device=device) < batch.lengths.unsqueeze(1)).long()
            if head:
                hidden = lm(input_ids=batch.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            else:
                hidden = lm.model(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state
            index = batch.embed_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            emb = hidden.gather(1, index).float().mean(1)
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.cat(out)


ENCODER_ROUTES = {"encoder-padded": ("padded", None), "encoder-packed": ("packed", None),
                  "encoder-varlen": ("varlen", None), "encoder-flex": ("packed", "flex_attention")}


def _attention_tokens(lengths: list, route: str, device: torch.device) -> int:
    """Query rows the attention of a batch computes, padding included: sequences x the longest (padded), packed
    rows x their width (packed), the groups' sequences x their longest (varlen's CPU path), the real tokens
    (varlen on CUDA: torch's varlen kernel)."""
    if route == "packed":
        return len(pack_rows(lengths, max(lengths))) * max(lengths)
    if route == "varlen":
        if device.type == "cuda":
            return sum(lengths)
        return sum(len(group) * lengths[group[0]] for group in attention_groups(lengths))
    return len(lengths) * max(lengths)


@pytest.mark.parametrize("impl", ["naive", "naive-no-head", *ENCODER_ROUTES])
def test_encode_throughput(impl, setup, measure, benchmark):
    from transformers import AutoModelForCausalLM

    device, path, texts, source, dtype, name = setup
    if impl == "encoder-flex" and device.type == "cpu" and os.environ.get("ARE_FAST_BENCH_FLEX_CPU") != "1":
        pytest.skip("FlexAttention on CPU: torch 2.13 has no CPU backward and its compiled CPU forward failed to "
                    "build on the development machine (inductor CppCompileError); ARE_FAST_BENCH_FLEX_CPU=1 tries it")
    route, attention = ENCODER_ROUTES.get(impl, ("padded", None))
    reference = Encoder.from_pretrained(path, device, dtype, max_length=512, pack=False)
    encoder = Encoder.from_pretrained(path, device, dtype, max_length=512, attn_implementation=attention)
    encoder.compressor.route = route
    comp = encoder.compressor
    if impl.startswith("encoder"):
        def run():
            return encoder.encode(texts, prompt=INSTRUCTION, convert_to_tensor=True, normalize_embeddings=True)
    else:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

        def run():
            return _naive(lm, comp, texts, device, head=impl == "naive")
    # Same numbers before timing: the rows do the same work (the reference: padded rows, the model's own sdpa).
    expected = reference.encode(texts[:NAIVE_BATCH], prompt=INSTRUCTION, convert_to_tensor=True,
                                normalize_embeddings=True)
    try:
        got = (run()[:NAIVE_BATCH] if impl.startswith("encoder") else
               _naive(lm, comp, texts[:NAIVE_BATCH], device, impl == "naive"))
    except Exception as err:  # noqa: BLE001 - only FlexAttention's compile or device support may fail here
        if impl != "encoder-flex":
            raise
        pytest.skip(f"FlexAttention does not run here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert float((got - expected).norm() / expected.norm()) <= tolerance
    lengths = [len(ids) + K for ids in comp.tokenize(texts, INSTRUCTION).ids]
    if impl.startswith("encoder"):  # the batches as planned (one chunk when len(texts) <= 2048)
        planned = [b.lengths.tolist() for _, b in prepare_chunk(encoder.compressor, texts, INSTRUCTION,
                                                                   encoder.max_tokens).batches]
    else:
        planned = [lengths[i: i + NAIVE_BATCH] for i in range(0, len(lengths), NAIVE_BATCH)]
    computed = sum(computed_tokens(batch, route) for batch in planned)
    attention_tokens = sum(_attention_tokens(batch, route, device) for batch in planned)
    measure(run, group=f"encode-{name}", suite="encoder", impl=impl, texts=len(texts),
            source=source, config=name, dtype=str(dtype).removeprefix("torch."), real_tokens=sum(lengths),
            computed_tokens=computed, padding_fraction=(computed - sum(lengths)) / computed,
            attention_tokens=attention_tokens, route=route, attention=attention or "sdpa",
            max_tokens=encoder.max_tokens)
    mean = benchmark.stats.stats.mean
    _means[impl] = mean
    benchmark.extra_info["texts_per_s"] = len(texts) / mean
    if impl.startswith("encoder") and "naive" in _means:
        benchmark.extra_info["speedup_vs_naive"] = _means["naive"] / mean


@pytest.fixture(scope="module")
def dtype_setup():
    """(device, model directory, texts, config name) of the dtype comparison."""
    device = bench_device()
    name = "smoke" if smoke_mode() else device.type
    with tempfile.TemporaryDirectory() as path:
        _saved_model(path, DTYPE_CONFIGS[name])
        yield device, path, bench_texts(DTYPE_TEXTS[name])[0], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encode_dtype(dtype, dtype_setup, measure, benchmark):
    """Encoder.encode of one model in float32, then bf16: the bf16 row records its speed-up over float32 and
    the smallest per-row cosine of its vectors to the float32 ones (the Encoder's CPU default is bf16 where
    the CPU's bf16 units measure faster: are_fast.ops.sweep_precision)."""
    device, path, texts, name = dtype_setup
    encoder = Encoder.from_pretrained(path, device, dtype, max_length=512)

    def run():
        return encoder.encode(texts, prompt=INSTRUCTION, convert_to_tensor=True, normalize_embeddings=True)

    vectors = run()  # warm-up (oneDNN's kernel selection), and the vectors compared below
    params = sum(p.numel() for p in encoder.compressor.parameters())
    measure(run, group=f"encode-dtype-{name}", suite="encoder", impl=f"encoder-{dtype}", texts=len(texts),
            config=name, dtype=dtype, parameters=params)
    _dtype_runs[dtype] = (benchmark.stats.stats.mean, vectors.float().cpu())
    if dtype == "bfloat16" and "float32" in _dtype_runs:
        seconds, reference = _dtype_runs["float32"]
        cosine = (vectors.float().cpu() * reference).sum(1)
        benchmark.extra_info["speedup_vs_float32"] = seconds / benchmark.stats.stats.mean
        benchmark.extra_info["min_cosine_vs_float32"] = float(cosine.min())
        benchmark.extra_info["mean_cosine_vs_float32"] = float(cosine.mean())
        assert cosine.min() >= 0.99, f"bf16 vectors far from float32's: per-row cosine down to {cosine.min():.4f}"
