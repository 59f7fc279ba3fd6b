"""The CPU stage-2 step (ours, default route) in float32 and in bf16, alternating in one process, each step
between two probes of the matmul rates: on a shared host the bf16 matrix units run at half rate for minutes at
a time (a neighbour on the same physical core), which moves the bf16 / float32 ratio by 30% between runs of
``test_bench_stage2.py``. A round is "full rate" when every probe around its two steps found the bf16 rate at
least ``--full-rate`` of the best bf16 rate seen in the run; the ratio is given over those rounds and over all.

    OMP_NUM_THREADS=1 python -m benchmarks.stage2_dtypes --rounds 12

Process time per step (one thread is steadiest); the model, rows and batch are test_bench_stage2.py's
(``benchmarks.stage2_setup``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from are_fast.model import Stage2Model
from are_fast.model.layout import default_route

from .conftest import cpu_matmul_rates
from .side_by_side import _commit, machine_lines
from .stage2_setup import CONFIGS, bench_items, bench_rows, load_pair, write_model

DTYPES = (torch.float32, torch.bfloat16)


def stage2_steps(negatives: int, config: str = "cpu") -> dict:
    """dtype -> a function running one stage-2 step (forward, backward, gradients cleared) on the CPU, for the
    model and batch size of test_bench_stage2's ``config`` ("cpu"; "smoke": tiny, toy rows)."""
    device = torch.device("cpu")
    steps = {}
    with tempfile.TemporaryDirectory() as path:
        write_model(path, config)
        for dtype in DTYPES:
            comp, dec = load_pair(path, dtype, device)
            comp.route = dec.route = default_route(device)
            rows, _ = bench_rows(CONFIGS[config][1], negatives, smoke=config == "smoke")
            model = Stage2Model(comp, dec)
            batch = model.collate(bench_items(rows, negatives, comp, dec))

            def step(model=model, batch=batch, comp=comp):
                loss, _ = model(batch)
                loss.backward()
                comp.zero_grad(set_to_none=True)

            step()  # warm-up: the attention and sweep choices are measured on first use
            steps[dtype] = step
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--full-rate", type=float, default=0.8)
    parser.add_argument("--config", choices=("cpu", "smoke"), default="cpu")
    args = parser.parse_args(argv)
    steps = stage2_steps(args.negatives, args.config)
    rounds = []  # (seconds per dtype, bf16 rates of the probes around the round)
    for _ in range(args.rounds):
        seconds, rates = {}, [cpu_matmul_rates()["bfloat16"]]
        for dtype, step in steps.items():
            start = time.process_time()
            step()
            seconds[dtype] = time.process_time() - start
            rates.append(cpu_matmul_rates()["bfloat16"])
        rounds.append((seconds, rates))
        print(f"float32 {seconds[torch.float32]:.3f} s, bf16 {seconds[torch.bfloat16]:.3f} s, ratio "
              f"{seconds[torch.bfloat16] / seconds[torch.float32]:.3f}; bf16 GFLOP/s around: {rates}", flush=True)
    best = max(rate for _, rates in rounds for rate in rates)
    full = [s for s, rates in rounds if min(rates) >= args.full_rate * best]
    print("\n".join(machine_lines()) + f"\n- commit {_commit()}; best bf16 probe {best} GFLOP/s")
    for name, chosen in (("full-rate rounds", full), ("all rounds", [s for s, _ in rounds])):
        if not chosen:
            print(f"{name}: none")
            continue
        medians = {dtype: statistics.median(s[dtype] for s in chosen) for dtype in DTYPES}
        print(f"{name} ({len(chosen)}): float32 median {medians[torch.float32]:.3f} s, bf16 median "
              f"{medians[torch.bfloat16]:.3f} s, bf16 / float32 {medians[torch.bfloat16] / medians[torch.float32]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
