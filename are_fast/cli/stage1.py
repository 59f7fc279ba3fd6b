"""``are-fast stage1``: train the compressor to let the frozen base LM reconstruct each row's output."""
from __future__ import annotations

import os

from .options import (
    check_steps, data_options, eval_options, held_out, model_options, on_first_rank, pick, run_training_job,
    runtime_options, train_options,
)

NAME = "stage1"
HELP = "stage 1: information compression"
DESCRIPTION = "Train the compressor to let the frozen base LM reconstruct each row's output."
REQUIRED = ("data", "base_model", "output_dir")


def add_options(p) -> None:
    p.add_argument("--base-model", default=None, help="base causal LM directory: compressor start and frozen decoder (required)")
    data_options(p, False), model_options(p), train_options(p), eval_options(p, False)
    runtime_options(p, training=True)


def check(parser, args) -> None:
    check_steps(parser, args)


def run(args) -> int:
    return run_training_job(args, _train)


def _train(args) -> None:
    from ..training.jobs import ModelOptions, run_stage1
    from ..training.reporting import run_summary
    from ..training.trainer import TrainConfig

    run_stage1(args.data, args.base_model, pick(TrainConfig, args), pick(ModelOptions, args), args.instruction,
               args.max_bad_fraction, held_out(args))
    if on_first_rank():
        print(run_summary(f"are-fast {NAME}", args.output_dir, {"model": os.path.join(args.output_dir, "model")}))
