"""The jobs behind the CLI: stage 1, reference scores, stage 2. Each reads a data file, builds the models,
and writes a Hugging Face model directory (``<output_dir>/model``) or a score file, plus ``loss.jsonl``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data import load_stage1, load_stage2, stage1_items, stage2_items
from ..model import Compressor, FrozenDecoder, Stage1Model, Stage2Model
from ..model.layout import flash_attention_available
from .evaluate import HeldOut, load_triplets, stage1_evaluator, stage2_evaluator
from .refscores import compute_reference_scores, load_reference_scores, save_reference_scores
from .trainer import Trainer, TrainConfig, setup_distributed


@dataclass
class ModelOptions:
    """How the compressor and the decoder are loaded and run."""

    num_embed_tokens: int = 5
    max_text_tokens: int = 512
    max_target_tokens: int = 512
    attn_implementation: str | None = None  # None: transformers' default (sdpa); "flash_attention_2" packs rows
    checkpointing: bool = False
    dtype: str | None = None  # weights' dtype ("bfloat16", ...); None: as saved
    lora_rank: int = 0  # 0: full fine-tuning of the compressor
    lora_alpha: int | None = None
    lora_dropout: float = 0.1
    trust_remote_code: bool = False
    backend: str | None = None  # loss-op backend (are_fast.ops.backends)
    seed: int = 0


def build_models(compressor_dir: str, decoder_dir: str, opts: ModelOptions, device=None):
    """(Compressor from ``compressor_dir``, FrozenDecoder from ``decoder_dir``), packed when flash-attn 2 runs."""
    if opts.attn_implementation == "flash_attention_2" and not flash_attention_available():
        raise ValueError("attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    pack = opts.attn_implementation == "flash_attention_2"
    common = dict(dtype=getattr(torch, opts.dtype) if opts.dtype else None, attn_implementation=opts.attn_implementation,
                  trust_remote_code=opts.trust_remote_code, device=device)
    torch.manual_seed(opts.seed)  # the new <EMBED{i}> rows are drawn at random
    compressor = Compressor.from_pretrained(compressor_dir, opts.num_embed_tokens, max_text_tokens=opts.max_text_tokens,
                                            pack=pack, **common)
    decoder = FrozenDecoder.from_pretrained(decoder_dir, max_target_tokens=opts.max_target_tokens, pack=pack,
                                            checkpointing=opts.checkpointing, **common)
    if opts.checkpointing:
        compressor.enable_checkpointing()
    if opts.lora_rank:
        from ..model.lora import apply_lora

        apply_lora(compressor, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
    return compressor, decoder


def _export(compressor: Compressor, path: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        compressor.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def run_stage1(data: str, base_model: str, train: TrainConfig, opts: ModelOptions, instruction: str | None = None,
               held_out: HeldOut | None = None):
    """Information compression from ``base_model``; writes ``<output_dir>/model``. Returns (records, report).
    ``held_out``: rows for the held-out loss (and triplets for triplet accuracy) every ``train.eval_steps``."""
    rows, report = load_stage1(data, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-1 row in {data!r} ({report.summary()})")
    held_out = held_out or HeldOut()
    rows, eval_rows = held_out.split(rows, lambda path: load_stage1(path, instruction), train.seed)
    triplets = load_triplets(held_out.triplets, instruction) if held_out.triplets else None
    device, _, _ = setup_distributed(train.device)
    compressor, decoder = build_models(base_model, base_model, opts, device)
    items = stage1_items(rows, compressor, decoder, report)
    _say(report.summary())
    objective = Stage1Model(compressor, decoder, opts.backend)
    evaluator = stage1_evaluator(objective, eval_rows, triplets, held_out.batch_size, train.seed) \
        if eval_rows or triplets else None
    records = Trainer(objective, items, train, evaluator).train()
    _export(compressor, os.path.join(train.output_dir, "model"))
    return records, report


def run_reference_scores(data: str, model: str, base_model: str, output: str, num_negatives: int,
                         opts: ModelOptions, batch_size: int = 32, instruction: str | None = None, progress=True,
                         device: str | None = None, log_interval: float = 30.0):
    """Score every stage-2 row with the stage-1 ``model`` and the frozen ``base_model``; write ``output``."""
    rows, report = load_stage2(data, num_negatives, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-2 row in {data!r} ({report.summary()})")
    device, rank, world = setup_distributed(device)
    compressor, decoder = build_models(model, base_model, opts, device)
    stage2_items(rows, compressor, decoder, report)  # counts truncations for the report
    _say(report.summary())
    compressor.eval()
    mine = list(range(rank, len(rows), world))  # under torchrun each process scores every world-th row
    ref_p, ref_n = compute_reference_scores(compressor, decoder, [rows[i] for i in mine], batch_size, opts.backend,
                                            progress and rank == 0, log_interval)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, ref_p, ref_n))
        ref_p, ref_n = torch.empty(len(rows)), torch.empty(len(rows), num_negatives)
        for index, p, n in parts:
            ref_p[index], ref_n[index] = p, n
    if rank == 0:
        save_reference_scores(output, rows, ref_p, ref_n)
    if world > 1:
        dist.barrier()
    return ref_p, ref_n, report


def run_stage2(data: str, scores: str, model: str, base_model: str, train: TrainConfig, opts: ModelOptions,
               num_negatives: int, beta: float = 0.1, tau: float = 0.1, ref_sign: float = 1.0,
               distance: str = "logprob", instruction: str | None = None, held_out: HeldOut | None = None):
    """Conditional distribution alignment from the stage-1 ``model`` (decoder: ``base_model``). ``held_out``:
    rows for the held-out loss and triplet accuracy every ``train.eval_steps``."""
    rows, report = load_stage2(data, num_negatives, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-2 row in {data!r} ({report.summary()})")
    held_out = held_out or HeldOut()
    if held_out.triplets:
        raise ValueError("eval_triplets: stage 2 evaluates triplet accuracy on its own held-out rows (eval_data or "
                         "eval_fraction)")
    rows, eval_rows = held_out.split(rows, lambda path: load_stage2(path, num_negatives, instruction), train.seed)
    by_id = load_reference_scores(scores, rows)
    device, _, _ = setup_distributed(train.device)
    compressor, decoder = build_models(model, base_model, opts, device)
    items = stage2_items(rows, compressor, decoder, report, by_id)
    _say(report.summary())
    objective = Stage2Model(compressor, decoder, beta=beta, tau=tau, ref_sign=ref_sign, distance=distance,
                            backend=opts.backend)
    evaluator = stage2_evaluator(objective, eval_rows, held_out.batch_size, train.seed, opts.backend) \
        if eval_rows else None
    records = Trainer(objective, items, train, evaluator).train()
    _export(compressor, os.path.join(train.output_dir, "model"))
    return records, report
