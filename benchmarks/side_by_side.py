"""The CPU target table of the op layer: are_fast against PyTorch's chunked linear cross-entropy and the naive
formulas, time and peak extra RSS, measured side by side.

    python -m benchmarks.side_by_side --rounds 3 [--impls online chunked torch-chunked reference] [--out table.md]
    python -m benchmarks.side_by_side --rounds 1 --heads cpu-target \
        --impls online@bfloat16 online@float32 reference@bfloat16 torch-chunked@bfloat16      # the bf16 table

An implementation may name the dtype of its inputs (``name@bfloat16``; default float32), so a table can put
bf16 and float32 runs of one op side by side; "x ours fp32" is each row's time over ``online@float32``'s.
Every (case, implementation) runs in a fresh process (``benchmarks.rss.probe``: the first forward+backward
gives the peak extra RSS, then ``--calls`` timed calls); the rounds go round-robin over all cases and
implementations, so a shared machine's load falls on all of them alike. A row reports the median over rounds
of each process's median time, the spread (max / min over rounds) and the largest peak RSS seen.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import subprocess

import torch

from are_fast.ops.registry import OPS_TABLE
from are_fast.ops.sweep_precision import cpu_units

from .cases import HEADS, Case, Shape
from .conftest import _cpu_model
from .impls import implementations
from .rss import probe

OPS = tuple(OPS_TABLE)  # every op of the registry
SEQ = 256


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def target_cases(tokens: int = 4096, heads=("issue2", "cpu-target"), trainable: bool = True) -> list[Case]:
    """The issue's CPU targets (float32 shapes; an implementation's ``@dtype`` recasts them): frozen head at
    H=512 and H=1024 for every op; a trainable head at H=1024 (compression_loss: the one-pass path; per-row
    ops with a trainable head recompute, see RESULTS.md)."""
    cases = [Case(op, Shape(HEADS[head], tokens, torch.float32, False, SEQ)) for head in heads for op in OPS]
    if trainable and "cpu-target" in heads:
        cases.append(Case("compression_loss", Shape(HEADS["cpu-target"], tokens, torch.float32, True, SEQ)))
    return cases


def parse_impl(spec: str) -> tuple[str, torch.dtype]:
    """"online@bfloat16" -> ("online", torch.bfloat16); a bare name is float32."""
    name, _, dtype = spec.partition("@")
    if dtype and dtype not in _DTYPES:
        raise SystemExit(f"--impls: {spec!r}: expected a dtype among {', '.join(_DTYPES)} after '@'")
    return name, _DTYPES[dtype or "float32"]


def _label(spec: str) -> str:
    name, dtype = parse_impl(spec)
    return f"{name} {_SHORT[dtype]}"


def machine_lines() -> list[str]:
    """The CPU model, its low-precision ISA flags and the load: recorded with every table."""
    units = cpu_units()
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    flags = ", ".join(units["flags"]) or "none"
    return [f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; bf16/fp16 ISA flags: {flags}; "
            f"torch CPU capability {units['capability']}; oneDNN bf16 {units['onednn_bf16']}; load average {load}"]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
        return sha.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run(cases: list[Case], impl_specs: list[str], rounds: int, calls: int) -> dict:
    """(case id, impl spec) -> {"seconds": [per round], "rss": [per round]}; case ids are float32 shapes."""
    by_name = {i.name: i for i in implementations()}
    device = torch.device("cpu")
    results: dict = {}
    for round_index in range(rounds):
        for case in cases:
            for spec in impl_specs:
                name, dtype = parse_impl(spec)
                impl = by_name[name]
                if case.op not in impl.ops or impl.skip_reason(device):
                    continue
                cast = Case(case.op, dataclasses.replace(case.shape, dtype=dtype))
                got = probe(cast, name, rounds=calls)
                entry = results.setdefault((case.id, spec), {"case": case, "seconds": [], "rss": []})
                entry["seconds"].append(got["median"])
                entry["rss"].append(got["peak_rss_bytes"])
                print(f"round {round_index + 1}: {cast.id} {name}: {got['median'] * 1e3:.0f} ms, "
                      f"{got['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
    return results


def table(results: dict, impl_specs: list[str]) -> list[str]:
    """Rows per case and implementation; "x naive" and "x torch-chunked" compare with the reference and
    torch-chunked runs in the row's own dtype, "x ours fp32" with online@float32."""
    lines = ["| op | shape | impl | median ms | spread | x ours fp32 | x naive | x torch-chunked | peak extra RSS MiB "
             "| RSS x torch-chunked |", "|---|---|---|---|---|---|---|---|---|---|"]
    case_ids = list(dict.fromkeys(key[0] for key in results))
    for case_id in case_ids:
        rows = {spec: results[(case_id, spec)] for spec in impl_specs if (case_id, spec) in results}
        median = {spec: statistics.median(r["seconds"]) for spec, r in rows.items()}
        rss = {spec: max(r["rss"]) for spec, r in rows.items()}
        for spec, r in rows.items():
            case, dtype = r["case"], parse_impl(spec)[1]
            same = {name: next((s for s in rows if parse_impl(s) == (name, dtype)), None)
                    for name in ("reference", "torch-chunked")}
            ours = next((s for s in rows if parse_impl(s) == ("online", torch.float32)), None)

            def ratio(values, other):
                return f"{values[spec] / values[other]:.2f}" if other in values and values[other] else ""

            spread = max(r["seconds"]) / min(r["seconds"])
            shape = case.shape.id.replace("-fp32-", f"-{_SHORT[dtype]}-")
            lines.append(
                f"| {case.op} | {shape} | {_label(spec)} | {median[spec] * 1e3:.0f} | {spread:.2f} | "
                f"{ratio(median, ours)} | {ratio(median, same['reference'])} | "
                f"{ratio(median, same['torch-chunked'])} | "
                f"{rss[spec] / 2**20:.1f} | {ratio(rss, same['torch-chunked'])} |"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1,
                        help="timed calls per process after the RSS call (0: time the RSS call itself)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--impls", nargs="+", default=["online", "chunked", "torch-chunked", "reference"],
                        help="implementations, each optionally NAME@DTYPE (bfloat16, float16; default float32)")
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops")
    parser.add_argument("--heads", nargs="+", default=["issue2", "cpu-target"], choices=["issue2", "cpu-target"])
    parser.add_argument("--no-trainable", dest="trainable", action="store_false", help="frozen heads only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for spec in args.impls:
        parse_impl(spec)
    cases = [c for c in target_cases(args.tokens, args.heads, args.trainable) if args.ops is None or c.op in args.ops]
    results = run(cases, args.impls, args.rounds, args.calls)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = [f"- date: {when}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; commit {_commit()}",
            *machine_lines(),
            f"- {args.rounds} rounds x {args.calls} timed call(s) per process, round-robin; "
            "spread = max / min over rounds", ""]
    text = "\n".join(head + table(results, args.impls))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
