"""The ``are-fast`` command line (also ``python -m are_fast``): one subcommand per job."""
from __future__ import annotations

import argparse


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="run each fused op on random data; print time and peak memory against the reference"
    )
    demo.add_argument("--hidden-size", type=int, default=512, help="H, the LM head's hidden size (default 512)")
    demo.add_argument("--vocab", type=int, default=32000, help="V, the vocabulary size (default 32000)")
    demo.add_argument("--batch", type=int, default=4, help="sequences per stream (default 4)")
    demo.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    demo.add_argument("--negatives", type=int, default=2, help="negatives per query in alignment_loss (default 2)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    demo.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best is shown (default 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="are-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.hidden_size, args.vocab, args.batch, args.length, args.negatives, args.device, args.dtype,
                 args.repeats)
    return 0
