"""The CPU target table of the op layer: are_fast against PyTorch's chunked linear cross-entropy and the naive
formulas, time and peak extra RSS, measured side by side.

    python -m benchmarks.side_by_side --rounds 3 [--impls online chunked torch-chunked reference] [--out table.md]

Every (case, implementation) runs in a fresh process (``benchmarks.rss.probe``: the first forward+backward
gives the peak extra RSS, then ``--calls`` timed calls); the rounds go round-robin over all cases and
implementations, so a shared machine's load falls on all of them alike. A row reports the median over rounds
of each process's median time, the spread (max / min over rounds) and the largest peak RSS seen.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess

import torch

from .cases import HEADS, Case, Shape
from .impls import implementations
from .rss import probe

OPS = ("token_logprobs", "compression_loss", "sequence_logprobs", "conditional_kl")
SEQ = 256


def target_cases(tokens: int = 4096) -> list[Case]:
    """The issue's CPU targets: frozen head at H=512 and H=1024 for every op; a trainable head at H=1024
    (compression_loss: the one-pass path; per-row ops with a trainable head recompute, see RESULTS.md)."""
    cases = [Case(op, Shape(HEADS[head], tokens, torch.float32, False, SEQ)) for head in ("issue2", "cpu-target") for op in OPS]
    trainable = Shape(HEADS["cpu-target"], tokens, torch.float32, True, SEQ)
    return cases + [Case("compression_loss", trainable)]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
        return sha.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run(cases: list[Case], impl_names: list[str], rounds: int, calls: int) -> dict:
    """(case id, impl) -> {"seconds": [per round], "rss": [per round]}."""
    by_name = {i.name: i for i in implementations()}
    device = torch.device("cpu")
    results: dict = {}
    for round_index in range(rounds):
        for case in cases:
            for name in impl_names:
                impl = by_name[name]
                if case.op not in impl.ops or impl.skip_reason(device):
                    continue
                got = probe(case, name, rounds=calls)
                entry = results.setdefault((case.id, name), {"case": case, "seconds": [], "rss": []})
                entry["seconds"].append(got["median"])
                entry["rss"].append(got["peak_rss_bytes"])
                print(f"round {round_index + 1}: {case.id} {name}: {got['median'] * 1e3:.0f} ms, "
                      f"{got['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
    return results


def table(results: dict, impl_names: list[str]) -> list[str]:
    naive, peer = "reference", "torch-chunked"
    lines = ["| op | shape | impl | median ms | spread | x naive | x torch-chunked | peak extra RSS MiB | RSS x torch-chunked |",
             "|---|---|---|---|---|---|---|---|---|"]
    case_ids = list(dict.fromkeys(key[0] for key in results))
    for case_id in case_ids:
        rows = {name: results[(case_id, name)] for name in impl_names if (case_id, name) in results}
        median = {name: statistics.median(r["seconds"]) for name, r in rows.items()}
        rss = {name: max(r["rss"]) for name, r in rows.items()}
        for name, r in rows.items():
            case = r["case"]

            def ratio(values, other):
                return f"{values[name] / values[other]:.2f}" if other in values and values[other] else ""

            spread = max(r["seconds"]) / min(r["seconds"])
            lines.append(
                f"| {case.op} | {case.shape.id} | {name} | {median[name] * 1e3:.0f} | {spread:.2f} | "
                f"{ratio(median, naive)} | {ratio(median, peer)} | {rss[name] / 2**20:.1f} | {ratio(rss, peer)} |"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1,
                        help="timed calls per process after the RSS call (0: time the RSS call itself)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--impls", nargs="+", default=["online", "chunked", "torch-chunked", "reference"])
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cases = [c for c in target_cases(args.tokens) if args.ops is None or c.op in args.ops]
    results = run(cases, args.impls, args.rounds, args.calls)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = [f"- date: {when}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; commit {_commit()}",
            f"- {args.rounds} rounds x {args.calls} timed call(s) per process, round-robin; spread = max / min over rounds", ""]
    text = "\n".join(head + table(results, args.impls))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
