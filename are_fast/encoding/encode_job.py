"""The resumable file-to-shards job behind ``are-fast encode``: rows of .jsonl, .txt or .parquet (``readers``)
into shards of embeddings and row ids, each file written atomically, a record per shard, then ``manifest.json``;
a rerun resumes, ranks under torchrun take every WORLD_SIZE-th shard. Bad rows are skipped and reported.
README "Encoding" has the file format, "Faults" the endings."""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..runtime import RunFailure, StopSignals, check_writable, run_guarded, writing, written_atomically
from ..model.directory import inspect_model_dir, model_fingerprint, resolve_num_embed_tokens
from . import readers
from .defaults import NORMALIZE

SHARD_FORMATS = ("safetensors", "npy")
MANIFEST = "manifest.json"
_MAX_REPORTED = 20  # bad rows printed per process; all of them are in the shard records
_BARRIER_TIMEOUT = datetime.timedelta(days=2)  # ranks wait at the end for the slowest one


class JobError(RunFailure):
    """The job failed at run time (exit 1; the message says why)."""


@dataclass
class JobConfig:
    """Everything ``are-fast encode`` takes (see ``are_fast.cli.encode`` for each option's help)."""

    model: str
    input: str
    output: str
    field: str = "text"
    input_format: str | None = None
    instruction: str | None = None  # None: the folder's default prompt ("" for none; see encoding.defaults)
    shard_size: int = 10000
    shard_format: str = "safetensors"
    max_length: int | None = None  # None: the folder's (else 512), as Encoder.from_pretrained
    max_tokens: int | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    normalize: bool = NORMALIZE
    progress: bool = True
    num_embed_tokens: int | None = None  # k; None: the model's <EMBED*> tokens
    max_bad_fraction: float = 0.5  # more bad rows than this fraction: exit 2
    overwrite: bool = False  # replace another job's files in ``output`` instead of refusing


@dataclass
class _Shard:
    index: int
    first_row: int
    raws: list
    row_ids: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # list[readers.BadRow]


@dataclass
class _Plan:
    info: readers.InputInfo
    identity: dict
    job_id: str
    num_shards: int
    finished: set


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _test_kill(point: str, shard: int) -> None:
    # Test hook: ARE_FAST_ENCODE_KILL_AT="<point>:<shard>" SIGKILLs the process there (the resume tests).
    if os.environ.get("ARE_FAST_ENCODE_KILL_AT") == f"{point}:{shard}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: str, data: bytes, shard: int = -1) -> None:
    """Write ``data`` to a temporary file, flush it to disk, then rename it over ``path``."""
    with written_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _test_kill("tmp", shard)


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _shard_files(index: int, shard_format: str) -> tuple[list[str], str]:
    stem = f"shard-{index:05d}"
    data = [f"{stem}.safetensors"] if shard_format == "safetensors" else [f"{stem}.npy", f"{stem}.rows.npy"]
    return data, f"{stem}.json"


def _read_record(output: str, index: int, shard_format: str) -> dict | None:
    path = os.path.join(output, _shard_files(index, shard_format)[1])
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _remove_job_files(output: str) -> int:
    """--overwrite: remove the files this job writes (shards, records, manifest, temporaries); others stay."""
    removed = 0
    for name in os.listdir(output):
        if name.startswith(("shard-", MANIFEST)):  # shards, records, the manifest and their temporaries
            os.remove(os.path.join(output, name))
            removed += 1
    return removed


