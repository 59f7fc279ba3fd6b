import pytest
import torch

from are_fast.toy import tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved random-init tiny Llama (hidden 32, 2 layers, ByT5 vocabulary of 384) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(str(path), hidden_size=32, layers=2, seed=0)
    return str(path)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error; NaN anywhere gives inf so it never passes."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


@pytest.fixture
def rel_err():
    return _rel_err
