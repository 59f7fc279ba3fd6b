"""The precision of the CPU varlen route's attention for bf16/fp16 bodies (``are_fast.model.attention_precision``):
each forced path against float64 (forward and the gradients of q, k, v), which kernel dtype actually ran, the
automatic choice from (mocked) measurements, cached per key, and the real probe on a tiny shape."""
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import TOLERANCE, rel_error
from are_fast.model import attention_precision
from are_fast.model.layout import block_attention


@pytest.fixture
def kernel_dtypes(monkeypatch):
    """The dtype of q in every scaled_dot_product_attention call."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(attention_precision, "_cache", {})


def _qkv(dtype, groups=3, length=11, head_dim=8):
    gen = torch.Generator().manual_seed(0)
    masters = [torch.randn(groups, heads, length, head_dim, generator=gen, dtype=torch.float64) for heads in (4, 2, 2)]
    return [m.to(dtype).double() for m in masters]  # representable in dtype


def _attention(masters, dtype, window=None):
    q, k, v = (m.to(dtype).detach().requires_grad_() for m in masters)
    out = block_attention(q, k, v, scaling=0.3, sliding_window=window)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("window", [None, 4], ids=["causal", "window4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("precision", attention_precision.PRECISIONS)
def test_each_forced_precision_matches_float64(precision, dtype, window, kernel_dtypes):
    masters = _qkv(dtype)
    ref, ref_grads = _attention(masters, torch.float64, window)
    kernel_dtypes.clear()
    with attention_precision.use_precision(precision) as choices:
        out, grads = _attention(masters, dtype, window)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert kernel_dtypes == [dtype if precision == "low" else torch.float32]
    assert [c.precision for c in choices] == [precision] and choices[0].backward and choices[0].bucket == 16
    assert rel_error(out, ref) <= TOLERANCE[torch.bfloat16]
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert rel_error(grad, ref_grad) <= TOLERANCE[torch.bfloat16], f"d{name}"


def test_float32_runs_in_float32_is_more_accurate_than_bf16(kernel_dtypes):
    masters = _qkv(torch.bfloat16, groups=4, length=64, head_dim=16)
    ref, _ = _attention(masters, torch.float64)
    errors = {}
    for precision in attention_precision.PRECISIONS:
        with attention_precision.use_precision(precision):
            out = block_attention(*(m.to(torch.bfloat16) for m in masters), scaling=0.3)
        errors[precision] = rel_error(out, ref)
    assert errors["float32"] < errors["low"]  # one rounding of the output against roundings inside the kernel


def test_full_precision_and_other_devices_are_not_consulted(kernel_dtypes):
    masters = _qkv(torch.float32)
    with attention_precision.use_precision("float32") as choices:
        block_attention(*(m.float() for m in masters))
    assert choices == [] and kernel_dtypes == [torch.float32]
    q = torch.empty(1, 2, 4, 8, dtype=torch.bfloat16, device="meta")
    assert attention_precision.upcast(q, q) is False


@pytest.mark.parametrize(("low", "full", "expected"), [(1.0, 2.0, "low"), (1.0, 1.5, "low"), (1.0, 1.45, "float32"), (2.0, 1.0, "float32")])
def test_automatic_choice_follows_the_measurement_and_is_kept(low, full, expected, fresh_cache, monkeypatch):
    measured = []

    def fake_measure(dtype, head_dim, length, backward):
        measured.append((dtype, head_dim, length, backward))
        return low, full

    monkeypatch.setattr(attention_precision, "measure", fake_measure)
    monkeypatch.delenv("ARE_FAST_ATTENTION_PRECISION", raising=False)
    q = torch.zeros(2, 4, 20, 8, dtype=torch.bfloat16)
    with attention_precision.use_precision() as choices:
        for _ in range(2):
            assert attention_precision.upcast(q, q) is (expected == "float32")
        with torch.no_grad():
            attention_precision.upcast(q.requires_grad_(), q)
        attention_precision.upcast(q, q)  # with grad: the first key again
    assert measured == [(torch.bfloat16, 8, 32, False), (torch.bfloat16, 8, 32, True)]
    assert [c.backward for c in choices] == [False, False, False, True]
    assert all(c.precision == expected and "ms" in c.reason for c in choices)


def test_environment_variable_forces_and_is_checked(monkeypatch, fresh_cache):
    monkeypatch.setattr(attention_precision, "measure", lambda *a: pytest.fail("measured although forced"))
    q = torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("ARE_FAST_ATTENTION_PRECISION", "float32")
    assert attention_precision.upcast(q, q) is True
    monkeypatch.setenv("ARE_FAST_ATTENTION_PRECISION", "low")
    assert attention_precision.upcast(q, q) is False
    monkeypatch.setenv("ARE_FAST_ATTENTION_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ARE_FAST_ATTENTION_PRECISION: expected auto or one of low, float32"):
        attention_precision.upcast(q, q)
    with pytest.raises(ValueError, match="precision: expected None or one of low, float32"):
        with attention_precision.use_precision("half"):
            pass


@pytest.mark.parametrize("length, expected", [(1, 16), (16, 16), (17, 32), (300, 512), (10_000, 4096)])
def test_length_buckets(length, expected):
    assert attention_precision.bucket(length) == expected


@pytest.mark.parametrize("backward", [False, True])
def test_the_probe_times_both_kernels(backward):
    low, full = attention_precision.measure(torch.bfloat16, 8, 16, backward, repeats=1)
    assert all(math.isfinite(t) and t > 0 for t in (low, full))
