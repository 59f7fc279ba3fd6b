"""benchmarks.report on made-up results: ratios, verdicts (a missed target must say so) and the files it writes."""
from __future__ import annotations

import json

import pytest

from .report import main, markdown

MIB = 2**20


def _result(op, impl, seconds, peak, head="cpu-target", tokens=4096, dtype="float32", kind=None):
    shape = f"{head}-N{tokens}-{'fp32' if dtype == 'float32' else 'bf16'}-frozen"
    kind = kind or ("peer" if impl.startswith(("liger", "cce")) else "backend")
    info = {"suite": "ops", "op": op, "impl": impl, "kind": kind, "shape": shape, "head": head, "tokens": tokens,
            "dtype": dtype, "mode": "frozen", "peak_extra_bytes": peak}
    return {"name": f"test_op[{op}-{shape}-{impl}]", "stats": {"median": seconds}, "extra_info": info}


def _cpu_results(chunked_seconds, chunked_peak):
    return [
        _result("token_logprobs", "reference", 2.0, 1000 * MIB),
        _result("token_logprobs", "chunked", chunked_seconds, chunked_peak),
        _result("token_logprobs", "cce-compile", 4.0, 900 * MIB),
        _result("floor", "floor", 1.6, 500 * MIB, kind="floor"),
    ]


def _line(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_cpu_target_missed_says_by_how_much():
    text = markdown(_cpu_results(2.4, 200 * MIB), {}, {}, None)
    verdict = _line(text, "- token_logprobs:")
    assert "1.20x -> **MISSED** (20% slower)" in verdict
    assert "0.200x -> **MISSED**" in verdict  # 200 MiB is more than 1/10 of 1000 MiB
    row = _line(text, "| token_logprobs | cpu-target-N4096-fp32-frozen | chunked |")
    assert row.split(" | ")[3:7] == ["2400", "1.20", "0.60", "1.50"]  # ms, x ref, x cce-compile, x floor


def test_cpu_target_met():
    verdict = _line(markdown(_cpu_results(1.9, 50 * MIB), {}, {}, None), "- token_logprobs:")
    assert "0.95x -> met" in verdict and "0.050x -> met" in verdict and "MISSED" not in verdict


def test_gpu_target_each_condition():
    gpu = dict(head="llama3-8b", tokens=16384, dtype="bfloat16")
    results = [
        _result("token_logprobs", "reference", 0.200, 40000 * MIB, **gpu),
        _result("token_logprobs", "triton", 0.050, 400 * MIB, **gpu),
        _result("token_logprobs", "liger", 0.045, 6000 * MIB, **gpu),
        _result("token_logprobs", "cce", 0.060, 1200 * MIB, **gpu),
        _result("floor", "floor", 0.044, 0, kind="floor", **gpu),
    ]
    verdict = _line(markdown(results, {}, {}, None), "- token_logprobs / triton")
    assert "1.14x floor -> met" in verdict
    assert "1.11x liger -> **MISSED**" in verdict and "0.83x cce -> met" in verdict
    assert "memory 0.0100x reference -> met" in verdict


def _write_json(tmp_path):
    source = tmp_path / "bench.json"
    header = {"machine_info": {"are_fast": {"cpu_model": "Test CPU", "cpu_cores": 2, "torch": "2.13.0"}},
              "commit_info": {"id": "0123456789abcdef", "dirty": True}, "datetime": "2030-01-01T00:00:00"}
    source.write_text(json.dumps(dict(header, benchmarks=_cpu_results(1.9, 50 * MIB))))
    return source


def test_main_writes_markdown(tmp_path):
    main([str(_write_json(tmp_path)), "--out", str(tmp_path / "r.md")])
    text = (tmp_path / "r.md").read_text()
    assert "Test CPU, 2 cores" in text and "0123456789ab (dirty)" in text and "2030-01-01" in text


def test_main_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (pip install matplotlib)")
    main([str(_write_json(tmp_path)), "--out", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
