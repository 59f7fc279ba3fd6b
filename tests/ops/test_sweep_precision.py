"""The dispatch of low-precision heads' sweeps (``are_fast.ops.sweep_precision``): from the CPU's ISA flags and
a one-time micro-measurement, forced by ``use_path`` or ARE_FAST_LOWP_SWEEP, logged and recorded."""
import logging

import pytest
import torch

from are_fast.ops import sweep_precision

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process cache and no forcing from the environment; counts the measurements."""
    monkeypatch.setattr(sweep_precision, "_cache", {})
    monkeypatch.delenv("ARE_FAST_LOWP_SWEEP", raising=False)
    calls = []

    def machine(flags, speedup=3.0, onednn=True):
        units = {"flags": flags, "capability": "AVX512", "onednn_bf16": onednn, "onednn_fp16": onednn}
        monkeypatch.setattr(sweep_precision, "cpu_units", lambda: units)

        def measured(dtype):
            calls.append(dtype)
            return speedup

        monkeypatch.setattr(sweep_precision, "measure_speedup", measured)

    return machine, calls


def test_no_bf16_units_runs_float32_without_measuring(fresh, caplog):
    machine, calls = fresh
    machine(flags=[])
    with caplog.at_level(logging.INFO, logger="are_fast.ops.sweep_precision"), sweep_precision.use_path() as made:
        choice = sweep_precision.choose(CPU, torch.bfloat16)
    assert choice.path == "float32" and choice.operand_dtype == torch.float32 and not calls
    assert made == [choice] and "no torch.bfloat16 matrix units" in choice.reason
    assert "take the float32 sweep" in caplog.text


def test_units_that_measure_faster_take_lowp_once_per_process(fresh):
    machine, calls = fresh
    machine(flags=["amx_bf16", "avx512_bf16"], speedup=3.1)
    first = sweep_precision.choose(CPU, torch.bfloat16)
    second = sweep_precision.choose(CPU, torch.bfloat16)
    assert first.path == second.path == "lowp" and first.operand_dtype == torch.bfloat16
    assert calls == [torch.bfloat16], "measured more than once"
    assert "amx_bf16" in first.reason and "3.10x" in first.reason


def test_units_that_measure_slower_run_float32(fresh):
    machine, calls = fresh
    machine(flags=["avx512_bf16"], speedup=0.9)
    assert sweep_precision.choose(CPU, torch.bfloat16).path == "float32" and calls


def test_flags_without_onednn_support_run_float32(fresh):
    machine, calls = fresh
    machine(flags=["avx512_bf16"], onednn=False)
    assert sweep_precision.choose(CPU, torch.bfloat16).path == "float32" and not calls


def test_fp16_needs_fp16_units(fresh):
    machine, _ = fresh
    machine(flags=["amx_bf16", "avx512_bf16"])
    assert sweep_precision.choose(CPU, torch.float16).path == "float32"
    assert sweep_precision.choose(CPU, torch.bfloat16).path == "lowp"


def test_other_devices_take_lowp(fresh):
    assert sweep_precision.choose(torch.device("cuda"), torch.bfloat16).path == "lowp"


def test_forcing(fresh, monkeypatch):
    machine, calls = fresh
    machine(flags=[])
    with sweep_precision.use_path("lowp"):
        assert sweep_precision.choose(CPU, torch.bfloat16).path == "lowp"
    monkeypatch.setenv("ARE_FAST_LOWP_SWEEP", "chunk")
    assert not sweep_precision.takes_sweep()
    monkeypatch.setenv("ARE_FAST_LOWP_SWEEP", "bf16")
    with pytest.raises(ValueError, match="ARE_FAST_LOWP_SWEEP: expected auto or one of lowp, float32, chunk"):
        sweep_precision.choose(CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="path: expected None or one of"):
        with sweep_precision.use_path("fast"):
            pass
    with pytest.raises(ValueError, match="dtype: expected bfloat16 or float16"):
        sweep_precision.choose(CPU, torch.float32)
    assert not calls


def test_this_machine_is_described():
    """The real probes run: flags are a subset of the known ones, and the measurement is a positive ratio."""
    units = sweep_precision.cpu_units()
    assert set(units["flags"]) <= {"amx_bf16", "avx512_bf16", "amx_fp16", "avx512_fp16"}
    assert sweep_precision.measure_speedup(torch.bfloat16, repeats=1) > 0
