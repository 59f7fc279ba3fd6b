"""Encoder: embeddings equal a naive one-text-at-a-time float64 computation, in input order, whatever the batching;
its call shape is sentence-transformers' (prompts, output types, similarity)."""
import threading

import numpy as np
import pytest
import torch
from _helpers import ENCODER_INSTRUCTION, ENCODER_K, ENCODER_MAX_LENGTH, naive_embeddings, random_texts, rel_error

from are_fast.encoding.encoder import Encoder
from are_fast.ops import sweep_precision
from are_fast.toy.data import tiny_llama


@pytest.mark.parametrize("max_tokens,batch_size", [(64, None), (400, 3), (100000, None)],
                         ids=["budget64", "budget400-rows3", "one-batch"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_encode_equals_naive(model_dir, encoder, max_tokens, batch_size, normalize):
    texts = random_texts(23, seed=max_tokens)
    out = encoder.encode(texts, prompt=ENCODER_INSTRUCTION, batch_size=batch_size, max_tokens=max_tokens,
                         normalize_embeddings=normalize)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (23, encoder.hidden_size)
    ref = naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION, normalize=normalize)
    assert rel_error(torch.from_numpy(out), ref) <= 1e-5
    per_row = [rel_error(torch.from_numpy(out[i]), ref[i]) for i in range(len(texts))]
    assert max(per_row) <= 1e-5  # every row in its place, not only the whole matrix


def test_bf16_within_tolerance(model_dir):
    enc = Encoder.from_pretrained(model_dir, "cpu", "bfloat16", max_length=ENCODER_MAX_LENGTH)
    assert enc.dtype == torch.bfloat16
    texts = random_texts(9, seed=3)
    out = enc.encode(texts, prompt=ENCODER_INSTRUCTION, convert_to_tensor=True, normalize_embeddings=True)
    assert out.dtype == torch.float32
    assert rel_error(out, naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION)) <= 2e-2


def test_packed_rows_equal_padded(model_dir):
    packed = Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=ENCODER_MAX_LENGTH, pack=True)
    assert packed.compressor.pack
    texts = random_texts(11, seed=4)
    out = packed.encode(texts, prompt=ENCODER_INSTRUCTION, max_tokens=150, convert_to_tensor=True,
                         normalize_embeddings=True)
    assert rel_error(out, naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION)) <= 1e-5


def test_edge_inputs(model_dir, encoder):
    one = encoder.encode("a single text", convert_to_tensor=True)
    assert one.shape == (encoder.hidden_size,)
    assert rel_error(one, naive_embeddings(model_dir, ["a single text"], normalize=False)[0]) <= 1e-5
    assert encoder.encode([]).shape == (0, encoder.hidden_size)
    empty = encoder.encode(["", "x"], convert_to_tensor=True)  # an empty text still has its newline and k tokens
    assert rel_error(empty, naive_embeddings(model_dir, ["", "x"], normalize=False)) <= 1e-5
    assert encoder.num_embed_tokens == ENCODER_K and encoder.max_length == ENCODER_MAX_LENGTH


def test_no_lm_head_and_no_autograd(encoder):
    assert not any("lm_head" in name for name, _ in encoder.compressor.named_modules())
    out = encoder.encode(["abc"], convert_to_tensor=True)
    assert not out.requires_grad and not out.is_inference()  # a plain tensor the caller may use anywhere


def test_tokenization_runs_in_a_background_thread(encoder):
    threads = []

    def read(chunk):
        threads.append(threading.current_thread())
        return chunk

    chunks = [["a", "bb"], ["ccc"], ["dddd", "e", "ff"]]
    done = list(encoder.encode_chunks(chunks, read))
    assert [d.source for d in done] == chunks  # in order
    assert all(t is not threading.main_thread() for t in threads) and len(threads) == 3
    for d in done:
        assert rel_error(d.embeddings, encoder.encode(d.source, convert_to_tensor=True)) <= 1e-6


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sentences=["ok", 3]), TypeError, "item 1 is int"),
    (dict(sentences=["ok"], prompt_name="missing"), ValueError, "prompt_name: 'missing' is not one of"),
    (dict(sentences=["ok"], batch_size=0), ValueError, "batch_size"),
    (dict(sentences=["ok"], max_tokens=-5), ValueError, "max_tokens"),
    (dict(sentences=["ok"], prompt=["a"]), TypeError, "prompt"),
], ids=["non-string", "prompt_name", "batch_size", "max_tokens", "prompt"])
def test_bad_arguments(encoder, kwargs, error, match):
    with pytest.raises(error, match=match):
        encoder.encode(**kwargs)


