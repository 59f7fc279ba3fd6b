"""What a training run is, so that a resume continues the same run and nothing else.

A run's fingerprint holds everything that determines its steps: the job's identity (data checksum, model
fingerprints, k, objective options; see ``jobs.py``) plus the trainer options below and the process count.
It is stored in every checkpoint's ``state.json``. A resume whose fingerprint differs is refused with the
settings that differ named, or (``restart_on_change``, the main job) started over with a note; ``--restart``
removes the run's checkpoints and log and starts over.
"""
from __future__ import annotations

import json
import os
import shutil


# TrainConfig fields that change the sequence of steps (not: save_every, progress, fsdp, output_dir, ...).
RUN_FIELDS = ("max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_scheduler",
              "max_grad_norm", "seed", "bucket_window", "fp16", "early_stopping_patience")


def check_config(config) -> None:
    """ValueError naming the first TrainConfig option out of range (the CLI checks its flags the same way)."""
    for name in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "bucket_window"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected at least 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "save_every", "weight_decay", "max_grad_norm"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name}: expected a value >= 0, got {getattr(config, name)}")
    if not 0 < config.lr < float("inf"):
        raise ValueError(f"lr: expected a positive learning rate, got {config.lr}")


def run_fingerprint(config, identity: dict | None, world_size: int, bf16: bool) -> dict:
    """The stored fingerprint: identity + RUN_FIELDS of ``config`` + world size + bf16 autocast (JSON values)."""
    fp = dict(identity or {})
    fp.update({name: getattr(config, name) for name in RUN_FIELDS})
    fp.update(world_size=world_size, bf16=bool(bf16))
    if config.early_stopping_patience:  # then the metric and the evaluation steps decide where the run ends
        fp.update(best_metric=config.best_metric, eval_steps=config.eval_steps)
    return json.loads(json.dumps(fp))  # tuples -> lists, as they come back from state.json


def differences(stored: dict | None, current: dict) -> list[str]:
    """'name: old -> new' for every setting that differs ([] when equal)."""
    if stored is None:
        return ["the checkpoint has no run fingerprint (written by an older are_fast)"]

    def short(value):
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:16] + "..." + text[-8:]

    names = sorted(set(stored) | set(current))
    return [f"{n}: {short(stored.get(n))} -> {short(current.get(n))}" for n in names if stored.get(n) != current.get(n)]


def read_log_steps(path: str) -> list[tuple[int, str]]:
    """(step, line) of each line of a run's ``loss.jsonl``; ValueError when the file is not such a log."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                step = None
            if not isinstance(step, int):
                raise ValueError(f"output-dir: {path!r} line {number} is not a loss record of this trainer (a stray "
                                 "file?); move it away, use another --output-dir, or --restart to replace it")
            kept.append((step, line))
    return kept


def clear_run(output_dir: str) -> int:
    """Remove the run's checkpoints (finished or partial) and loss log; return how many checkpoints went."""
    removed = 0
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        if name.startswith("step-") and os.path.isdir(path):
            shutil.rmtree(path)
            removed += not name.endswith(".tmp")
    if os.path.exists(os.path.join(output_dir, "loss.jsonl")):
        os.remove(os.path.join(output_dir, "loss.jsonl"))
    return removed
