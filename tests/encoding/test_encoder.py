"""Encoder: embeddings equal a naive one-text-at-a-time float64 computation, in input order, whatever the batching."""
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers import rel_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from are_fast.encoding.batching import plan_batches
from are_fast.encoding.encoder import Encoder
from are_fast.encoding.mteb_adapter import MTEBModel
from are_fast.model import Compressor
from are_fast.toy import tiny_llama

K = 3
MAX_LENGTH = 48
INSTRUCTION = "In one word:"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random tiny Llama saved as a trained compressor: <EMBED0..2> in its tokenizer and embeddings."""
    path = str(tmp_path_factory.mktemp("encoder-model"))
    tiny_llama(path, hidden_size=32, layers=2, seed=0)
    torch.manual_seed(0)
    Compressor.from_pretrained(path, num_embed_tokens=K).save_pretrained(path)
    return path


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of 1-120 characters, some over MAX_LENGTH tokens (byte tokenizer: a token per byte), some non-ASCII."""
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop qrstuv wxyz .,é中"
    return ["".join(rng.choice(alphabet) for _ in range(int(rng.lognormvariate(3.2, 0.8)) % 120 + 1))
            for _ in range(n)]


def naive_embeddings(model_dir: str, texts, instruction=None, max_length=MAX_LENGTH, normalize=True,
                     dtype=torch.float64) -> torch.Tensor:
    """The oracle: transformers alone, one text at a time, no padding: [bos] text\\n instruction\\n <EMBED*>."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    body = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).model
    embed_ids = tok.convert_tokens_to_ids([f"<EMBED{i}>" for i in range(K)])
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    tail = tok((instruction or "") + "\n", add_special_tokens=False).input_ids + embed_ids
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = bos + tok(text + "\n", add_special_tokens=False).input_ids[:max_length] + tail
            hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0, -K:]
            emb = hidden.mean(0)
            rows.append(emb / emb.norm() if normalize else emb)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def encoder(model_dir):
    return Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=MAX_LENGTH)


@pytest.mark.parametrize("max_tokens,batch_size", [(64, None), (400, 3), (100000, None)],
                         ids=["budget64", "budget400-rows3", "one-batch"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_encode_equals_naive(model_dir, encoder, max_tokens, batch_size, normalize):
    texts = random_texts(23, seed=max_tokens)
    out = encoder.encode(texts, INSTRUCTION, batch_size=batch_size, max_tokens=max_tokens, normalize=normalize)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (23, encoder.hidden_size)
    ref = naive_embeddings(model_dir, texts, INSTRUCTION, normalize=normalize)
    assert rel_error(torch.from_numpy(out), ref) <= 1e-5
    per_row = [rel_error(torch.from_numpy(out[i]), ref[i]) for i in range(len(texts))]
    assert max(per_row) <= 1e-5  # every row in its place, not only the whole matrix


def test_bf16_within_tolerance(model_dir):
    enc = Encoder.from_pretrained(model_dir, "cpu", "bfloat16", max_length=MAX_LENGTH)
    assert enc.dtype == torch.bfloat16
    texts = random_texts(9, seed=3)
    out = enc.encode(texts, INSTRUCTION, convert_to="torch")
    assert out.dtype == torch.float32
    assert rel_error(out, naive_embeddings(model_dir, texts, INSTRUCTION)) <= 2e-2


def test_packed_rows_equal_padded(model_dir):
    packed = Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=MAX_LENGTH, pack=True)
    assert packed.compressor.pack
    texts = random_texts(11, seed=4)
    out = packed.encode(texts, INSTRUCTION, max_tokens=150, convert_to="torch")
    assert rel_error(out, naive_embeddings(model_dir, texts, INSTRUCTION)) <= 1e-5


def test_edge_inputs(model_dir, encoder):
    one = encoder.encode("a single text", convert_to="torch")
    assert one.shape == (encoder.hidden_size,)
    assert rel_error(one, naive_embeddings(model_dir, ["a single text"])[0]) <= 1e-5
    assert encoder.encode([]).shape == (0, encoder.hidden_size)
    empty = encoder.encode(["", "x"], convert_to="torch")  # an empty text still has its newline and k tokens
    assert rel_error(empty, naive_embeddings(model_dir, ["", "x"])) <= 1e-5
    assert encoder.num_embed_tokens == K and encoder.max_length == MAX_LENGTH


def test_no_lm_head_and_no_autograd(encoder):
    assert not any("lm_head" in name for name, _ in encoder.compressor.named_modules())
    out = encoder.encode(["abc"], convert_to="torch")
    assert not out.requires_grad and not out.is_inference()  # a plain tensor the caller may use anywhere


def test_plan_batches_budget_order_and_coverage():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)] + [500]
    for packed in (False, True):
        batches = plan_batches(lengths, 256, batch_size=16, packed=packed)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each row exactly once
        firsts = [lengths[b[0]] for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest first
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert len(b) <= 16 and (cost <= 256 or len(b) == 1)
        assert [200] in batches  # the row over the budget runs alone
    assert plan_batches([], 10) == []


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
        assert rel_error(d.embeddings, encoder.encode(d.source, convert_to="torch")) <= 1e-6


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(texts=["ok", 3]), TypeError, "item 1 is int"),
    (dict(texts=["ok"], convert_to="list"), ValueError, "convert_to"),
    (dict(texts=["ok"], batch_size=0), ValueError, "batch_size"),
    (dict(texts=["ok"], max_tokens=-5), ValueError, "max_tokens"),
    (dict(texts=["ok"], instruction=["a"]), TypeError, "instruction"),
], ids=["non-string", "convert_to", "batch_size", "max_tokens", "instruction"])
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


def test_mteb_adapter_both_call_shapes(encoder):
    model = encoder.for_mteb({"query": "Q:", "Sick-document": "D:"}, default_instruction="X:")
    assert isinstance(model, MTEBModel)
    texts = random_texts(7, seed=5)
    # MTEB 1.x: sentences and a task name.
    v1 = model.encode(texts, task_name="Sick", prompt_type=SimpleNamespace(value="query"), batch_size=32)
    np.testing.assert_allclose(v1, encoder.encode(texts, "Q:"), rtol=0, atol=1e-6)
    # MTEB 2.x: a DataLoader of {"text": [...]} batches, the task in task_metadata.
    loader = torch.utils.data.DataLoader([{"text": t} for t in texts], batch_size=3)
    v2 = model.encode(loader, task_metadata=SimpleNamespace(name="Sick"), hf_split="test", hf_subset="default",
                      prompt_type="document")
    np.testing.assert_allclose(v2, encoder.encode(texts, "D:"), rtol=0, atol=1e-6)
    assert model.instruction_for("Other", None) == "X:"
    sims = model.similarity(v1, v2)
    assert sims.shape == (7, 7)
    torch.testing.assert_close(torch.diagonal(sims), model.similarity_pairwise(v1, v2))