def _plan(cfg: JobConfig, dtype: str, k: int) -> _Plan:
    """Rank 0's look at the input and the output folder: what the job is and which shards are done."""
    info = readers.scan(cfg.input, cfg.input_format, cfg.field)
    identity = {  # what the embeddings depend on; paths are recorded in the manifest but may move
        "model": model_fingerprint(cfg.model), "num_embed_tokens": k, "input_sha256": info.sha256,
        "input_format": info.format,
        "field": info.field, "instruction": cfg.instruction, "normalize": cfg.normalize,
        "max_length": cfg.max_length, "dtype": dtype, "shard_size": cfg.shard_size, "shard_format": cfg.shard_format,
    }
    job_id = hashlib.sha256(_dumps(identity)).hexdigest()[:16]
    os.makedirs(cfg.output, exist_ok=True)
    num_shards = -(-info.rows // cfg.shard_size)
    other = _other_job(cfg, job_id, num_shards)
    if other and cfg.overwrite:
        _log(f"{cfg.output}: --overwrite: removed {_remove_job_files(cfg.output)} files of another job")
    elif other:
        raise ValueError(f"output: {cfg.output!r} holds {other} of another job (other model, input or settings); "
                         "choose another --output folder, or --overwrite to replace it")
    finished = set()
    for index in range(num_shards):
        record = _read_record(cfg.output, index, cfg.shard_format)
        if record is None:
            continue
        sizes = record["files"]
        if all(os.path.isfile(os.path.join(cfg.output, n)) and os.path.getsize(os.path.join(cfg.output, n)) == s
               for n, s in sizes.items()):
            finished.add(index)
    return _Plan(info, identity, job_id, num_shards, finished)


def _other_job(cfg: JobConfig, job_id: str, num_shards: int) -> str | None:
    """What of another job the output folder holds ("the result", "shards"), or None."""
    try:
        with open(os.path.join(cfg.output, MANIFEST), encoding="utf-8") as f:
            if json.load(f).get("job") != job_id:
                return "the result"
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return "a damaged manifest.json"
    names = [n for n in os.listdir(cfg.output) if n.startswith("shard-") and n.endswith(".json")]
    for name in names:
        try:
            with open(os.path.join(cfg.output, name), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return f"a damaged shard record {name}"
        if record.get("job") != job_id or record.get("shard", num_shards) >= num_shards:
            return "shards"
    return None


def _shards(plan: _Plan, shard_size: int, mine) -> Iterator[_Shard]:
    """The shards this process encodes, with their raw rows; the other shards' rows are read past undecoded."""
    raw = readers.iter_raw(plan.info)
    for index in range(plan.num_shards):
        rows = list(islice(raw, shard_size))
        if mine(index) and index not in plan.finished:
            yield _Shard(index, index * shard_size, rows)


def _decode(info: readers.InputInfo, shard: _Shard) -> list[str]:
    """Runs in the encoder's background thread: the shard's texts, its row ids and bad rows set aside."""
    texts = []
    for offset, raw in enumerate(shard.raws):
        text = readers.decode(info, shard.first_row + offset, raw)
        if isinstance(text, readers.BadRow):
            shard.bad.append(text)
        else:
            shard.row_ids.append(shard.first_row + offset)
            texts.append(text)
    shard.raws = []
    return texts


def _write_shard(cfg: JobConfig, plan: _Plan, shard: _Shard, embeddings: np.ndarray, tokens: int,
                 truncated: int) -> None:
    names, record_name = _shard_files(shard.index, cfg.shard_format)
    row_ids = np.asarray(shard.row_ids, dtype=np.int64)
    if cfg.shard_format == "safetensors":
        from safetensors.numpy import save

        blobs = [save({"embeddings": embeddings, "row_ids": row_ids}, metadata={"job": plan.job_id})]
    else:
        blobs = []
        for array in (embeddings, row_ids):
            buffer = io.BytesIO()
            np.save(buffer, array)
            blobs.append(buffer.getvalue())
    _test_kill("computed", shard.index)
    for name, blob in zip(names, blobs):
        _write_atomic(os.path.join(cfg.output, name), blob, shard.index)
    _test_kill("data", shard.index)
    record = {
        "job": plan.job_id, "shard": shard.index, "first_row": shard.first_row,
        "end_row": min(shard.first_row + cfg.shard_size, plan.info.rows), "embedded": len(row_ids),
        "tokens": tokens, "truncated": truncated, "files": {n: len(b) for n, b in zip(names, blobs)},
        "bad_rows": [{"row": b.row, "line": b.row + 1, "reason": b.reason, "detail": b.detail} for b in shard.bad],
    }
    _write_atomic(os.path.join(cfg.output, record_name), _dumps(record), shard.index)
    _test_kill("record", shard.index)


def _write_manifest(cfg: JobConfig, plan: _Plan, encoder) -> dict:
    records = [_read_record(cfg.output, i, cfg.shard_format) for i in range(plan.num_shards)]
    missing = [i for i, r in enumerate(records) if r is None or r.get("job") != plan.job_id]
    if missing:
        raise JobError(f"shards {missing[:10]} are missing after all ranks finished; rerun to complete them")
    bad = [b for r in records for b in r["bad_rows"]]
    manifest = {
        "job": plan.job_id,
        "model": {"path": os.path.abspath(cfg.model), "fingerprint": plan.identity["model"],
                  "num_embed_tokens": encoder.num_embed_tokens, "hidden_size": encoder.hidden_size,
                  "dtype": plan.identity["dtype"], "max_length": cfg.max_length},
        "input": {"path": plan.info.path, "format": plan.info.format, "field": plan.info.field,
                  "sha256": plan.info.sha256, "bytes": plan.info.size, "rows": plan.info.rows},
        "instruction": cfg.instruction, "normalize": cfg.normalize,
        "shard_size": cfg.shard_size, "shard_format": cfg.shard_format,
        "rows": {"total": plan.info.rows, "embedded": sum(r["embedded"] for r in records), "bad": len(bad),
                 "truncated": sum(r["truncated"] for r in records)},
        "bad_rows_by_reason": dict(sorted(Counter(b["reason"] for b in bad).items())),
        "bad_rows_first": bad[:100],
        "tokens": sum(r["tokens"] for r in records),
        "shards": [{"index": i, "first_row": r["first_row"], "end_row": r["end_row"], "embedded": r["embedded"],
                    "files": sorted(r["files"]), "record": _shard_files(i, cfg.shard_format)[1]}
                   for i, r in enumerate(records)],
    }
    _write_atomic(os.path.join(cfg.output, MANIFEST), _dumps(manifest))
    return manifest


def read_embeddings(output: str) -> tuple[np.ndarray, np.ndarray]:
    """A finished job's output folder -> (row_ids [n] int64, embeddings [n, H] float32), in input order."""
    with open(os.path.join(output, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    ids, embs = [], []
    for shard in manifest["shards"]:
        files = [os.path.join(output, name) for name in shard["files"]]
        if manifest["shard_format"] == "safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(files[0])
            ids.append(tensors["row_ids"])
            embs.append(tensors["embeddings"])
        else:
            rows_file = next(f for f in files if f.endswith(".rows.npy"))
            ids.append(np.load(rows_file))
            embs.append(np.load(next(f for f in files if f != rows_file)))
    hidden = manifest["model"]["hidden_size"]
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64),
            np.concatenate(embs) if embs else np.zeros((0, hidden), np.float32))


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _check_config(cfg: JobConfig) -> None:
    if cfg.shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard_format: expected one of {SHARD_FORMATS}, got {cfg.shard_format!r}")
    for name in ("shard_size", "max_length", "max_tokens", "batch_size", "num_embed_tokens"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction: expected a fraction in [0, 1], got {cfg.max_bad_fraction!r}")


def run_job(cfg: JobConfig) -> int:
    """Run (or resume) the job; returns the exit code. Under torchrun, ranks share the shards round-robin."""
    rank, world, local_rank = _world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
    try:
        return run_guarded("encode", lambda: _run(cfg, rank, world, local_rank),
                           "the finished shards are kept: rerun the same command to resume")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: JobConfig, rank: int, world: int, local_rank: int) -> int:
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from .encoder import Encoder

    _check_config(cfg)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    check_writable(cfg.output, "output")
    k = resolve_num_embed_tokens(inspect_model_dir(cfg.model, "model"), cfg.num_embed_tokens)
    device = cfg.device
    if device in (None, "cuda") and world > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # one GPU per rank
    encoder = Encoder.from_pretrained(cfg.model, device, cfg.dtype, max_length=cfg.max_length or "auto",
                                      num_embed_tokens=k, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
    # The defaults resolved as Encoder.encode resolves them (encoding.defaults); the job's identity holds these.
    cfg = replace(cfg, instruction=encoder.resolve_prompt(prompt=cfg.instruction), max_length=encoder.max_length)
    dtype = str(encoder.dtype).removeprefix("torch.")
    plan: object = None
    if rank == 0:
        try:
            plan = _plan(cfg, dtype, k)
        except (ValueError, OSError) as err:
            plan = err
    if world > 1:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if isinstance(plan, Exception):
        raise plan
    assert isinstance(plan, _Plan)

    def mine(index: int) -> bool:
        return index % world == rank

    todo = [i for i in range(plan.num_shards) if mine(i) and i not in plan.finished]
    todo_rows = sum(min(cfg.shard_size, plan.info.rows - i * cfg.shard_size) for i in todo)
    if rank == 0 and plan.finished:
        _log(f"resuming: {len(plan.finished)} of {plan.num_shards} shards already done")

    start, texts_done, tokens_done, reported = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=todo_rows, unit="text", desc=f"encode (rank {rank}/{world})" if world > 1 else "encode",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)

    def on_batch(texts: int, tokens: int) -> None:
        nonlocal texts_done, tokens_done
        if stop.requested:  # the shard being computed is dropped; the finished ones stay
            done_shards = len(plan.finished) + written
            raise stop.interrupted(f"with {done_shards} of {plan.num_shards} shards finished (kept)")
        texts_done += texts
        tokens_done += tokens
        bar.update(texts)
        bar.set_postfix_str(f"{tokens_done / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)

    written = 0
    with bar, StopSignals() as stop:
        chunks = encoder.encode_chunks(_shards(plan, cfg.shard_size, mine), lambda s: _decode(plan.info, s),
                                       instruction=cfg.instruction, normalize=cfg.normalize, on_batch=on_batch)
        for done in chunks:
            shard = done.source
            for bad in shard.bad:
                if reported < _MAX_REPORTED:
                    where = "record" if plan.info.format == "parquet" else "line"
                    _log(f"{where} {bad.row + 1}: skipped, {bad.detail}")
                elif reported == _MAX_REPORTED:
                    _log("further bad rows are listed in the shard records and counted in the manifest")
                reported += 1
            if done.truncated:
                _log(f"shard {shard.index}: {done.truncated} texts cut to {cfg.max_length} tokens")
            with writing(f"writing shard {shard.index} to {cfg.output}",
                         "the finished shards are kept: rerun the same command to resume"):
                _write_shard(cfg, plan, shard, done.embeddings.numpy(), done.tokens, done.truncated)
            written += 1
            bar.update(len(shard.bad))
    seconds = time.perf_counter() - start
    if todo:
        _log(f"rank {rank}: {texts_done} texts, {tokens_done} tokens in {seconds:.1f} s: "
             f"{texts_done / seconds:,.1f} texts/s, {tokens_done / seconds:,.0f} tokens/s")
    if world > 1:
        dist.barrier()
    if rank != 0:
        return 0
    with writing(f"writing {MANIFEST} to {cfg.output}", "the shards are kept: rerun the same command to finish"):
        manifest = _write_manifest(cfg, plan, encoder)
    rows = manifest["rows"]
    _log(f"{os.path.join(cfg.output, MANIFEST)}: {rows['total']} rows, {rows['embedded']} embedded, "
         f"{rows['bad']} bad, {rows['truncated']} truncated")
    if rows["embedded"] == 0:
        why = "the input has no rows" if rows["total"] == 0 else "see the bad rows above"
        raise ValueError(f"no row could be embedded ({why})")
    if rows["bad"] > cfg.max_bad_fraction * rows["total"]:
        raise ValueError(f"{rows['bad']} of {rows['total']} rows are bad, more than --max-bad-fraction "
                         f"{cfg.max_bad_fraction:g} (wrong --field or file?); by reason: "
                         f"{manifest['bad_rows_by_reason']}; the embeddings of the good rows are written")
    return 0
