"""The encoder tests' model: a random tiny Llama saved as a trained compressor, and an Encoder over it."""
import pytest
import torch
from _helpers import ENCODER_K, ENCODER_MAX_LENGTH

from are_fast.encoding.encoder import Encoder
from are_fast.model import Compressor
from are_fast.toy.data import tiny_llama


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random tiny Llama saved as a trained compressor: <EMBED0..2> in its tokenizer and embeddings."""
    path = str(tmp_path_factory.mktemp("encoder-model"))
    tiny_llama(path, hidden_size=32, layers=2, seed=0)
    torch.manual_seed(0)
    Compressor.from_pretrained(path, num_embed_tokens=ENCODER_K).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(model_dir):
    return Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=ENCODER_MAX_LENGTH)
