"""Held-out evaluation during training: which rows, which metrics, and the best model so far.

- ``HeldOut`` names the rows: a file in the training data's format (``--eval-data``) or a fraction of the
  training rows set aside with the seed (``--eval-fraction``); for stage 1 optionally a file of stage-2
  triplets (``--eval-triplets``), since stage-1 rows have no negatives.
- ``HeldOutEval`` computes the metrics the trainer logs every ``eval_steps``: ``eval_loss`` (the training
  objective on the held-out rows, in eval mode) and, given triplet rows, ``eval_acc_hard`` and
  ``eval_acc_random`` (``are_fast.training.triplet_accuracy.triplet_accuracies``).
- ``BestModel`` keeps the trainable weights of the best evaluation by one metric in ``<output_dir>/best/``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from .data import DataReport, load_stage2, read_jsonl, stage1_items, stage2_items
from .triplet_accuracy import triplet_accuracies
from ..runtime import written_atomically

# Metric -> True when larger is better.
METRICS = {"eval_loss": False, "eval_acc_hard": True, "eval_acc_random": True}


@dataclass
class HeldOut:
    """Where the held-out rows come from (at most one of ``data`` and ``fraction``)."""

    data: str | None = None  # a file in the training data's format
    fraction: float = 0.0  # else this fraction of the training rows (at least one row), chosen with the seed
    triplets: str | None = None  # stage 1 only: stage-2 rows {query, pos, neg, instruction} for triplet accuracy
    batch_size: int = 32  # rows per evaluation batch

    def __post_init__(self):
        if self.data is not None and self.fraction:
            raise ValueError("eval_data, eval_fraction: give one of them, not both")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a number in [0, 1), got {self.fraction}")
        if self.batch_size < 1:
            raise ValueError(f"eval_batch_size: expected at least 1, got {self.batch_size}")

    @property
    def wanted(self) -> bool:
        return self.data is not None or self.fraction > 0 or self.triplets is not None

    def split(self, rows: list, load, seed: int) -> tuple[list, list]:
        """(training rows, held-out rows). ``load(path)`` reads a file as the training data was read."""
        if self.data is not None:
            held, report = load(self.data)
            if not held:
                raise ValueError(f"eval_data: no usable row in {self.data!r} ({report.summary()})")
            return rows, held
        if not self.fraction:
            return rows, []
        count = max(1, round(self.fraction * len(rows)))
        if count >= len(rows):
            raise ValueError(f"eval_fraction: {self.fraction} of {len(rows)} rows leaves no training row")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[:count])
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def load_triplets(path: str, instruction: str | None = None) -> list[dict]:
    """Stage-2 rows of ``path`` for triplet accuracy, each with as many negatives as the file's first row (rows
    with fewer are skipped). ValueError when no row is usable."""
    first = next((row["neg"] for _, row in read_jsonl(path, DataReport(path)) if row.get("neg")), None)
    count = len(first) if isinstance(first, list) else 1
    rows, report = load_stage2(path, count, instruction)
    if len(rows) < 2:
        raise ValueError(f"eval_triplets: triplet accuracy needs at least 2 usable stage-2 rows in {path!r} "
                         f"({report.summary()})")
    return rows


class HeldOutEval:
    """``evaluator(device) -> {metric: float}`` for the trainer: the objective's mean loss over ``items`` and,
    when ``triplets`` (stage-2 row dicts) are given, triplet accuracy of ``compressor`` against hard and random
    negatives. Every process evaluates every row (FSDP needs each rank in each forward), so all agree."""

    def __init__(self, objective, compressor, items, triplets=None, batch_size: int = 32, seed: int = 0):
        if triplets is not None and len(triplets) < 2:
            raise ValueError("eval rows: triplet accuracy needs at least 2 held-out triplet rows")
        self.objective, self.compressor, self.triplets, self.seed = objective, compressor, triplets, seed
        ordered = sorted(items, key=lambda item: item.length)  # little padding
        self.batches = [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]
        self.names = (["eval_loss"] if items else []) + (["eval_acc_hard", "eval_acc_random"] if triplets else [])

    @torch.no_grad()
    def __call__(self, device) -> dict:
        was_training = self.objective.training
        self.objective.eval()
        metrics = {}
        if self.batches:
            total = sum(float(self.objective(self.objective.collate(b).to(device))[0]) * len(b) for b in self.batches)
            metrics["eval_loss"] = total / sum(map(len, self.batches))
        if self.triplets:
            acc = triplet_accuracies(self.compressor, self.triplets, self.seed)
            metrics.update(eval_acc_hard=acc["hard"], eval_acc_random=acc["random"])
        self.objective.train(was_training)
        return metrics


def stage1_evaluator(objective, rows, triplets, batch_size: int = 32, seed: int = 0) -> HeldOutEval:
    """Held-out compression loss on stage-1 ``rows`` (+ triplet accuracy on ``triplets``, stage-2 rows)."""
    items = stage1_items(rows, objective.compressor, objective.decoder)
    return HeldOutEval(objective, objective.compressor, items, triplets or None, batch_size, seed)


def stage2_evaluator(objective, rows, batch_size: int = 32, seed: int = 0, backend=None) -> HeldOutEval:
    """Held-out alignment loss and triplet accuracy on stage-2 ``rows``. Their reference scores are computed
    here with the compressor as it is now: build this before training starts (the stage-1 model)."""
    from .refscores import compute_reference_scores

    was_training = objective.compressor.training
    objective.compressor.eval()
    ref_p, ref_n = compute_reference_scores(objective.compressor, objective.decoder, rows, batch_size, backend,
                                            progress=False)
    objective.compressor.train(was_training)
    scores = {r["id"]: (float(p), n.tolist()) for r, p, n in zip(rows, ref_p, ref_n)}
    items = stage2_items(rows, objective.compressor, objective.decoder, None, scores)
    return HeldOutEval(objective, objective.compressor, items, rows, batch_size, seed)


_WEIGHTS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class BestModel:
    """The trainable weights of the best evaluation by ``metric`` (see ``METRICS``), kept in
    ``<output_dir>/best/`` (``model.safetensors`` + ``state.json``: step, metric, value), written atomically.
    A resumed run continues from the kept best unless it lies after the resumed step (that part is redone)."""

    def __init__(self, output_dir: str, metric: str, start_step: int):
        if metric not in METRICS:
            raise ValueError(f"best_metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        self.metric, self.larger = metric, METRICS[metric]
        self.path = os.path.join(output_dir, "best")
        self.state = read_best(output_dir)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self.state is not None and (self.state["step"] > start_step or self.state["metric"] != metric):
            self.state = None
            if rank0:
                shutil.rmtree(self.path, ignore_errors=True)

    def update(self, step: int, metrics: dict, model) -> bool:
        """Keep ``model``'s weights when ``metrics[metric]`` beats the best so far (called on every rank)."""
        value = metrics[self.metric]
        if self.state is not None and not (value > self.state["value"] if self.larger else value < self.state["value"]):
            return False
        weights = get_model_state_dict(model, options=_WEIGHTS)  # a collective under FSDP
        self.state = {"step": step, "metric": self.metric, "value": value}
        if not dist.is_initialized() or dist.get_rank() == 0:
            with written_atomically(self.path) as tmp:
                os.makedirs(tmp)
                save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(self.state, f)
        if dist.is_initialized():
            dist.barrier()
        return True

    def restore(self, model) -> None:
        """Load the kept weights into ``model`` (every rank), as transformers' ``load_best_model_at_end``."""
        if self.state is not None:
            set_model_state_dict(model, load_file(os.path.join(self.path, "model.safetensors")),
                                 options=StateDictOptions(full_state_dict=True, strict=False))


def read_best(output_dir: str) -> dict | None:
    """The kept best's state (step, metric, value) of a run directory, or None."""
    path = os.path.join(output_dir, "best", "state.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
