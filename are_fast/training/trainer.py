"""The thin trainer: one readable loop around a model whose ``forward(batch)`` returns (loss, metrics), with
accumulation, clipping, autocast, schedules, held-out evaluation and early stopping, checkpoints with a checked
exact resume, a clean stop on SIGINT/SIGTERM, DDP and FSDP2. README "Training" says why not transformers'
Trainer and lists what a run gives."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..runtime import StopSignals, writing
from . import runstate
from .checkpoint import checkpoint_dirs, load_checkpoint, read_checkpoint_state, save_checkpoint
from .evaluate import BestModel
from .progress import Progress
from .reporting import TensorBoardLog


@dataclass
class TrainConfig:
    """Options of a training run (the CLI exposes each one)."""

    output_dir: str
    max_steps: int = 100  # optimizer steps
    epochs: float | None = None  # when set: max_steps = ceil(epochs x optimizer steps per epoch)
    batch_size: int = 8  # rows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"  # after the warmup: "constant", "linear" or "cosine" (transformers' get_scheduler)
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 0
    save_every: int = 0  # 0: a checkpoint at the end only
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir; False (--restart): start over
    restart_on_change: bool = False  # a checkpoint of other settings: start over (main job) instead of an error
    bf16: bool | None = None  # bf16 autocast; None: on for CUDA (unless fp16)
    fp16: bool = False  # fp16 autocast with a gradient scaler (GPUs without bf16)
    bucket_window: int = 32  # batches formed from windows of this many batches sorted by length
    fsdp: bool = False
    progress: bool = True  # a bar on a terminal, elsewhere a line every log_interval seconds
    log_interval: float = 30.0  # seconds between two progress lines off a terminal
    logging_steps: int = 0  # > 0: a progress line every N steps instead (transformers' logging_steps)
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: cuda when available (under torchrun: cuda:LOCAL_RANK)
    threads: int | None = None  # torch CPU threads; None: torch's default
    eval_steps: int = 0  # with an evaluator: evaluate every N steps (0: before training and at the end only)
    best_metric: str | None = None  # keep the best model by this eval metric and export it (evaluate.METRICS)
    early_stopping_patience: int = 0  # > 0: stop after N evaluations in a row without a better best_metric
    tensorboard: bool | None = None  # event files in output_dir/tensorboard; None: when tensorboard is installed

    def __post_init__(self):
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs: expected a positive number, got {self.epochs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected at least 1, got {self.threads}")
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps: expected 0 or more, got {self.eval_steps}")
        if self.log_interval < 0:
            raise ValueError(f"log_interval: expected 0 or more seconds, got {self.log_interval}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler: expected one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("logging_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        if self.early_stopping_patience and self.best_metric is None:
            raise ValueError("early_stopping_patience: needs best_metric, the held-out metric whose improvement it "
                             "watches")
        if self.fp16 and self.bf16:
            raise ValueError("fp16, bf16: choose one autocast dtype")
        if self.fp16 and self.fsdp:
            raise ValueError("fp16: the gradient scaler is not supported with fsdp here; use bf16")


# --lr-scheduler -> transformers' scheduler name; each warms up linearly over warmup_steps first.
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class BucketedBatches:
    """Deterministic, length-bucketed batches: the order depends only on (seed, epoch, lengths, batch_size).

    Each epoch shuffles the rows, sorts windows of ``window * batch_size`` rows by length, cuts them into
    batches (so a batch pads little) and shuffles the batches. Process r of w takes batches r, r + w, ...
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 32, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        if len(lengths) < batch_size * world_size:
            raise ValueError(f"the data has {len(lengths)} rows, fewer than one batch per process "
                             f"({batch_size} x {world_size})")
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.rank, self.world_size = rank, world_size
        self._cache: dict = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches (lists of row indices) of ``epoch``."""
        if epoch not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            span = self.window * self.batch_size
            batches = []
            for start in range(0, len(order), span):
                window = sorted(order[start: start + span], key=self.lengths.__getitem__)
                batches += [window[i: i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            batches = [b for b in batches if len(b) == self.batch_size]
            rng.shuffle(batches)
            usable = len(batches) - len(batches) % self.world_size
            self._cache = {epoch: batches[self.rank: usable: self.world_size]}
        return self._cache[epoch]


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """The device named by ``--device``: "cpu", "cuda" (this process's GPU: cuda:LOCAL_RANK), "cuda:N";
    None: cuda when available. ValueError for anything else or a GPU that is not there."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} asked for, but torch sees no CUDA device")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def setup_distributed(device: str | None = None) -> tuple[torch.device, int, int]:
    """(device, rank, world size) for ``device`` (see ``resolve_device``); under torchrun, joins the process
    group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen, rank, (dist.get_world_size() if dist.is_initialized() else 1)


class Trainer:
    """Train ``model`` (its ``collate(items)`` makes a batch, ``forward(batch)`` returns (loss, metrics)) on items
    that have a ``length``. Only parameters with ``requires_grad`` are optimized and checkpointed.
    ``evaluator(device) -> {metric: float}`` (``evaluate.HeldOutEval``), when given, runs every ``eval_steps``."""

    def __init__(self, model: torch.nn.Module, items: Sequence, config: TrainConfig, identity: dict | None = None,
                 evaluator: Callable[[torch.device], dict] | None = None):
        """identity: what else determines the run (data checksum, models, k, ...), stored in its fingerprint."""
        from transformers import get_scheduler

        runstate.check_config(config)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.best_metric is not None:
            names = getattr(evaluator, "names", None) if evaluator is not None else ()
            if names is not None and config.best_metric not in names:
                raise ValueError(f"best_metric: {config.best_metric!r} is not evaluated in this run (held-out "
                                 f"metrics: {', '.join(names) or 'none; give eval_data or eval_fraction'})")
        self.config, self.evaluator = config, evaluator
        self.device, self.rank, self.world_size = setup_distributed(config.device)
        self.items = items
        self.core = model.to(self.device)
        self.model = self._wrap(self.core)
        params = [p for p in self.core.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: no parameter requires a gradient")
        self.params = params
        self.batches = BucketedBatches([i.length for i in items], config.batch_size, config.seed,
                                       config.bucket_window, self.rank, self.world_size)
        if config.epochs is not None:  # every epoch has the same number of full batches
            per_epoch = max(1, len(self.batches.epoch(0)) // config.grad_accum)
            config = replace(config, max_steps=math.ceil(config.epochs * per_epoch))
        self.config = config
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], self.optimizer, config.warmup_steps,
                                       config.max_steps)
        bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda" and not config.fp16
        self.autocast = dict(device_type=self.device.type, dtype=torch.float16 if config.fp16 else torch.bfloat16,
                             enabled=bool(bf16) or config.fp16)
        # fp16's narrow range needs the loss scaled up (and steps with inf/NaN gradients skipped); off: a no-op.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.fp16)
        self.log_path = os.path.join(config.output_dir, "loss.jsonl")
        self.fingerprint = runstate.run_fingerprint(config, identity, self.world_size, bf16)

    def _wrap(self, model):
        if self.config.fsdp:
            if not dist.is_initialized():
                raise ValueError("fsdp: FSDP2 shards the model over the processes of a torchrun launch; "
                                 "run under torchrun (--nproc-per-node N) or leave --fsdp out")
            from torch.distributed.fsdp import fully_shard
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    fully_shard(module)
            return fully_shard(model)
        if self.world_size > 1:
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if
                                                             self.device.type == "cuda" else None)
        return model

    def _no_sync(self, last: bool):
        if last or self.world_size == 1:
            return contextlib.nullcontext()
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self, micro_batches: Sequence) -> dict:
        """One optimizer step over collated micro-batches. Gradients stay in ``.grad`` until the next step."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        metrics: dict = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.config.fsdp and last:
                self.model.set_requires_gradient_sync(True)
            with self._no_sync(last), torch.autocast(**self.autocast):
                loss, extra = self.model(batch.to(self.device))
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float()
            for key, value in extra.items():
                metrics[key] = metrics.get(key, 0.0) + value / len(micro_batches)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        loss = total / len(micro_batches)
        if self.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.world_size
        scale = {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
        return {"loss": float(loss), "grad_norm": float(norm), "lr": lr, **scale, **metrics}

    def train(self) -> list[dict]:
        """Run (or resume) to ``max_steps``; return the log records of this run's steps. With ``best_metric``,
        the model ends with the best evaluation's weights. SIGINT/SIGTERM end the run after the current step with
        a checkpoint and ``Interrupted``; a failed write raises ``RunFailure``."""
        with StopSignals() as self.stop:
            return self._train()

    def _train(self) -> list[dict]:
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        step, epoch, cursor = 0, 0, 0
        self.stale_evals, stopped = 0, False  # evaluations since best_metric last improved; early stop done
        existing = self._resumable()
        if existing:
            state = load_checkpoint(existing, self.model, self.optimizer, self.scheduler, self.scaler)
            step, epoch, cursor = state["step"], state["data"]["epoch"], state["data"]["cursor"]
            self.stale_evals, stopped = state["data"].get("stale_evals", 0), state["data"].get("stopped_early", False)
            self._say(f"{cfg.output_dir}: already finished (stopped early at step {step} of {cfg.max_steps})" if stopped
                      else f"{cfg.output_dir}: resuming from step {step} of {cfg.max_steps}" if step < cfg.max_steps
                      else f"{cfg.output_dir}: already finished ({step} of {cfg.max_steps} steps); nothing to train")
        else:
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
        if self.rank == 0:
            self._truncate_log(step)
        self.core.train()
        records = []
        progress = Progress(cfg.max_steps, os.path.basename(os.path.normpath(cfg.output_dir)),
                            cfg.progress and self.rank == 0, initial=step, interval_s=cfg.log_interval,
                            interval_steps=cfg.logging_steps)
        board = TensorBoardLog(cfg.output_dir, cfg.tensorboard, step, active=self.rank == 0)
        best = BestModel(cfg.output_dir, cfg.best_metric, step) if cfg.best_metric else None
        start = time.perf_counter()
        tokens, eval_s = 0, 0.0
        saved = step
        if self.evaluator is not None and step == 0:
            eval_s += self._evaluate(0, progress, board, best, saved)
        while step < cfg.max_steps and not stopped:
            micro = []
            for _ in range(cfg.grad_accum):
                if cursor >= len(self.batches.epoch(epoch)):
                    epoch, cursor = epoch + 1, 0
                micro.append(self.core.collate([self.items[i] for i in self.batches.epoch(epoch)[cursor]]))
                cursor += 1
            record = self.train_step(micro)
            step += 1
            tokens += sum(b.num_tokens for b in micro) * self.world_size
            elapsed = time.perf_counter() - start
            record.update(step=step, epoch=epoch, tokens_per_s=tokens / (elapsed - eval_s), elapsed_s=elapsed)
            records.append(record)
            self._log(record, saved)
            board.log(record, "train")
            progress.update(loss=record["loss"], tokens_per_s=record["tokens_per_s"])
            if self.evaluator is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps):
                eval_s += self._evaluate(step, progress, board, best, saved)
                stopped = step < cfg.max_steps and self._early_stop(best)
            stopping = self.stop.agreed()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stopping or stopped:
                self._save(step, epoch, cursor, saved, stopped)
                saved = step
            if stopping and step < cfg.max_steps:
                progress.close()
                board.close()
                raise self.stop.interrupted(f"at step {step} of {cfg.max_steps} (checkpoint saved in {cfg.output_dir})")
        progress.close()
        board.close()
        if stopped and records:  # this run stopped early (not a rerun of a stopped one)
            self._say(f"{cfg.output_dir}: early stopping at step {step}: {best.metric} has not improved for "
                      f"{cfg.early_stopping_patience} evaluations (best {best.state['value']:.4f} at step "
                      f"{best.state['step']})")
        if best is not None:
            best.restore(self.model)
        return records

    def _log(self, record: dict, saved: int) -> None:
        if self.rank == 0:
            with writing(f"appending to {self.log_path}", self._kept(saved)):
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

    def _evaluate(self, step: int, progress: Progress, board: TensorBoardLog, best: BestModel | None,
                  saved: int) -> float:
        """Evaluate, log (loss.jsonl, TensorBoard, a progress line), keep the best; return the seconds taken."""
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(**self.autocast):
            metrics = self.evaluator(self.device)
        if self.world_size > 1:  # every rank evaluated every row; rank 0's numbers decide for all
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        record = {"step": step, **metrics, "seconds": time.perf_counter() - start}
        self._log(record, saved)
        board.log(record, "eval")
        progress.write(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best is not None:
            self.stale_evals = 0 if best.update(step, metrics, self.model) else self.stale_evals + 1
        return time.perf_counter() - start

    def _early_stop(self, best: BestModel | None) -> bool:
        """Whether --early-stopping-patience ends the run after this evaluation."""
        patience = self.config.early_stopping_patience
        return bool(patience) and best is not None and self.stale_evals >= patience

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _kept(self, saved: int) -> str:
        where = f"the checkpoint of step {saved} is kept" if saved else "no checkpoint was written yet"
        return f"{where}; rerun the same command to resume"

    def _save(self, step: int, epoch: int, cursor: int, saved: int, stopped: bool = False) -> None:
        cfg = self.config
        position = {"epoch": epoch, "cursor": cursor, "stale_evals": self.stale_evals, "stopped_early": stopped}
        with writing(f"writing the checkpoint of step {step} to {cfg.output_dir}", self._kept(saved)):
            save_checkpoint(cfg.output_dir, step, self.model, self.optimizer, self.scheduler, position, asdict(cfg),
                            cfg.keep_checkpoints, self.fingerprint, self.scaler)

    def _resumable(self) -> str | None:
        """The checkpoint to resume from, after --restart and the fingerprint check (None: start afresh)."""
        cfg = self.config
        if not cfg.resume:
            if self.rank == 0 and (checkpoint_dirs(cfg.output_dir) or os.path.exists(self.log_path)):
                self._say(f"{cfg.output_dir}: --restart: removed {runstate.clear_run(cfg.output_dir)} checkpoints "
                          "and the loss log")
            self._barrier()
            return None
        existing = checkpoint_dirs(cfg.output_dir)
        if not existing:
            return None
        changed = runstate.differences(read_checkpoint_state(existing[-1]).get("fingerprint"), self.fingerprint)
        if not changed:
            return existing[-1]
        if not cfg.restart_on_change:
            raise ValueError(f"output-dir: {cfg.output_dir!r} holds a run with other settings ({'; '.join(changed)}); "
                             "rerun with its settings to resume it, add --restart to start over, or choose another "
                             "--output-dir")
        self._say(f"{cfg.output_dir}: settings changed ({'; '.join(changed)}); starting this stage over")
        if self.rank == 0:
            runstate.clear_run(cfg.output_dir)
        self._barrier()
        return None

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _truncate_log(self, step: int) -> None:
        """Keep the log lines of steps up to ``step`` (those after the checkpoint are redone)."""
        kept = [line for logged, line in runstate.read_log_steps(self.log_path) if logged <= step]
        if kept or os.path.exists(self.log_path):
            with open(self.log_path, "w") as f:
                f.writelines(kept)
