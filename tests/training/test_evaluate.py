"""Held-out evaluation in the trainer, the best model, --epochs, TensorBoard events, triplet accuracy."""
import os

import pytest
import torch

from are_fast.training.data import stage1_items
from are_fast.training.triplet_accuracy import random_negative_index, triplet_accuracies
from are_fast.model import Stage1Model
from are_fast.toy.data import compression_rows, triplet_rows
from are_fast.training.evaluate import BestModel, HeldOut, read_best, stage1_evaluator
from are_fast.training.jobs import ModelOptions, build_models
from are_fast.training.reporting import read_log, run_summary
from are_fast.training.trainer import Trainer, TrainConfig


def _objective(base):
    compressor, decoder = build_models(base, base, ModelOptions(num_embed_tokens=2))
    return Stage1Model(compressor, decoder)


def _config(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), lr=1e-3, warmup_steps=1, progress=False, bucket_window=2, batch_size=4)
    return TrainConfig(**{**values, **overrides})


def test_held_out_metrics_epochs_and_tensorboard(tiny_dir, tmp_path):
    objective = _objective(tiny_dir)
    items = stage1_items(compression_rows(24, seed=1), objective.compressor, objective.decoder)
    held, triplets = compression_rows(6, seed=2), triplet_rows(5, 2, seed=3)
    evaluator = stage1_evaluator(objective, held, triplets, batch_size=8)
    with torch.no_grad():  # the step-0 numbers, computed here independently: one batch of all held-out rows
        objective.eval()
        expected_loss = float(objective(objective.collate(stage1_items(held, objective.compressor,
                                                                       objective.decoder)))[0])
        objective.train()
    expected_acc = triplet_accuracies(objective.compressor, triplets)
    # 24 rows / batch 4 = 6 batches per epoch = 3 steps of 2 micro-batches; 1.5 epochs -> 5 steps.
    cfg = _config(tmp_path / "run", epochs=1.5, grad_accum=2, eval_steps=2, tensorboard=True)
    trainer = Trainer(objective, items, cfg, evaluator=evaluator)
    assert trainer.config.max_steps == 5
    records = trainer.train()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["epoch"] == 1
    train, evals = read_log(cfg.output_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # before training, every 2 steps, at the end
    assert all(set(r) == {"step", "eval_loss", "eval_acc_hard", "eval_acc_random", "seconds"} for r in evals)
    assert evals[0]["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert (evals[0]["eval_acc_hard"], evals[0]["eval_acc_random"]) == (expected_acc["hard"], expected_acc["random"])
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]  # it evaluates the model being trained

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(os.path.join(cfg.output_dir, "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss", "eval/acc_hard", "eval/acc_random"} <= tags
    assert [e.step for e in board.Scalars("eval/loss")] == [0, 2, 4, 5]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train])

    summary = run_summary("stage1", cfg.output_dir, {"model": "somewhere/model"})
    assert "5 steps" in summary and "held-out        eval_loss" in summary and "somewhere/model" in summary
    assert os.path.join(cfg.output_dir, "tensorboard") in summary and "step-00000005" in summary


class _Scripted:
    """An evaluator whose eval_acc_hard follows a script; it remembers the trainable weights it saw."""

    names = ("eval_acc_hard",)

    def __init__(self, model, values):
        self.model, self.values, self.seen = model, list(values), []

    def __call__(self, device):
        self.seen.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
        return {"eval_acc_hard": self.values.pop(0)}


def test_best_model_is_kept_and_restored(tiny_dir, tmp_path):
    objective = _objective(tiny_dir)
    items = stage1_items(compression_rows(16, seed=1), objective.compressor, objective.decoder)
    evaluator = _Scripted(objective, [0.1, 0.9, 0.3, 0.2])  # evaluations at steps 0, 2, 4, 5: best at step 2
    cfg = _config(tmp_path / "run", max_steps=5, eval_steps=2, best_metric="eval_acc_hard", tensorboard=False)
    Trainer(objective, items, cfg, evaluator=evaluator).train()
    assert read_best(cfg.output_dir) == {"step": 2, "metric": "eval_acc_hard", "value": 0.9}
    final = {n: p for n, p in objective.named_parameters() if p.requires_grad}
    assert all(torch.equal(final[n], w) for n, w in evaluator.seen[1].items())  # the model ends as at step 2
    assert not all(torch.equal(final[n], w) for n, w in evaluator.seen[3].items())
    assert not os.path.isdir(os.path.join(cfg.output_dir, "tensorboard"))
    # A resumed run keeps a best from before its checkpoint, and drops one from after it (that part is redone).
    assert BestModel(cfg.output_dir, "eval_acc_hard", start_step=5).state["step"] == 2
    assert BestModel(cfg.output_dir, "eval_acc_hard", start_step=1).state is None
    assert read_best(cfg.output_dir) is None

    with pytest.raises(ValueError, match="best_metric: 'eval_loss' is not evaluated"):
        Trainer(objective, items, _config(tmp_path / "x", best_metric="eval_loss"), evaluator=evaluator)
    with pytest.raises(ValueError, match="give eval_data or eval_fraction"):
        Trainer(objective, items, _config(tmp_path / "x", best_metric="eval_loss"))


def test_held_out_split_and_bad_options():
    rows = [{"id": str(i)} for i in range(10)]
    train, held = HeldOut(fraction=0.3).split(rows, None, seed=0)
    assert len(held) == 3 and len(train) == 7 and {r["id"] for r in train} | {r["id"] for r in held} == set(map(str, range(10)))
    assert HeldOut(fraction=0.3).split(rows, None, seed=0) == (train, held)  # seeded
    assert HeldOut(fraction=0.3).split(rows, None, seed=1)[1] != held
    with pytest.raises(ValueError, match="give one of them"):
        HeldOut(data="x.jsonl", fraction=0.1)
    with pytest.raises(ValueError, match="eval_fraction: expected a number in"):
        HeldOut(fraction=1.0)
    with pytest.raises(ValueError, match="leaves no training row"):
        HeldOut(fraction=0.9).split(rows[:1], None, seed=0)
    for bad, match in ((dict(epochs=0), "epochs"), (dict(threads=0), "threads"), (dict(eval_steps=-1), "eval_steps")):
        with pytest.raises(ValueError, match=match):
            _config("x", **bad)


def test_triplet_accuracies_match_a_direct_count(tiny_dir):
    compressor, _ = build_models(tiny_dir, tiny_dir, ModelOptions(num_embed_tokens=2))
    rows = triplet_rows(6, 2, seed=4)
    acc = triplet_accuracies(compressor, rows, seed=7)
    from are_fast.training.triplet_accuracy import embed

    def e(text, row):
        return torch.nn.functional.normalize(embed(compressor, [text], [row["instruction"]])[0], dim=0)

    index = random_negative_index(len(rows), 2, seed=7)
    texts = [r["query"] for r in rows] + [r["pos"] for r in rows]
    hard = rand = 0
    for i, row in enumerate(rows):
        q, pos = e(row["query"], row), e(row["pos"], row)
        hard += sum(float(q @ pos) > float(q @ e(neg, row)) for neg in row["neg"])
        rand += sum(float(q @ pos) > float(q @ e(texts[j], rows[j % len(rows)])) for j in index[i].tolist())
    assert acc == {"hard": hard / 12, "random": rand / 12}
    assert all(j % len(rows) != i for i in range(len(rows)) for j in index[i].tolist())  # never the row's own texts
    with pytest.raises(ValueError, match="more than 2 rows"):
        random_negative_index(2, 2)
