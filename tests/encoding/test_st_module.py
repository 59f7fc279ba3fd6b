"""sentence-transformers: a model folder loads as ``SentenceTransformer(path)`` and gives ``are_fast.Encoder``'s
vectors (and the naive oracle's); the training jobs write the files that make this so."""
import json
import os
import shutil

import pytest
import torch
from _helpers import ENCODER_INSTRUCTION, ENCODER_MAX_LENGTH, TOLERANCE, naive_embeddings, random_texts, rel_error
from sentence_transformers import SentenceTransformer  # the test extra installs it, so this test never skips

from are_fast.encoding.defaults import default_dtype
from are_fast.encoding.encoder import Encoder
from are_fast.encoding.st_module import AutoRegEmbedModule, load_sentence_transformer
from are_fast.model.st_files import (
    MODULE_CONFIG_FILE,
    ST_CONFIG_FILE,
    ST_MODULE_TYPE,
    instruction_prompts,
    write_sentence_transformers_files,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = {"query": ENCODER_INSTRUCTION, "document": ENCODER_INSTRUCTION}


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.fixture(scope="module")
def st_dir(model_dir, tmp_path_factory):
    """A copy of the tiny trained model whose sentence-transformers files came from Encoder.save_sentence_transformers."""
    path = str(tmp_path_factory.mktemp("st") / "model")
    shutil.copytree(model_dir, path)
    weights = open(os.path.join(path, "model.safetensors"), "rb").read()
    enc = Encoder.from_pretrained(path, "cpu", torch.float32, max_length=ENCODER_MAX_LENGTH, prompts=PROMPTS,
                                  default_prompt_name="query")
    assert enc.save_sentence_transformers() == path
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == weights  # only the small files written
    return path


def test_sentence_transformer_equals_encoder_and_oracle(st_dir, model_dir):
    model = SentenceTransformer(st_dir, trust_remote_code=True, device="cpu", model_kwargs={"dtype": torch.float32})
    assert isinstance(model[0], AutoRegEmbedModule) and len(model) == 1
    assert model.max_seq_length == ENCODER_MAX_LENGTH and model.get_embedding_dimension() == 32
    enc = Encoder.from_pretrained(st_dir, "cpu", torch.float32)  # max_length and prompts from the folder
    assert enc.max_length == ENCODER_MAX_LENGTH and enc.prompts == PROMPTS and enc.default_prompt_name == "query"
    texts = random_texts(23, seed=12)  # some cut to ENCODER_MAX_LENGTH tokens
    ours = enc.encode(texts, convert_to_tensor=True)
    theirs = model.encode(texts, convert_to_tensor=True)  # batches of 32, padded: other batching, same vectors
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert row_cosines(theirs, ours).min() >= 0.99999
    assert rel_error(theirs, naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION, normalize=False)) <= 1e-5
    for call in (model.encode_query, model.encode_document):  # the same instruction on both sides, as trained
        assert row_cosines(call(texts, convert_to_tensor=True), ours).min() >= 0.99999
    other = model.encode(texts, prompt="Other:", normalize_embeddings=True, convert_to_tensor=True)
    assert row_cosines(other, enc.encode(texts, prompt="Other:", convert_to_tensor=True)).min() >= 0.99999
    assert torch.allclose(other.norm(dim=-1), torch.ones(len(texts)))
    torch.testing.assert_close(model.similarity(theirs[:4], theirs[4:9]), enc.similarity(ours[:4], ours[4:9]),
                               rtol=0, atol=1e-5)


def test_saved_by_sentence_transformers_loads_in_both(st_dir, tmp_path):
    model = SentenceTransformer(st_dir, trust_remote_code=True, device="cpu")
    model.save(str(tmp_path / "resaved"))
    with open(tmp_path / "resaved" / "modules.json") as f:
        assert [m["type"] for m in json.load(f)] == [ST_MODULE_TYPE]  # the class path our writer names
    texts = random_texts(9, seed=13)
    before = model.encode(texts, convert_to_tensor=True)
    again = SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    assert rel_error(again.encode(texts, convert_to_tensor=True), before) <= 1e-6
    enc = Encoder.from_pretrained(tmp_path / "resaved", "cpu")  # the default dtype, as sentence-transformers loaded it
    assert enc.dtype == default_dtype(torch.device("cpu"))
    assert row_cosines(enc.encode(texts, convert_to_tensor=True), before).min() >= 0.99999


