"""Process-time ratios of the CPU target ops on one thread, implementations alternating in one process: on a
shared machine the CPU time a call consumes moves far less with the load than its wall time does.

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_time --rounds 2 \\
        --impls online@bfloat16 online@float32 reference@bfloat16 torch-chunked@bfloat16

Each (op, implementation) is called once to warm up, then once per round, round-robin; a row reports the
median process time over rounds and its ratio to ``online@float32`` and to the naive formulas in its dtype.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from .cases import Case, clear_grads, make_inputs
from .impls import implementations, loss_fn
from .side_by_side import OPS, machine_lines, parse_impl, target_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--impls", nargs="+", default=["online@bfloat16", "online@float32", "reference@bfloat16"])
    parser.add_argument("--ops", nargs="+", default=list(OPS))
    args = parser.parse_args(argv)
    by_name = {i.name: i for i in implementations()}
    device = torch.device("cpu")
    runs = []  # (case, spec, inputs, loss)
    for case in target_cases(args.tokens, ("cpu-target",), trainable=False):
        if case.op not in args.ops:
            continue
        for spec in args.impls:
            name, dtype = parse_impl(spec)
            if case.op not in by_name[name].ops:
                continue
            cast = Case(case.op, dataclasses.replace(case.shape, dtype=dtype))
            runs.append((case, spec, make_inputs(cast, device), loss_fn(by_name[name], case.op, device)))
    seconds: dict = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for case, spec, x, loss in runs:
            clear_grads(x)
            start = time.process_time()
            loss(x).backward()
            if round_index:
                seconds.setdefault((case.op, spec), []).append(time.process_time() - start)
    lines = [f"- {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; process time, "
             f"{args.rounds} rounds after a warm-up, implementations alternating in one process", *machine_lines(), "",
             "| op | impl | median CPU s | x ours fp32 | x naive (same dtype) |", "|---|---|---|---|---|"]
    for (op, spec), values in seconds.items():
        median = statistics.median(values)
        ours = seconds.get((op, "online@float32"))
        naive = seconds.get((op, f"reference@{str(parse_impl(spec)[1]).removeprefix('torch.')}"))
        ratio = [f"{median / statistics.median(v):.2f}" if v else "" for v in (ours, naive)]
        lines.append(f"| {op} | {spec} | {median:.2f} | {ratio[0]} | {ratio[1]} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
