import pytest
import torch

from are_fast.toy import tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved random-init tiny Llama (hidden 32, 2 layers, ByT5 vocabulary of 384) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(str(path), hidden_size=32, layers=2, seed=0)
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine spin and crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
