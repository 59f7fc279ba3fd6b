"""The ``are-fast`` command line (also ``python -m are_fast``): one subcommand per job.

One module per job; every job takes its options from flags or a ``--config`` file (JSON or YAML, keys as the option names), checked
alike; errors print one line and exit 2 (``are_fast.runtime``)."""
from __future__ import annotations

import argparse
import sys

from . import demo, encode, main_job, ref_scores, stage1, stage2
from .options import CONFIG_HELP, OneLineParser, parse_with_config

JOBS = {job.NAME: job for job in (demo, encode, stage1, ref_scores, stage2, main_job)}


def build_parser() -> argparse.ArgumentParser:
    """The ``are-fast`` parser; ``parser.job_parsers`` maps each subcommand to its own parser."""
    parser = OneLineParser(prog="are-fast", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    parser.job_parsers = {}
    for name, job in JOBS.items():
        p = subparsers.add_parser(name, help=job.HELP, description=job.DESCRIPTION)
        p.add_argument("--config", default=None, help=CONFIG_HELP)
        job.add_options(p)
        parser.job_parsers[name] = p
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line: the command, then its options (a ``--config`` file's below the flags)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    command = parser.parse_args(argv).command  # --help, a bad command or a bad option exit here
    job, job_parser = JOBS[command], parser.job_parsers[command]
    args = parse_with_config(job_parser, argv[argv.index(command) + 1:], job.REQUIRED)
    args.command = command
    if hasattr(job, "check"):
        job.check(job_parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return JOBS[args.command].run(args)
