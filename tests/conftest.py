"""Test setup: the device under test, Triton's interpreter for CPU runs, fixed seeds, NaN-poisoned allocations.

``--device cpu|cuda`` (default: cuda when available, else cpu) picks where the op, kernel and native tests run
their ops; the ``device`` fixture hands it to them. Their float64 oracle always runs on CPU. For a CPU run
TRITON_INTERPRET=1 is set here, before any test module (and so any Triton kernel) is imported; for a CUDA run
it is removed, so the triton backend runs the compiled kernels. Poisoning torch.empty / empty_like with NaN
(on every device) makes any element an op forgets to write fail.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # A CPU run: set the interpreter now, not only in pytest_configure. The conftests of subfolders import
    # transformers, which imports triton.language, before pytest_configure runs, and Triton < 3.7 binds its
    # own @triton.jit helpers (tl.max, ...) to the interpreter or the compiler when they are defined.
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the op, kernel and native tests run the ops (default: cuda when available, else cpu)",
    )


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is defined, i.e. on import of are_fast.kernels
    else:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the ops under test run on (``--device``)."""
    return torch.device(pytestconfig.getoption("--device"))


_empty, _empty_like = torch.empty, torch.empty_like


def _poison(tensor):
    if tensor.dtype.is_floating_point and tensor.device.type != "meta":
        with torch.no_grad():  # torch 2.11's checkpoint asks torch.empty for leaves that require grad
            tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine spin and crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
