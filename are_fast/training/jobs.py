"""The jobs behind the CLI: stage 1, reference scores, stage 2. Each reads a data file, builds the models,
and writes a Hugging Face model directory (``<output_dir>/model``) or a score file, plus ``loss.jsonl``.

Before any work each job checks its output folder (a write probe), its data (bad rows under
``max_bad_fraction``) and its models (``model.directory``: config, weights, a usable tokenizer, k); what
determines a training run goes into its fingerprint (``runstate.py``), so a resume continues only the same run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .data import DEFAULT_MAX_BAD_FRACTION, check_usable, load_stage1, load_stage2, stage1_items, stage2_items
from ..runtime import StopSignals, check_writable, writing
from ..model import Compressor, FrozenDecoder, Stage1Model, Stage2Model
from ..model.architecture import AUTO
from ..model.directory import inspect_model_dir, resolve_num_embed_tokens
from ..model.layout import flash_attention_available
from ..model.st_files import instruction_prompts, write_sentence_transformers_files
from .evaluate import HeldOut, load_triplets, stage1_evaluator, stage2_evaluator
from .refscores import compute_reference_scores, load_reference_scores, save_reference_scores, scored_with
from .trainer import Trainer, TrainConfig, setup_distributed


@dataclass
class ModelOptions:
    """How the compressor and the decoder are loaded and run."""

    num_embed_tokens: int | None = None  # k; None: the model's own <EMBED*> count (a base LM for stage 1: 5)
    max_text_tokens: int | None = None  # None: 512, or what the model's positions leave (architecture.token_limit)
    max_target_tokens: int | None = None
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
    compressor = Compressor.from_pretrained(compressor_dir, opts.num_embed_tokens,
                                            max_text_tokens=opts.max_text_tokens or AUTO, route=opts.route, **common)
    decoder = FrozenDecoder.from_pretrained(decoder_dir, num_embed_tokens=compressor.num_embed_tokens,
                                            max_target_tokens=opts.max_target_tokens or AUTO, route=opts.route,
                                            checkpointing=opts.checkpointing, **common)
    if opts.checkpointing:
        compressor.enable_checkpointing()
    if opts.lora_rank:
        from ..model.lora import apply_lora

        apply_lora(compressor, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
    return compressor, decoder


# ModelOptions fields that change what a run computes (not: attention kernel, checkpointing, backend).
_IDENTITY_OPTIONS = ("num_embed_tokens", "max_text_tokens", "max_target_tokens", "dtype", "lora_rank", "lora_alpha",
                     "lora_dropout")


def _checked_models(opts: ModelOptions, compressor: tuple, decoder: tuple, default_k: int | None):
    """Check both model directories ((path, option name) each) and resolve k; return (opts with k, identity)."""
    comp = inspect_model_dir(compressor[0], compressor[1], opts.trust_remote_code)
    dec = comp if decoder[0] == compressor[0] else inspect_model_dir(decoder[0], decoder[1], opts.trust_remote_code)
    opts = replace(opts, num_embed_tokens=resolve_num_embed_tokens(comp, opts.num_embed_tokens, default_k))
    identity = {compressor[1]: comp.fingerprint, decoder[1]: dec.fingerprint}
    identity.update({name: getattr(opts, name) for name in _IDENTITY_OPTIONS})
    return opts, identity


def _export(compressor: Compressor, path: str, rows: list[dict]) -> None:
    from torch.distributed.tensor import DTensor

    # Under --fsdp the body's weights are shards: every process takes part in gathering them, rank 0 writes.
    state = compressor.backbone.state_dict()
    full = ({name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state.items()}
            if any(isinstance(t, DTensor) for t in state.values()) else None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with writing(f"writing the model to {path}", "the checkpoints are kept: rerun the same command to export"):
            compressor.save_pretrained(path, state_dict=full)
            # sentence-transformers files: the folder loads as SentenceTransformer(path), the instruction as its prompt
            write_sentence_transformers_files(path, compressor, **instruction_prompts(r["instruction"] for r in rows))
    if dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def run_stage1(data: str, base_model: str, train: TrainConfig, opts: ModelOptions, instruction: str | None = None,
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, held_out: HeldOut | None = None):
    """Information compression from ``base_model``; writes ``<output_dir>/model``. Returns (records, report).
    ``held_out``: rows for the held-out loss (and triplets for triplet accuracy) every ``train.eval_steps``."""
    check_writable(train.output_dir, "output-dir")
    rows, report = load_stage1(data, instruction)
    check_usable(rows, report, max_bad_fraction, "stage-1 ")
    held_out = held_out or HeldOut()
    rows, eval_rows = held_out.split(rows, lambda path: load_stage1(path, instruction), train.seed)
    triplets = load_triplets(held_out.triplets, instruction) if held_out.triplets else None
    opts, identity = _checked_models(opts, (base_model, "base-model"), (base_model, "base-model"), default_k=5)
    device, _, _ = setup_distributed(train.device)
    compressor, decoder = build_models(base_model, base_model, opts, device)
    items = stage1_items(rows, compressor, decoder, report)
    _say(report.summary())
    objective = Stage1Model(compressor, decoder, opts.backend)
    evaluator = stage1_evaluator(objective, eval_rows, triplets, held_out.batch_size, train.seed) \
        if eval_rows or triplets else None
    identity.update(job="stage1", data_sha256=report.sha256, instruction=instruction,
                    eval_data=held_out.data, eval_fraction=held_out.fraction)
    records = Trainer(objective, items, train, identity, evaluator).train()
    _export(compressor, os.path.join(train.output_dir, "model"), rows)
    return records, report


def run_reference_scores(data: str, model: str, base_model: str, output: str, num_negatives: int,
                         opts: ModelOptions, batch_size: int = 32, instruction: str | None = None, progress=True,
                         max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, device: str | None = None,
                         log_interval: float = 30.0):
    """Score every stage-2 row with the stage-1 ``model`` and the frozen ``base_model``; write ``output``."""
    check_writable(os.path.dirname(os.path.abspath(output)), "output")
    rows, report = load_stage2(data, num_negatives, instruction)
    check_usable(rows, report, max_bad_fraction, "stage-2 ")
    opts, identity = _checked_models(opts, (model, "model"), (base_model, "base-model"), default_k=None)
    device, rank, world = setup_distributed(device)
    compressor, decoder = build_models(model, base_model, opts, device)
    stage2_items(rows, compressor, decoder, report)  # counts truncations for the report
    _say(report.summary())
    compressor.eval()
    mine = list(range(rank, len(rows), world))  # under torchrun each process scores every world-th row
    with StopSignals() as stop:
        ref_p, ref_n = compute_reference_scores(compressor, decoder, [rows[i] for i in mine], batch_size, opts.backend,
                                                progress and rank == 0, stop, log_interval)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, ref_p, ref_n))
        ref_p, ref_n = torch.empty(len(rows)), torch.empty(len(rows), num_negatives)
        for index, p, n in parts:
            ref_p[index], ref_n[index] = p, n
    if rank == 0:
        with writing(f"writing the reference scores to {output}", "nothing was written; rerun the same command"):
            provenance = {"model": identity["model"], "k": opts.num_embed_tokens,
                          "max_text_tokens": opts.max_text_tokens, "max_target_tokens": opts.max_target_tokens}
            save_reference_scores(output, rows, ref_p, ref_n, provenance)
    if world > 1:
        dist.barrier()
    return ref_p, ref_n, report


def run_stage2(data: str, scores: str, model: str, base_model: str, train: TrainConfig, opts: ModelOptions,
               num_negatives: int, beta: float = 0.1, tau: float = 0.1, ref_sign: float = 1.0,
               distance: str = "logprob", instruction: str | None = None,
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, held_out: HeldOut | None = None):
    """Conditional distribution alignment from the stage-1 ``model`` (decoder: ``base_model``). ``held_out``:
    rows for the held-out loss and triplet accuracy every ``train.eval_steps``."""
    check_writable(train.output_dir, "output-dir")
    rows, report = load_stage2(data, num_negatives, instruction)
    check_usable(rows, report, max_bad_fraction, "stage-2 ")
    held_out = held_out or HeldOut()
    if held_out.triplets:
        raise ValueError("eval_triplets: stage 2 evaluates triplet accuracy on its own held-out rows (eval_data or "
                         "eval_fraction)")
    rows, eval_rows = held_out.split(rows, lambda path: load_stage2(path, num_negatives, instruction), train.seed)
    opts, identity = _checked_models(opts, (model, "model"), (base_model, "base-model"), default_k=None)
    by_id = load_reference_scores(scores, rows)
    scores_model = scored_with(scores).get("model")
    if scores_model not in (None, identity["model"]):
        raise ValueError(f"scores: {scores!r} were computed with another --model than {model!r}; rerun ref-scores "
                         "with this model")
    device, _, _ = setup_distributed(train.device)
    compressor, decoder = build_models(model, base_model, opts, device)
    items = stage2_items(rows, compressor, decoder, report, by_id)
    _say(report.summary())
    objective = Stage2Model(compressor, decoder, beta=beta, tau=tau, ref_sign=ref_sign, distance=distance,
                            backend=opts.backend)
    evaluator = stage2_evaluator(objective, eval_rows, held_out.batch_size, train.seed, opts.backend) \
        if eval_rows else None
    identity.update(job="stage2", data_sha256=report.sha256, instruction=instruction, num_negatives=num_negatives,
                    beta=beta, tau=tau, ref_sign=ref_sign, distance=distance, scores_model=scores_model,
                    eval_data=held_out.data, eval_fraction=held_out.fraction)
    records = Trainer(objective, items, train, identity, evaluator).train()
    _export(compressor, os.path.join(train.output_dir, "model"), rows)
    return records, report