def test_without_the_flag(st_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):  # sentence-transformers 6 asks for it
        SentenceTransformer(st_dir, device="cpu")
    model = load_sentence_transformer(st_dir, device="cpu")
    assert model.default_prompt_name == "query" and model.prompts["query"] == ENCODER_INSTRUCTION
    texts = random_texts(5, seed=14)
    flagged = SentenceTransformer(st_dir, trust_remote_code=True, device="cpu").encode(texts, convert_to_tensor=True)
    assert rel_error(model.encode(texts, convert_to_tensor=True), flagged) <= 1e-6


def test_training_job_writes_the_files(tmp_path):
    from are_fast.cli import main
    from are_fast.toy.data import compression_rows, tiny_llama, write_jsonl

    base, out = str(tmp_path / "base"), str(tmp_path / "s1")
    tiny_llama(base, hidden_size=16, layers=1)
    rows = compression_rows(8)
    write_jsonl(str(tmp_path / "c.jsonl"), rows)
    assert main(["stage1", "--data", str(tmp_path / "c.jsonl"), "--base-model", base, "--output-dir", out,
                 "--max-steps", "1", "--batch-size", "4", "--num-embed-tokens", "2", "--max-text-tokens", "40",
                 "--no-progress"]) == 0
    folder = os.path.join(out, "model")
    with open(os.path.join(folder, ST_CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["prompts"] == instruction_prompts(r["instruction"] for r in rows)["prompts"]
    with open(os.path.join(folder, MODULE_CONFIG_FILE)) as f:
        assert json.load(f) == {"num_embed_tokens": 2, "max_length": 40}
    texts = random_texts(6, seed=15)
    theirs = SentenceTransformer(folder, trust_remote_code=True, device="cpu").encode(texts, convert_to_tensor=True)
    ours = Encoder.from_pretrained(folder, "cpu", torch.float32).encode(texts, convert_to_tensor=True)
    assert row_cosines(theirs, ours).min() >= 0.99999


def test_instruction_prompts_and_bad_prompt_names(tmp_path):
    got = instruction_prompts(["a", None, "b", "b", "a", "b"])
    assert got == {"prompts": {"query": "b", "document": "b"}, "default_prompt_name": "query"}
    assert instruction_prompts([None]) == {"prompts": {}, "default_prompt_name": None}
    with pytest.raises(ValueError, match="default_prompt_name"):
        write_sentence_transformers_files(str(tmp_path), None, {"query": "x"}, "document")


def test_the_three_ways_give_the_same_vectors_by_default(st_dir, model_dir, tmp_path):
    """``are-fast encode``, ``Encoder.encode`` and ``SentenceTransformer.encode`` without options: the folder's
    prompt, its length limit, no normalization (``are_fast.encoding.defaults``), so the same vectors."""
    from are_fast.cli import main
    from are_fast.encoding.encode_job import MANIFEST, read_embeddings

    texts = random_texts(17, seed=14)  # some cut to the folder's ENCODER_MAX_LENGTH tokens
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert main(["encode", "--model", st_dir, "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e"),
                 "--no-progress"]) == 0
    row_ids, job = read_embeddings(str(tmp_path / "e"))
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    assert manifest["instruction"] == ENCODER_INSTRUCTION and manifest["normalize"] is False
    assert manifest["model"]["max_length"] == ENCODER_MAX_LENGTH and row_ids.tolist() == list(range(len(texts)))
    job = torch.from_numpy(job)
    encoder = torch.from_numpy(Encoder.from_pretrained(st_dir, "cpu").encode(texts))
    st = SentenceTransformer(st_dir, trust_remote_code=True, device="cpu").encode(texts, convert_to_tensor=True)
    # The shared dtype default too (bfloat16 on a CPU whose bf16 units measure faster): the same computation.
    dtype = default_dtype(torch.device("cpu"))
    assert manifest["model"]["dtype"] == str(dtype).removeprefix("torch.")
    for name, emb in (("Encoder.encode", encoder), ("sentence-transformers", st)):
        assert rel_error(emb, job) <= 1e-6, name
    oracle = naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION, normalize=False)  # float64
    assert rel_error(job, oracle) <= TOLERANCE[dtype], "are-fast encode against transformers alone"
    assert not torch.allclose(job.norm(dim=-1), torch.ones(len(texts)))  # not normalized: the shared default
