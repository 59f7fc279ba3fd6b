import pytest

from are_fast.toy.data import tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved random-init tiny Llama (hidden 32, 2 layers, ByT5 vocabulary of 384) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(str(path), hidden_size=32, layers=2, seed=0)
    return str(path)


@pytest.fixture(autouse=True)
def model_tests_on_one_thread(one_thread):
    """Every model and training test runs on one thread (the fixture is in tests/conftest.py)."""
