"""``are-fast main``: the main job on the embedded default (``are_fast.toy``), both stages end to end."""
from __future__ import annotations

from .options import COUNT, POSITIVE, POSITIVE_INT, pick, run_training_job, runtime_options

NAME = "main"
HELP = "the main job on the embedded default (tiny Llama, ByT5 bytes, toy data)"
DESCRIPTION = ("Pretrain a tiny Llama on generated restatements, then stage 1 -> reference scores -> stage 2, with "
               "held-out triplet accuracy through both. No download; about 2.5 minutes on 2 CPU cores.")
REQUIRED = ()


def add_options(p) -> None:
    from ..toy.job import MainJobConfig

    d = MainJobConfig()
    p.add_argument("--output-dir", default=d.output_dir,
                   help=f"where everything goes (default {d.output_dir}: the embedded default runs without options)")
    for name, help_text in (("hidden_size", "hidden size of the tiny Llama"), ("layers", "its layers"),
                            ("num_embed_tokens", "k compressed tokens (stage1's default for a base LM; the other "
                             "jobs read k from the model)"),
                            ("stage1_rows", "generated stage-1 rows"),
                            ("stage2_rows", "generated stage-2 rows"), ("eval_rows", "held-out evaluation rows"),
                            ("num_negatives", "negatives per stage-2 row (stage2: 1; the generated rows have a hard "
                             "negative per changed slot, and two make the accuracy table)"), ("pretrain_steps", "LM pretraining steps"),
                            ("stage1_steps", "stage-1 steps"), ("stage2_steps", "stage-2 steps"),
                            ("eval_steps", "held-out evaluation every N steps of stages 1 and 2 (stage1/stage2: 0, "
                             "before and after only; here the accuracy table needs the curve)"),
                            ("batch_size", "rows per batch (stage1/stage2: 8; the tiny model's batches are cheap)"),
                            ("seed", "seed")):
        kind = int if name == "seed" else COUNT if name == "eval_steps" else POSITIVE_INT
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    for name, help_text in (("stage1_lr", "stage-1 learning rate"), ("stage2_lr", "stage-2 learning rate"),
                            ("beta", "alignment beta"), ("tau", "alignment tau")):
        p.add_argument("--" + name.replace("_", "-"), type=POSITIVE, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or lines")
    p.add_argument("--restart", dest="resume", action="store_false",
                   help="start every step over (default: resume; a step whose settings changed starts over by itself)")
    runtime_options(p, threads=d.threads, log_interval=d.log_interval,
                    why=": the tiny model runs fastest on one thread and each stage lasts about a minute")


def run(args) -> int:
    return run_training_job(args, _run_main_job)


def _run_main_job(args) -> None:
    from ..toy.job import MainJobConfig, run_main_job

    run_main_job(pick(MainJobConfig, args))
