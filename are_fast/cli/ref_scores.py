"""``are-fast ref-scores``: the reference scores of stage-2 rows under the stage-1 model, saved by row id."""
from __future__ import annotations

import os
import time

from .options import POSITIVE_INT, data_options, model_options, on_first_rank, pick, run_training_job, runtime_options

NAME = "ref-scores"
HELP = "reference scores of stage-2 rows under the stage-1 model"
DESCRIPTION = "log p(pos|c(q)) and log p(neg_j|c(q)) per row, saved by row id (safetensors)."
REQUIRED = ("data", "model", "base_model", "output")


def add_options(p) -> None:
    p.add_argument("--model", default=None, help="stage-1 model directory (<output-dir>/model of stage1) (required)")
    p.add_argument("--base-model", default=None, help="base causal LM directory, the frozen decoder (required)")
    p.add_argument("--output", default=None, help="score file to write (.safetensors) (required)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                   help="rows per batch (default 32, not training's 8: no gradients are kept, so batches can be larger)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress (default: a bar on a terminal, else a line every --log-interval seconds)")
    data_options(p, True), model_options(p), runtime_options(p)


def run(args) -> int:
    return run_training_job(args, _score)


def _score(args) -> None:
    from ..training.jobs import ModelOptions, run_reference_scores

    start = time.perf_counter()
    ref_p, _, _ = run_reference_scores(args.data, args.model, args.base_model, args.output, args.num_negatives,
                                       pick(ModelOptions, args), args.batch_size, args.instruction, args.progress,
                                       args.max_bad_fraction, args.device, args.log_interval)
    if on_first_rank():
        seconds = time.perf_counter() - start
        print(f"are-fast {NAME}: done - {len(ref_p)} rows scored in {seconds:.0f} s "
              f"({len(ref_p) / seconds:.0f} rows/s)\n  {'scores':<15} {os.path.abspath(args.output)}")
