"""The main job on the embedded default: both AutoRegEmbed stages end to end, no download needed.

A tiny Llama (from a config), transformers' ByT5Tokenizer (bytes, no files) and the generated paraphrase
data of ``are_fast.toy``. AutoRegEmbed starts from a pretrained LM, so step 0 pretrains the tiny LM on the
toy sentences (causal-LM loss through the fused ``compression_loss``, trainable head); then stage 1
(information compression) -> reference scores -> stage 2 (conditional distribution alignment), with triplet
accuracy on held-out rows before and after, against two kinds of negatives: hard ones (the query's own words
with one slot's meaning changed) and random ones (other held-out rows' texts). Writes the
models, data, scores, ``loss.jsonl`` per stage, ``loss_curves.png`` and ``summary.json`` under the output
directory, and prints a summary. A rerun resumes from the checkpoints it finds there; a step whose settings
changed (its run fingerprint differs: other sizes, rows, steps, learning rates, ...) starts over, and so do
the steps after it, each with a line saying which settings changed; ``restart`` starts every step over.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch

from . import toy
from .ops import functional as F
from .errors import check_writable
from .evaluation import triplet_accuracy
from .model import Compressor
from .model.directory import model_fingerprint
from .model.layout import IGNORE_INDEX, pad_right
from .training.jobs import ModelOptions, run_reference_scores, run_stage1, run_stage2
from .training.trainer import TrainConfig


@dataclass
class MainJobConfig:
    output_dir: str = "are_fast_main"
    hidden_size: int = 64
    layers: int = 2
    num_embed_tokens: int = 5
    stage1_rows: int = 4000
    stage2_rows: int = 1000
    eval_rows: int = 200
    num_negatives: int = 2
    pretrain_steps: int = 200
    stage1_steps: int = 400
    stage2_steps: int = 150
    batch_size: int = 32
    stage1_lr: float = 5e-3
    stage2_lr: float = 1e-3
    beta: float = 0.1
    tau: float = 0.1
    seed: int = 0
    threads: int = 1  # a tiny model runs fastest on one thread
    progress: bool = True
    resume: bool = True  # False: start every step over

    def check(self) -> None:
        """ValueError naming the first setting the embedded default cannot run with."""
        for name in ("hidden_size", "layers", "num_embed_tokens", "stage1_rows", "stage2_rows", "eval_rows",
                     "num_negatives", "pretrain_steps", "stage1_steps", "stage2_steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr", "beta", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size: expected a multiple of 8 (4 heads with an even head size), "
                             f"got {self.hidden_size}")
        if self.num_negatives > len(toy.SLOTS):
            raise ValueError(f"num_negatives: a hard negative changes one of {len(toy.SLOTS)} slots, so at most "
                             f"{len(toy.SLOTS)}; got {self.num_negatives}")
        if self.eval_rows <= self.num_negatives:
            raise ValueError(f"eval_rows: random negatives come from other rows: expected more than num_negatives="
                             f"{self.num_negatives}, got {self.eval_rows}")
        for name in ("stage1_rows", "stage2_rows"):
            if getattr(self, name) < self.batch_size:
                raise ValueError(f"{name}: expected at least one batch ({self.batch_size} rows), got "
                                 f"{getattr(self, name)}")


@dataclass
class _Sentence:
    ids: list

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class _LMBatch:
    ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device):
        return _LMBatch(self.ids.to(device), self.labels.to(device))

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class _Pretrain(torch.nn.Module):
    """Causal-LM pretraining of the tiny base model, in the trainer's model contract."""

    def __init__(self, lm, pad_id: int):
        super().__init__()
        self.lm, self.pad_id = lm, pad_id

    def collate(self, items) -> _LMBatch:
        ids, lengths = pad_right([i.ids for i in items], self.pad_id)
        valid = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
        return _LMBatch(ids, torch.where(valid, ids, IGNORE_INDEX))

    def forward(self, batch: _LMBatch):
        hidden = self.lm.model(input_ids=batch.ids, attention_mask=(batch.labels != IGNORE_INDEX).long()).last_hidden_state
        return F.compression_loss(hidden, self.lm.lm_head.weight, batch.labels), {}


