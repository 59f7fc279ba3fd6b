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
from ..model.st_files import instruction_prompts, write_sentence_transformers_files
from .refscores import compute_reference_scores, load_reference_scores, save_reference_scores
from .trainer import Trainer, TrainConfig, setup_distributed


@dataclass
class ModelOptions:
    """How the compressor and the decoder are loaded and run."""

    num_embed_tokens: int = 5
    max_text_tokens: int = 512
    max_target_tokens: int = 512
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    route: str | None = None  # "padded", "packed", "varlen" (are_fast.model.layout); None: the device's default
    checkpointing: bool = False
    dtype: str | None = None  # weights' dtype ("bfloat16", ...); None: as saved
    lora_rank: int = 0  # 0: full fine-tuning of the compressor
    lora_alpha: int | None = None
    lora_dropout: float = 0.1
    trust_remote_code: bool = False
    backend: str | None = None  # loss-op backend (are_fast.ops.backends)
    seed: int = 0


def build_models(compressor_dir: str, decoder_dir: str, opts: ModelOptions, device=None):
    """(Compressor from ``compressor_dir``, FrozenDecoder from ``decoder_dir``), both run by ``opts.route``."""
    if opts.attn_implementation == "flash_attention_2" and not flash_attention_available():
        raise ValueError("attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    common = dict(dtype=getattr(torch, opts.dtype) if opts.dtype else None, attn_implementation=opts.attn_implementation,
                  trust_remote_code=opts.trust_remote_code, device=device)
    torch.manual_seed(opts.seed)  # the new <EMBED{i}> rows are drawn at random
    compressor = Compressor.from_pretrained(compressor_dir, opts.num_embed_tokens, max_text_tokens=opts.max_text_tokens,
                                            route=opts.route, **common)
    decoder = FrozenDecoder.from_pretrained(decoder_dir, max_target_tokens=opts.max_target_tokens, route=opts.route,
                                            checkpointing=opts.checkpointing, **common)
    if opts.checkpointing:
        compressor.enable_checkpointing()
    if opts.lora_rank:
        from ..model.lora import apply_lora

        apply_lora(compressor, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
    return compressor, decoder


def _export(compressor: Compressor, path: str, rows: list[dict]) -> None:
    from torch.distributed.tensor import DTensor

    # Under --fsdp the body's weights are shards: every process takes part in gathering them, rank 0 writes.
    state = compressor.backbone.state_dict()
    full = ({name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state.items()}
            if any(isinstance(t, DTensor) for t in state.values()) else None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        compressor.save_pretrained(path, state_dict=full)
        # sentence-transformers files: the folder loads as SentenceTransformer(path), the instruction as its prompt
        write_sentence_transformers_files(path, compressor, **instruction_prompts(r["instruction"] for r in rows))
    if dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def run_stage1(data: str, base_model: str, train: TrainConfig, opts: ModelOptions, instruction: str | None = None):
    """Information compression from ``base_model``; writes ``<output_dir>/model``. Returns (records, report)."""
    rows, report = load_stage1(data, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-1 row in {data!r} ({report.summary()})")
    device, _, _ = setup_distributed()
    compressor, decoder = build_models(base_model, base_model, opts, device)
    items = stage1_items(rows, compressor, decoder, report)
    _say(report.summary())
    records = Trainer(Stage1Model(compressor, decoder, opts.backend), items, train).train()
    _export(compressor, os.path.join(train.output_dir, "model"), rows)
    return records, report


def run_reference_scores(data: str, model: str, base_model: str, output: str, num_negatives: int,
                         opts: ModelOptions, batch_size: int = 32, instruction: str | None = None, progress=True):
    """Score every stage-2 row with the stage-1 ``model`` and the frozen ``base_model``; write ``output``."""
    rows, report = load_stage2(data, num_negatives, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-2 row in {data!r} ({report.summary()})")
    device, rank, world = setup_distributed()
    compressor, decoder = build_models(model, base_model, opts, device)
    stage2_items(rows, compressor, decoder, report)  # counts truncations for the report
    _say(report.summary())
    compressor.eval()
    mine = list(range(rank, len(rows), world))  # under torchrun each process scores every world-th row
    ref_p, ref_n = compute_reference_scores(compressor, decoder, [rows[i] for i in mine], batch_size, opts.backend,
                                            progress and rank == 0)
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
               distance: str = "logprob", instruction: str | None = None):
    """Conditional distribution alignment from the stage-1 ``model`` (decoder: ``base_model``)."""
    rows, report = load_stage2(data, num_negatives, instruction)
    if not rows:
        raise ValueError(f"data: no usable stage-2 row in {data!r} ({report.summary()})")
    by_id = load_reference_scores(scores, rows)
    device, _, _ = setup_distributed()
    compressor, decoder = build_models(model, base_model, opts, device)
    items = stage2_items(rows, compressor, decoder, report, by_id)
    _say(report.summary())
    objective = Stage2Model(compressor, decoder, beta=beta, tau=tau, ref_sign=ref_sign, distance=distance,
                            backend=opts.backend)
    records = Trainer(objective, items, train).train()
    _export(compressor, os.path.join(train.output_dir, "model"), rows)
    return records, report
