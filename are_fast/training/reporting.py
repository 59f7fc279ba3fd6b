"""What a run reports besides ``loss.jsonl``: TensorBoard event files and the one-screen summary at the end.

TensorBoard: ``<output_dir>/tensorboard/`` gets ``train/<key>`` per step (loss, lr, grad_norm, tokens_per_s,
and the objective's own metrics) and ``eval/<key>`` per evaluation, when the ``tensorboard`` package is
installed (``pip install are_fast[tensorboard]``); a resumed run purges the events after its checkpoint.

The summary reads the run directory (so it covers resumed runs whole): steps, time, tokens/s, the loss at the
start and the end, the last held-out metrics, the best model, and where every output went.
"""
from __future__ import annotations

import json
import os

from .evaluate import read_best

_NOT_SCALARS = ("step", "epoch", "elapsed_s")


class TensorBoardLog:
    """Scalars of a run for TensorBoard. ``enabled``: True requires tensorboard, None uses it when installed,
    False never. Only ``active`` logs write anything (rank 0)."""

    def __init__(self, output_dir: str, enabled: bool | None, start_step: int, active: bool = True):
        self.writer = None
        self.log_dir = os.path.join(output_dir, "tensorboard")
        if enabled is False or not active:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if enabled:
                raise ValueError("tensorboard: the tensorboard package is not installed "
                                 "(pip install 'are_fast[tensorboard]')") from None
            return
        self.writer = SummaryWriter(self.log_dir, purge_step=start_step or None)

    def log(self, record: dict, prefix: str) -> None:
        """Write ``record``'s numbers at ``record["step"]`` as ``prefix/<key>`` (eval keys lose ``eval_``)."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(output_dir: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``<output_dir>/loss.jsonl``."""
    path = os.path.join(output_dir, "loss.jsonl")
    if not os.path.isfile(path):
        return [], []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "loss" not in r]


def _metrics(record: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_"))


def run_summary(title: str, output_dir: str, outputs: dict, settings: dict | None = None) -> str:
    """The end-of-run summary of the training run in ``output_dir``; ``outputs`` maps a label to a path
    (``{"model": ".../model"}``); the log, checkpoints, best model and TensorBoard directory are added.
    ``settings``: label -> text lines shown before the paths (stage 2's objective)."""
    train, evals = read_log(output_dir)
    lines = [f"{title}: done"]
    if train:
        last = train[-1]
        tail = train[-max(1, len(train) // 10):]
        lines[0] += (f" - {last['step']} steps, {last['elapsed_s']:.0f} s in this run, "
                     f"{last['tokens_per_s']:.0f} tokens/s")
        lines.append(f"  loss            {train[0]['loss']:.4f} at step {train[0]['step']} -> "
                     f"{sum(r['loss'] for r in tail) / len(tail):.4f} (mean of the last {len(tail)} steps)")
    if evals:
        lines.append(f"  held-out        {_metrics(evals[-1])} (step {evals[-1]['step']})")
        if len(evals) > 1:
            lines.append(f"  held-out before {_metrics(evals[0])} (step {evals[0]['step']})")
    best = read_best(output_dir)
    if best is not None:
        lines.append(f"  best            {best['metric']} {best['value']:.4f} at step {best['step']} "
                     "(the exported model)")
    lines += [f"  {label:<15} {text}" for label, text in (settings or {}).items()]
    paths = dict(outputs)
    paths["log"] = os.path.join(output_dir, "loss.jsonl")
    checkpoints = sorted(n for n in os.listdir(output_dir) if n.startswith("step-") and not n.endswith(".tmp"))
    if checkpoints:
        paths["checkpoint"] = os.path.join(output_dir, checkpoints[-1])
    for name in ("best", "tensorboard"):
        if os.path.isdir(os.path.join(output_dir, name)):
            paths[name] = os.path.join(output_dir, name)
    lines += [f"  {label:<15} {path}" for label, path in paths.items()]
    return "\n".join(lines)
