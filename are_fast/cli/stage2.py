"""``are-fast stage2``: train the stage-1 compressor with the alignment loss and the reference scores."""
from __future__ import annotations

import argparse
import os

from ..ops.registry import DISTANCES
from .options import (
    POSITIVE, check_steps, data_options, eval_options, held_out, model_options, on_first_rank, pick,
    run_training_job, runtime_options, train_options,
)

NAME = "stage2"
HELP = "stage 2: conditional distribution alignment"
DESCRIPTION = "Train the stage-1 compressor with the alignment loss and the reference scores."
REQUIRED = ("data", "scores", "model", "base_model", "output_dir")


def _ref_sign(text: str) -> float:
    """--ref-sign: +1 or -1 (1, 1.0, -1.0 too), as a float."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, -1.0):
        raise argparse.ArgumentTypeError(f"expected +1 or -1, got {text!r}")
    return value


def add_options(p) -> None:
    p.add_argument("--scores", default=None, help="reference-score file from ref-scores (required)")
    p.add_argument("--model", default=None, help="stage-1 model directory, the compressor's start (required)")
    p.add_argument("--base-model", default=None, help="base causal LM directory, the frozen decoder (required)")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="sigmoid scale of the alignment loss (default 0.1)")
    p.add_argument("--tau", type=POSITIVE, default=0.1, help="temperature of the alignment loss (default 0.1)")
    p.add_argument("--ref-sign", type=_ref_sign, default=1.0, metavar="{+1,-1}",
                   help="+1 adds the reference margin as released (default); -1 subtracts it (DPO-consistent)")
    p.add_argument("--distance", default="logprob", choices=["logprob", *DISTANCES],
                   help="logprob: |log p(pos|c(q)) - log p(pos|c(pos))| as released (default); else a pair op's "
                        f"divergence of the two streams ({', '.join(f'{k}: {v}' for k, v in DISTANCES.items())})")
    data_options(p, True), model_options(p), train_options(p), eval_options(p, True)
    runtime_options(p, training=True)


def check(parser, args) -> None:
    check_steps(parser, args)


def run(args) -> int:
    return run_training_job(args, _train)


def _train(args) -> None:
    from ..training.jobs import ModelOptions, run_stage2
    from ..training.reporting import run_summary
    from ..training.trainer import TrainConfig

    run_stage2(args.data, args.scores, args.model, args.base_model, pick(TrainConfig, args), pick(ModelOptions, args),
               args.num_negatives, args.beta, args.tau, args.ref_sign, args.distance, args.instruction,
               args.max_bad_fraction, held_out(args))
    if on_first_rank():
        print(run_summary(f"are-fast {NAME}", args.output_dir, {"model": os.path.join(args.output_dir, "model")},
                          {"objective": objective_line(args)}))


def objective_line(args: argparse.Namespace) -> str:
    """Stage 2's loss settings as its summary shows them (the reference sign as +1 or -1, as --ref-sign takes it)."""
    return (f"beta {args.beta:g}, tau {args.tau:g}, ref-sign {args.ref_sign:+.0f}, distance {args.distance}")
