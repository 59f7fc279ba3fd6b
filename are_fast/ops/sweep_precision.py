"""Which precision the online sweep's block matmuls run in for a low-precision (bfloat16/float16) head.

Paths (``PATHS``):
- ``lowp``: the block matmuls take low-precision operands (the head as it is, or under autocast a copy of a
  float32 head cast once per pass); every statistic and accumulator stays float32 (``are_fast.ops.online``).
- ``float32``: the sweep runs on a float32 copy of the head (cast once per pass), as for a float32 head: on a
  CPU without low-precision matrix units its bf16 matmuls are emulated and slower than float32 ones.
- ``chunk``: the sweep is not used; the chunk driver (``are_fast.ops.chunked``) runs as for any other head.

Automatic choice (``choose``), per (device type, dtype), once per process: off CPU ``lowp``. On a CPU, ``lowp``
needs the ISA flags of units for that dtype (AMX-BF16 or AVX512-BF16 for bfloat16, AMX-FP16 or AVX512-FP16
for float16, read from /proc/cpuinfo, and oneDNN's own ``_is_mkldnn_bf16_supported``/``fp16``) and a
micro-measurement that finds a block matmul in that dtype faster than in float32 (a few ms, once); else
``float32``. The choice and its reason are logged once (logger ``are_fast.ops.sweep_precision``) and recorded.

``use_path(path)`` forces the path inside a block and yields the list of every ``SweepChoice`` made in it
(tests); the environment variable ARE_FAST_LOWP_SWEEP (auto, lowp, float32 or chunk) does the same.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .forcing import Forcing

logger = logging.getLogger(__name__)

PATHS = ("lowp", "float32", "chunk")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# The flags of units that run each dtype's matmuls natively, and what oneDNN reports about them.
_UNITS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
_ONEDNN_QUERY = {torch.bfloat16: ("onednn_bf16", "_is_mkldnn_bf16_supported"),
                 torch.float16: ("onednn_fp16", "_is_mkldnn_fp16_supported")}
# The low-precision path must beat float32 by this factor in the micro-measurement (noise margin).
_MIN_SPEEDUP = 1.2
_PROBE_SHAPE = (256, 1024, 2048)  # rows, hidden, vocabulary entries of one block product

_forcing = Forcing("path", "ARE_FAST_LOWP_SWEEP", PATHS)
_cache: dict = {}


@dataclass(frozen=True)
class SweepChoice:
    device_type: str
    dtype: torch.dtype
    path: str  # one of PATHS
    reason: str  # why: forced, the flags found, the measured speedup

    @property
    def operand_dtype(self) -> torch.dtype:
        """The dtype of the block matmuls' operands on this path (``chunk``: not the sweep's business)."""
        return self.dtype if self.path == "lowp" else torch.float32


def use_path(path: str | None = None):
    """Force the path of low-precision heads inside the block (None: automatic) and yield the list of every
    ``SweepChoice`` made inside it."""
    return _forcing.use(path)


def forced_path() -> str | None:
    """The path forced by ``use_path`` or ARE_FAST_LOWP_SWEEP, None when automatic."""
    return _forcing.forced()


def takes_sweep() -> bool:
    """Whether low-precision heads go to the online sweep at all (every path but a forced ``chunk``); no
    measurement, so shape-only (fake) implementations may ask."""
    return forced_path() != "chunk"


def choose(device: torch.device, dtype: torch.dtype) -> SweepChoice:
    """The path of a ``dtype`` (bfloat16/float16) head's sweep on ``device``: forced, else measured once."""
    if dtype not in LOW_PRECISION:
        raise ValueError(f"dtype: expected bfloat16 or float16, got {dtype}")
    forced = forced_path()
    choice = SweepChoice(device.type, dtype, forced, "forced") if forced is not None else automatic(device, dtype)
    _forcing.record(choice)
    return choice


def automatic(device: torch.device, dtype: torch.dtype) -> SweepChoice:
    """The machine's own answer for ``dtype`` matmuls on ``device``, ignoring any forcing: ``lowp`` where they
    run faster than float32 ones. Measured once per process and logged; the Encoder's CPU default reads it."""
    key = (device.type, dtype)
    if key not in _cache:
        _cache[key] = _automatic(device, dtype)
        logger.info("are_fast: %s heads on %s take the %s sweep (%s)", dtype, device.type, _cache[key].path,
                    _cache[key].reason)
    return _cache[key]


def cpu_units() -> dict:
    """The CPU's low-precision matrix units: {"flags": the relevant /proc/cpuinfo flags found, "capability":
    torch's ISA level, "onednn_bf16"/"onednn_fp16": oneDNN's own answer}. Empty flags where /proc/cpuinfo is
    unreadable (not Linux)."""
    wanted = {flag for flags in _UNITS.values() for flag in flags}
    found: set = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    found = wanted & set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    units = {"flags": sorted(found), "capability": torch.backends.cpu.get_cpu_capability()}
    for name, query in _ONEDNN_QUERY.values():
        probe = getattr(torch.ops.mkldnn, query, None)
        units[name] = bool(probe()) if probe is not None else False
    return units


def _automatic(device: torch.device, dtype: torch.dtype) -> SweepChoice:
    if device.type != "cpu":
        return SweepChoice(device.type, dtype, "lowp", f"{device.type} runs {dtype} matmuls natively")
    units = cpu_units()
    flags = [flag for flag in _UNITS[dtype] if flag in units["flags"]]
    onednn = units[_ONEDNN_QUERY[dtype][0]]
    if not flags or not onednn:
        return SweepChoice("cpu", dtype, "float32", f"no {dtype} matrix units (flags {units['flags'] or 'none'}, "
                                                    f"oneDNN support {onednn})")
    speedup = measure_speedup(dtype)
    path = "lowp" if speedup >= _MIN_SPEEDUP else "float32"
    return SweepChoice("cpu", dtype, path, f"flags {', '.join(flags)}; a block matmul measured {speedup:.2f}x "
                                           f"float32's speed")


def measure_speedup(dtype: torch.dtype, repeats: int = 5) -> float:
    """float32 time / ``dtype`` time of one sweep block product on this CPU: the best of ``repeats`` calls each,
    alternating (a shared machine's load falls on both alike), after a warm-up; about 0.1 s. Above 1: the
    low-precision matmul is faster."""
    rows, hidden, vocab = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    operands = [(torch.randn(rows, hidden, generator=generator), torch.randn(vocab, hidden, generator=generator))]
    operands.append(tuple(x.to(dtype) for x in operands[0]))
    outs = [torch.empty(rows, vocab, dtype=a.dtype) for a, _ in operands]
    best = [float("inf"), float("inf")]
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        for (a, b), out in zip(operands, outs):  # warm-up: oneDNN's kernel selection, AMX tile setup
            torch.mm(a, b.T, out=out)
        for _ in range(repeats):
            for slot, ((a, b), out) in enumerate(zip(operands, outs)):
                start = time.perf_counter()
                torch.mm(a, b.T, out=out)
                best[slot] = min(best[slot], time.perf_counter() - start)
    return best[0] / best[1]
