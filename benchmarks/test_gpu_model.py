"""benchmarks.gpu_model against figures computed by hand, and its columns in benchmarks.report."""
from __future__ import annotations

import pytest

from . import gpu_model
from .report import markdown
from .test_report import _result

# N=1024, H=256, V=2048 in chunks of 512 rows, at 1 TFLOP/s and 100 GB/s (slow rates keep the sums readable).
SHAPE = dict(tokens=1024, hidden=256, vocab=2048, chunk_rows=512, flops_rate=1e12, bandwidth=1e11)


def test_a_kernel_takes_the_larger_of_its_two_times():
    assert gpu_model.Kernel("k", flops=1e12, bytes=1e9).seconds(1e12, 1e11) == pytest.approx(1.0)  # arithmetic
    assert gpu_model.Kernel("k", flops=1e9, bytes=1e12, count=3).seconds(1e12, 1e11) == pytest.approx(30.0)  # memory


def test_bytes_per_logit():
    # frozen: logits written 4 + epilogue (reads 8, bf16 gradient 2) + gradient read by G @ W 2
    assert gpu_model.bytes_per_logit("triton", trainable=False) == 16
    # before: the epilogue writes a float32 gradient (4) and a cast pass reads it (4) and writes bf16 (2)
    assert gpu_model.bytes_per_logit("before", trainable=False) == 24
    assert gpu_model.bytes_per_logit("native", trainable=False) == 24
    # trainable adds the values-only forward (write 4, read 4) and the read by G.T @ h (2)
    assert gpu_model.bytes_per_logit("triton", trainable=True) == 26
    assert gpu_model.bytes_per_logit("before", trainable=True) == 34
    with pytest.raises(ValueError, match="path: expected one of triton, native, before"):
        gpu_model.epilogue_bytes_per_logit("cuda")


def test_frozen_head_by_hand():
    p = gpu_model.predict(trainable=False, **SHAPE)
    gemm = 2 * 512 * 2048 * 256 / 1e12  # per chunk, arithmetic-bound: 5.36870912e-4 s
    epilogue = 1024 * 2048 * 10 / 1e11  # 2.097152e-4 s
    rescale = 1024 * 256 * 4 / 1e11  # 1.048576e-5 s
    assert p.seconds == pytest.approx(4 * gemm + epilogue + rescale)  # 2.367684608e-3 s
    assert p.seconds == pytest.approx(2.367684608e-3)
    assert p.floor_seconds == pytest.approx(2 * (2 * 1024 * 2048 * 256) / 1e12)  # 2.147483648e-3 s
    assert p.floor_ratio == pytest.approx(2.367684608 / 2.147483648)


def test_trainable_head_before_and_after_by_hand():
    after = gpu_model.predict(trainable=True, **SHAPE)
    before = gpu_model.predict(trainable=True, path="before", **SHAPE)
    # The same matmuls; before adds 8 bytes per logit of epilogue + cast and, per chunk, acc += product
    # (3 passes over a float32 [V, H]); in place, the accumulator's read + write hide under the matmul.
    extra = 1024 * 2048 * 8 / 1e11 + 2 * (3 * 2048 * 256 * 4) / 1e11
    assert before.seconds - after.seconds == pytest.approx(extra)  # 2.9360128e-4 s
    gemm = 2 * 512 * 2048 * 256 / 1e12
    forward = 1024 * 2048 * 4 / 1e11  # values-only epilogue: one read of the logits
    cast = 2048 * 256 * 6 / 1e11  # accumulator read (4) and bf16 gradient written (2)
    assert after.seconds == pytest.approx(8 * gemm + forward + 1024 * 2048 * 10 / 1e11 + cast)
    assert after.floor_seconds == pytest.approx(3 * (2 * 1024 * 2048 * 256) / 1e12)


def test_report_prints_the_model_beside_gpu_rows():
    gpu = dict(head="llama3-8b", tokens=8192, dtype="bfloat16")
    rows = [
        _result("token_logprobs", "triton", 0.0300, 400 * 2**20, **gpu),
        _result("token_logprobs", "reference", 0.0900, 9000 * 2**20, **gpu),
        _result("floor", "floor", 0.0240, 0, kind="floor", **gpu),
    ]
    for row in rows:
        row["extra_info"].update(device="cuda", hidden=4096, vocab=128256)
    text = markdown(rows, {}, {}, None)
    predicted = gpu_model.predict(8192, 4096, 128256, False)
    triton = next(line for line in text.splitlines() if line.startswith("| token_logprobs | llama3-8b-N8192-bf16-frozen | triton"))
    cells = [c.strip() for c in triton.strip("|").split("|")]
    assert cells[-2:] == [f"{predicted.seconds * 1e3:.3g}", f"{0.0300 / predicted.seconds:.2f}"]
    reference = next(line for line in text.splitlines() if "| reference |" in line)
    assert reference.rstrip().endswith("|  |  |")  # no model for the reference
    floor = next(line for line in text.splitlines() if line.startswith("| llama3-8b-N8192-bf16-frozen |"))
    assert f"{predicted.floor_seconds * 1e3:.3g}" in floor
    assert "H200 model ms" not in markdown([_result("token_logprobs", "chunked", 1.0, 1)], {}, {}, None)
