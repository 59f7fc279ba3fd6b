"""benchmarks.gpu_model against figures computed by hand, and its columns in benchmarks.report."""
from __future__ import annotations

import pytest

from . import gpu_model
from .report import markdown, predicted_seconds
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


def test_bytes_count_every_chunk_reading_the_head():
    p = gpu_model.predict(trainable=False, **SHAPE)
    head = 2048 * 256 * 2  # the bf16 head, read by each of the 2 chunks' logits and hidden-gradient matmuls
    logits = 512 * 256 * 2 + head + 512 * 2048 * 4  # per chunk: h rows, head, float32 logits written
    hidden = 512 * 2048 * 2 + head + 512 * 256 * 2  # per chunk: bf16 gradient rows, head, dh rows written
    assert p.head_reads == 4
    assert p.bytes == 2 * logits + 2 * hidden + 1024 * 2048 * 10 + 1024 * 256 * 4  # + epilogue + rescale
    assert p.bytes == 39845888
    one_chunk = gpu_model.predict(trainable=False, **dict(SHAPE, chunk_rows=1024))
    assert one_chunk.head_reads == 2 and p.bytes - one_chunk.bytes == 2 * head  # each extra chunk: 2 more reads
    assert gpu_model.predict(trainable=True, **SHAPE).head_reads == 6  # forward logits, recomputed logits, dh


def test_rates_by_gpu_name():
    assert gpu_model.rates_for("NVIDIA H200") is gpu_model.H200
    assert gpu_model.rates_for("NVIDIA H100 80GB HBM3") is gpu_model.H100_SXM
    assert gpu_model.rates_for("NVIDIA H100 PCIe") is None  # other memory, other clocks: no model
    assert gpu_model.rates_for("NVIDIA A100-SXM4-80GB") is None and gpu_model.rates_for(None) is None
    assert (gpu_model.H100_SXM.flops, gpu_model.H100_SXM.bandwidth) == (790e12, 3.0e12)
    assert (gpu_model.H200.flops, gpu_model.H200.bandwidth) == (790e12, 4.3e12)


def test_achieved_rate_of_a_floor():
    # frozen floor: 2 products of 2 * 1024 * 2048 * 256 flops in 2 ms -> 1.073741824e12 FLOP/s
    assert gpu_model.achieved_flops(1024, 256, 2048, False, 2e-3) == pytest.approx(2 * 2 * 1024 * 2048 * 256 / 2e-3)
    assert gpu_model.achieved_flops(1024, 256, 2048, True, 3e-3) == pytest.approx(3 * 2 * 1024 * 2048 * 256 / 3e-3)


def _gpu_rows(gpu_floor_seconds=0.0240):
    gpu = dict(head="llama3-8b", tokens=8192, dtype="bfloat16")
    rows = [
        _result("token_logprobs", "triton", 0.0300, 400 * 2**20, **gpu),
        _result("token_logprobs", "reference", 0.0900, 9000 * 2**20, **gpu),
        _result("token_logprobs", "triton", 0.0290, 1600 * 2**20, **gpu),
        _result("floor", "floor", gpu_floor_seconds, 0, kind="floor", **gpu),
    ]
    for row in rows:
        row["extra_info"].update(device="cuda", hidden=4096, vocab=128256, chunk_rows=512)
    rows[2]["extra_info"].update(chunk_bytes=2**30, chunk_rows=2080)  # the same backend with 1 GiB chunks
    return rows


def _cells(text, start):
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_prints_model_floor_and_measurement_side_by_side():
    h100 = {"are_fast": {"gpu": "NVIDIA H100 80GB HBM3"}}
    text = markdown(_gpu_rows(), h100, {}, None)
    assert "- model: benchmarks.gpu_model at H100 SXM rates (790 TFLOP/s bf16, 3.0 TB/s)" in text
    rates = gpu_model.H100_SXM
    achieved = gpu_model.achieved_flops(8192, 4096, 128256, False, 0.0240)  # about 717 TFLOP/s
    model = gpu_model.predict(8192, 4096, 128256, False, 512, flops_rate=rates.flops, bandwidth=rates.bandwidth)
    at_floor = gpu_model.predict(8192, 4096, 128256, False, 512, flops_rate=achieved, bandwidth=rates.bandwidth)
    triton = _cells(text, "| token_logprobs | llama3-8b-N8192-bf16-frozen | triton |")
    expected = [f"{model.seconds * 1e3:.3g}", f"{0.0300 / model.seconds:.2f}", f"{at_floor.seconds * 1e3:.3g}"]
    assert triton[-3:] == expected
    assert triton[5] == f"{0.0300 / 0.0240:.2f}"  # x floor, measured
    gib = _cells(text, "| token_logprobs | llama3-8b-N8192-bf16-frozen | triton @1024MiB |")
    model_gib = gpu_model.predict(8192, 4096, 128256, False, 2080, flops_rate=rates.flops, bandwidth=rates.bandwidth)
    assert gib[3] == "29" and gib[-3] == f"{model_gib.seconds * 1e3:.3g}"
    assert _cells(text, "| token_logprobs | llama3-8b-N8192-bf16-frozen | reference |")[-3:] == ["", "", ""]
    floor = _cells(text, "| llama3-8b-N8192-bf16-frozen |")
    assert floor == ["llama3-8b-N8192-bf16-frozen", "24", f"{model.floor_seconds * 1e3:.3g}",
                     f"{0.0240 / model.floor_seconds:.2f}", f"{achieved / 1e12:.0f}"]


def test_the_model_takes_each_rows_own_chunk_rows():
    """A trainable head's time depends on the chunk rows (the accumulator is read and written per chunk)."""
    rates = gpu_model.H100_SXM
    row = dict(device="cuda", dtype="bfloat16", impl="triton", kind="backend", tokens=16384, hidden=4096,
               vocab=128256, mode="trainable")
    by_rows = {rows: gpu_model.predict(16384, 4096, 128256, True, rows, flops_rate=rates.flops,
                                       bandwidth=rates.bandwidth).seconds for rows in (512, 2080)}
    assert by_rows[2080] < 0.9 * by_rows[512]
    for rows, seconds in by_rows.items():
        assert predicted_seconds(dict(row, chunk_rows=rows), rates) == pytest.approx(seconds)


def test_report_without_rates_for_the_card_says_so():
    text = markdown(_gpu_rows(), {"are_fast": {"gpu": "NVIDIA A100-SXM4-80GB"}}, {}, None)
    assert "- model: no rates for NVIDIA A100-SXM4-80GB" in text and "model ms" not in text
    assert "model ms" not in markdown(_gpu_rows(), {}, {}, None)  # no GPU named: no model
    cpu_rows = [_result("token_logprobs", "chunked", 1.0, 1)]
    assert "model ms" not in markdown(cpu_rows, {"are_fast": {"gpu": "NVIDIA H200"}}, {}, None)