def _pretrain(base: str, rows, cfg: "MainJobConfig", identity: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    lm = AutoModelForCausalLM.from_pretrained(base)
    texts = sorted({r[key] for r in rows for key in ("context", "output")})
    items = [_Sentence(ids + [tokenizer.eos_token_id]) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    config = TrainConfig(os.path.join(cfg.output_dir, "pretrain"), max_steps=cfg.pretrain_steps, batch_size=64,
                         lr=3e-3, warmup_steps=cfg.pretrain_steps // 10, seed=cfg.seed, progress=cfg.progress,
                         resume=cfg.resume, restart_on_change=True)
    Trainer(_Pretrain(lm, tokenizer.pad_token_id), items, config, identity).train()
    lm.save_pretrained(base)


def _plot(paths: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 3.5))
    for ax, (title, path) in zip(axes, paths.items()):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _accuracy(model_dir: str, k: int, eval_sets: dict) -> dict:
    compressor = Compressor.from_pretrained(model_dir, k)
    return {name: triplet_accuracy(compressor, rows) for name, rows in eval_sets.items()}


def run_main_job(cfg: MainJobConfig) -> dict:
    """Run every step; return (and print) the summary."""
    cfg.check()
    check_writable(cfg.output_dir, "output-dir")
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    out = cfg.output_dir
    base, data = os.path.join(out, "base"), os.path.join(out, "data")
    files = {"stage1": os.path.join(data, "stage1.jsonl"), "stage2": os.path.join(data, "stage2.jsonl"),
             "eval": os.path.join(data, "eval.jsonl")}
    stage1_rows = toy.compression_rows(cfg.stage1_rows, cfg.seed)
    toy.write_jsonl(files["stage1"], stage1_rows)
    toy.write_jsonl(files["stage2"], toy.triplet_rows(cfg.stage2_rows, cfg.num_negatives, cfg.seed + 1))
    eval_rows = toy.triplet_rows(cfg.eval_rows, cfg.num_negatives, cfg.seed + 2)
    toy.write_jsonl(files["eval"], eval_rows)
    opts = ModelOptions(num_embed_tokens=cfg.num_embed_tokens, max_text_tokens=256, max_target_tokens=256,
                        seed=cfg.seed)
    k = cfg.num_embed_tokens
    toy.tiny_llama(base, cfg.hidden_size, cfg.layers, cfg.seed)
    with open(files["stage1"], "rb") as f:
        data_sha256 = hashlib.sha256(f.read()).hexdigest()
    _pretrain(base, stage1_rows, cfg,
              {"job": "pretrain", "base_init": model_fingerprint(base), "data_sha256": data_sha256})
    eval_sets = {"hard negatives": eval_rows, "random negatives": toy.with_random_negatives(eval_rows, cfg.seed)}
    acc = {"base model": _accuracy(base, k, eval_sets)}

    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress, max_grad_norm=1.0,
                  resume=cfg.resume, restart_on_change=True)
    s1 = TrainConfig(os.path.join(out, "stage1"), max_steps=cfg.stage1_steps, lr=cfg.stage1_lr,
                     warmup_steps=cfg.stage1_steps // 10, **common)
    run_stage1(files["stage1"], base, s1, opts)
    stage1_model = os.path.join(s1.output_dir, "model")
    acc["after stage 1"] = _accuracy(stage1_model, k, eval_sets)

    scores = os.path.join(out, "reference_scores.safetensors")
    run_reference_scores(files["stage2"], stage1_model, base, scores, cfg.num_negatives, opts, batch_size=64,
                         progress=cfg.progress)
    s2 = TrainConfig(os.path.join(out, "stage2"), max_steps=cfg.stage2_steps, lr=cfg.stage2_lr,
                     warmup_steps=cfg.stage2_steps // 10, **common)
    run_stage2(files["stage2"], scores, stage1_model, base, s2, opts, cfg.num_negatives, cfg.beta, cfg.tau)
    acc["after stage 2"] = _accuracy(os.path.join(s2.output_dir, "model"), k, eval_sets)

    curves = os.path.join(out, "loss_curves.png")
    _plot({"step 0: LM pretraining": os.path.join(out, "pretrain", "loss.jsonl"),
           "stage 1: compression loss": os.path.join(s1.output_dir, "loss.jsonl"),
           "stage 2: alignment loss": os.path.join(s2.output_dir, "loss.jsonl")}, curves)
    losses = {}
    for name in ("pretrain", "stage1", "stage2"):
        with open(os.path.join(out, name, "loss.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        losses[name] = {"first": records[0]["loss"], "last": records[-1]["loss"], "steps": len(records)}
    summary = {"triplet_accuracy": acc, "losses": losses, "loss_curves": curves, "seconds": time.perf_counter() - start,
               "eval_pairs": cfg.eval_rows * cfg.num_negatives}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nare_fast main job ({summary['seconds']:.0f} s) - output in {out}")
    for name, item in losses.items():
        print(f"  {name} loss: {item['first']:.4f} -> {item['last']:.4f} over {item['steps']} steps")
    print(f"  triplet accuracy, cos(q, pos) > cos(q, neg), on {summary['eval_pairs']} held-out (q, pos, neg) triplets:")
    print(f"    {'':<14} {'hard negatives':>15} {'random negatives':>17}")
    for name, value in acc.items():
        print(f"    {name:<14} {value['hard negatives']:>15.3f} {value['random negatives']:>17.3f}")
    print(f"  loss curves: {curves}")
    return summary