def test_bad_model_directories(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        Encoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        Encoder.from_pretrained(tmp_path)
    plain = tmp_path / "plain"
    tiny_llama(str(plain), hidden_size=16, layers=1)  # a base LM: its tokenizer has no <EMBED0>
    with pytest.raises(ValueError, match="no <EMBED0> token"):
        Encoder.from_pretrained(plain)
    with pytest.raises(ValueError, match="dtype"):
        Encoder.from_pretrained(plain, dtype="int8", num_embed_tokens=2)
    with pytest.raises(ValueError, match="max_length"):
        Encoder.from_pretrained(plain, num_embed_tokens=2, max_length="long")


def test_output_types_follow_sentence_transformers(encoder):
    texts = random_texts(5, seed=6)
    array = encoder.encode(texts)  # defaults: numpy, not normalized (sentence-transformers' defaults)
    assert isinstance(array, np.ndarray) and array.shape == (5, encoder.hidden_size)
    assert not np.allclose(np.linalg.norm(array, axis=1), 1.0)
    tensor = encoder.encode(texts, convert_to_tensor=True, convert_to_numpy=True)  # convert_to_tensor wins
    assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
    rows = encoder.encode(texts, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 5 and all(r.shape == (encoder.hidden_size,) for r in rows)
    torch.testing.assert_close(torch.stack(rows), torch.from_numpy(array), rtol=0, atol=0)
    unit = encoder.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(unit, array / np.linalg.norm(array, axis=1, keepdims=True), rtol=0, atol=1e-6)
    assert isinstance(encoder.encode("one", convert_to_numpy=False), torch.Tensor)


def test_prompts_are_the_instruction(model_dir):
    enc = Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=ENCODER_MAX_LENGTH,
                                  prompts={"query": ENCODER_INSTRUCTION, "other": "Else:"}, default_prompt_name="query")
    texts = random_texts(6, seed=9)
    ref = naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION, normalize=False)
    for out in (enc.encode(texts, convert_to_tensor=True),  # the default prompt
                enc.encode(texts, prompt_name="query", convert_to_tensor=True),
                enc.encode(texts, prompt_name="other", prompt=ENCODER_INSTRUCTION, convert_to_tensor=True)):  # prompt wins
        assert rel_error(out, ref) <= 1e-5
    other = enc.encode(texts, prompt_name="other", convert_to_tensor=True)
    assert rel_error(other, naive_embeddings(model_dir, texts, "Else:", normalize=False)) <= 1e-5
    bare = enc.encode(texts, prompt="", convert_to_tensor=True)  # an explicit empty prompt: no instruction
    assert rel_error(bare, naive_embeddings(model_dir, texts, None, normalize=False)) <= 1e-5
    with pytest.raises(ValueError, match="default_prompt_name"):
        Encoder(enc.compressor, prompts={"a": "x"}, default_prompt_name="b")


def test_similarity_is_cosine(encoder):
    a, b = encoder.encode(random_texts(4, seed=1)), encoder.encode(random_texts(3, seed=2))
    sims = encoder.similarity(a, b)
    expected = torch.tensor([[float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for y in b] for x in a])
    assert sims.shape == (4, 3) and sims.dtype == torch.float32
    torch.testing.assert_close(sims, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.similarity_pairwise(a[:3], b), torch.diagonal(expected[:3]), rtol=0, atol=1e-6)
    assert encoder.similarity(a[0], b).shape == (1, 3)  # one vector counts as one row
    with pytest.raises(ValueError, match="embeddings2"):
        encoder.similarity_pairwise(a, b)


def test_repr_says_what_runs(encoder, model_dir):
    text = repr(encoder)
    for part in (f"path={model_dir!r}", "k=3", "hidden_size=32", f"max_length={ENCODER_MAX_LENGTH}", "dtype=float32",
                 "device=cpu", "max_tokens=8192"):
        assert part in text, part


@pytest.mark.parametrize("path", ["lowp", "float32"])
def test_cpu_default_dtype_follows_the_machine(model_dir, path, monkeypatch):
    """No dtype on CPU: bf16 where the CPU's bf16 units measure faster (sweep_precision.automatic), else
    float32; an explicit float32 wins; repr says which runs."""
    choice = sweep_precision.SweepChoice("cpu", torch.bfloat16, path, "test")
    monkeypatch.setattr(sweep_precision, "automatic", lambda device, dtype: choice)
    enc = Encoder.from_pretrained(model_dir, "cpu", max_length=ENCODER_MAX_LENGTH)
    expected = torch.bfloat16 if path == "lowp" else torch.float32
    assert enc.dtype == expected and f"dtype={str(expected).removeprefix('torch.')}" in repr(enc)
    assert Encoder.from_pretrained(model_dir, "cpu", "float32", max_length=ENCODER_MAX_LENGTH).dtype == torch.float32


def test_bf16_agrees_with_float32_row_by_row(model_dir):
    """Per-row cosine of bf16 and float32 embeddings of the same texts (the README's agreement figure comes
    from benchmarks/test_bench_encoder.py on a ~100M-parameter model)."""
    texts = random_texts(16, seed=4)
    out = {dtype: Encoder.from_pretrained(model_dir, "cpu", dtype, max_length=ENCODER_MAX_LENGTH).encode(
        texts, prompt=ENCODER_INSTRUCTION, convert_to_tensor=True, normalize_embeddings=True) for dtype in ("float32", "bfloat16")}
    cosine = (out["float32"] * out["bfloat16"]).sum(1)
    assert cosine.min() >= 0.999, cosine.min()
