"""What transformers' Trainer users reach for (issue 17, item 8): --lr-scheduler with warmup, early stopping on the
best metric, --logging-steps, fp16 autocast with a gradient scaler (its logic run on CPU); each survives an exact
resume and is part of the run's fingerprint."""
import io
import json
import math
import shutil

import pytest
import torch

from are_fast.cli import parse_args
from are_fast.cli.options import pick
from are_fast.training import runstate
from are_fast.training.progress import Progress
from are_fast.training.trainer import TrainConfig
from training.test_trainer import _trainer

LR, WARMUP, STEPS = 1e-3, 2, 6


def expected_lr(kind: str, i: int) -> float:
    """The learning rate of optimizer step i (from 0): linear warmup to LR over WARMUP steps, then the schedule."""
    if i < WARMUP:
        return LR * i / WARMUP
    progress = (i - WARMUP) / (STEPS - WARMUP)
    return LR * {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_each_schedule_warms_up_then_follows_its_shape(tiny_dir, tmp_path, kind):
    records = _trainer(tiny_dir, tmp_path / "run", max_steps=STEPS, batch_size=4, lr_scheduler=kind,
                       warmup_steps=WARMUP).train()
    assert [r["lr"] for r in records] == pytest.approx([expected_lr(kind, i) for i in range(STEPS)], rel=1e-12,
                                                        abs=1e-15)


@pytest.mark.parametrize("kind, fp16", [("linear", False), ("constant", True)], ids=["linear", "constant-fp16"])
def test_resume_is_bit_identical_with_the_schedule_and_the_scaler(tiny_dir, tmp_path, kind, fp16):
    options = dict(max_steps=STEPS, batch_size=4, grad_accum=2, save_every=2, lr_scheduler=kind, fp16=fp16)
    full = _trainer(tiny_dir, tmp_path / "run", keep_checkpoints=5, **options).train()
    last = json.loads((tmp_path / "run" / "step-00000006" / "state.json").read_text())
    shutil.rmtree(tmp_path / "run" / "step-00000004")
    shutil.rmtree(tmp_path / "run" / "step-00000006")
    resumed = _trainer(tiny_dir, tmp_path / "run", **options).train()
    keys = ("loss", "lr", "grad_norm") + (("loss_scale",) if fp16 else ())
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full[2:]]
    state = json.loads((tmp_path / "run" / "step-00000006" / "state.json").read_text())
    assert (state["scaler"] is not None) == fp16 and state["config"]["lr_scheduler"] == kind
    assert state["scaler"] == last["scaler"] and state["scheduler"] == last["scheduler"]  # restored, then stepped


def test_fp16_scales_the_loss_unscales_before_clipping_and_skips_overflowing_steps(tiny_dir, tmp_path):
    plain = _trainer(tiny_dir, tmp_path / "fp32", max_steps=1, batch_size=4).train()[0]
    trainer = _trainer(tiny_dir, tmp_path / "fp16", max_steps=3, batch_size=4, fp16=True, warmup_steps=0)
    assert trainer.autocast["dtype"] == torch.float16 and trainer.autocast["enabled"]
    forward, calls, weights = trainer.core.forward, [], []

    def overflow_on_the_second_step(batch):
        calls.append(1)
        loss, metrics = forward(batch)
        weights.append([p.detach().clone() for p in trainer.params])
        return (loss * math.inf if len(calls) == 2 else loss), metrics

    trainer.core.forward = overflow_on_the_second_step
    records = trainer.train()
    # Step 1: the gradient was unscaled before clipping: its norm is fp32's, not 65536 times it.
    assert records[0]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-2)
    assert records[0]["loss_scale"] == 65536.0
    # Step 2 overflowed: the optimizer step was skipped (weights before step 3 == before step 2), scale halved.
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert records[1]["loss_scale"] == records[2]["loss_scale"] == 32768.0


class ScriptedEval:
    """An evaluator whose eval_loss values come from a list, one per evaluation."""

    names = ["eval_loss"]

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, device):
        return {"eval_loss": self.values.pop(0)}


def test_early_stopping_after_patience_evaluations_without_improvement(tiny_dir, tmp_path, capsys):
    options = dict(max_steps=10, batch_size=4, eval_steps=1, best_metric="eval_loss", early_stopping_patience=2,
                   save_every=1, keep_checkpoints=10)
    # Evaluations at steps 0, 1, 2, 3: the best at step 1, then two without improvement.
    records = _trainer(tiny_dir, tmp_path / "run", evaluator=ScriptedEval([1.0, 0.9, 0.95, 0.97]), **options).train()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "early stopping at step 3: eval_loss has not improved for 2 evaluations (best 0.9000 at step 1)" in \
        capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "step-00000003" / "state.json").read_text())
    assert state["data"]["stopped_early"] is True and state["data"]["stale_evals"] == 2
    best = json.loads((tmp_path / "run" / "best" / "state.json").read_text())
    assert best["step"] == 1
    assert _trainer(tiny_dir, tmp_path / "run", evaluator=ScriptedEval([]), **options).train() == []
    assert "already finished (stopped early at step 3 of 10)" in capsys.readouterr().out
    # Killed after step 2: the count of evaluations without improvement comes back with the checkpoint.
    shutil.rmtree(tmp_path / "run" / "step-00000003")
    resumed = _trainer(tiny_dir, tmp_path / "run", evaluator=ScriptedEval([0.97]), **options).train()
    assert [r["step"] for r in resumed] == [3] and resumed[0]["loss"] == records[2]["loss"]  # bit-identical


def test_early_stopping_needs_the_metric_it_watches(capsys):
    with pytest.raises(ValueError, match="early_stopping_patience: needs best_metric"):
        TrainConfig("o", early_stopping_patience=2)
    with pytest.raises(ValueError, match="fp16, bf16: choose one"):
        TrainConfig("o", fp16=True, bf16=True)
    with pytest.raises(ValueError, match="lr_scheduler: expected one of constant, linear, cosine"):
        TrainConfig("o", lr_scheduler="polynomial")


def test_logging_steps_print_a_line_every_n_steps():
    stream = io.StringIO()
    progress = Progress(5, "stage1", interval_s=1e9, stream=stream, interval_steps=2)
    for step in range(5):
        progress.update(loss=1.0 / (step + 1))
    progress.close()
    assert [line.split("|")[0].strip() for line in stream.getvalue().splitlines()] == \
        ["stage1: step 2/5 (40%)", "stage1: step 4/5 (80%)", "stage1: step 5/5 (100%)"]


def test_the_options_reach_the_trainer_and_its_fingerprint(tmp_path):
    required = ["--data", "d", "--base-model", "b", "--output-dir", str(tmp_path)]
    args = parse_args(["stage1"] + required + ["--lr-scheduler", "linear", "--logging-steps", "5", "--fp16",
                                                     "--best-metric", "eval_loss", "--early-stopping-patience", "3"])
    config = pick(TrainConfig, args)
    assert (config.lr_scheduler, config.logging_steps, config.fp16, config.early_stopping_patience) == \
        ("linear", 5, True, 3)
    fingerprint = runstate.run_fingerprint(config, {}, 1, False)
    assert fingerprint["lr_scheduler"] == "linear" and fingerprint["fp16"] is True
    assert fingerprint["early_stopping_patience"] == 3 and fingerprint["best_metric"] == "eval_loss"
    cosine = runstate.run_fingerprint(pick(TrainConfig, parse_args(["stage1"] + required)), {}, 1, False)
    assert "lr_scheduler: \"cosine\" -> \"linear\"" in runstate.differences(cosine, fingerprint)
