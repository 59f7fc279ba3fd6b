"""Checkpoints that resume a run exactly: ``step-NNNNNNNN/`` written atomically with the trainable weights and
AdamW state (safetensors, keyed by parameter name), every rank's RNG, and ``state.json`` (step, data position,
scheduler, scaler, config, fingerprint). Full unsharded tensors for plain, DDP and FSDP models; a damaged
checkpoint is reported by name, never loaded half-way."""
from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Finished checkpoint directories in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("step-") and not n.endswith(".tmp"))
    return [os.path.join(output_dir, n) for n in names if os.path.isfile(os.path.join(output_dir, n, "state.json"))]


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict, scalars: dict, groups: list) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(scalars.items()):
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, data_state: dict, config: dict,
                    keep: int = 2, fingerprint: dict | None = None, scaler=None) -> str:
    """Write checkpoint ``step`` of ``model`` (plain, DDP or FSDP) on every rank's behalf; keep the last ``keep``."""
    final = os.path.join(output_dir, f"step-{step:08d}")
    tmp = final + ".tmp"
    try:
        _write_checkpoint(tmp, step, model, optimizer, scheduler, data_state, config, fingerprint, scaler)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        raise
    rank = _rank()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def _write_checkpoint(tmp: str, step: int, model, optimizer, scheduler, data_state: dict, config: dict,
                      fingerprint: dict | None, scaler=None) -> None:
    rank = _rank()
    model_sd = get_model_state_dict(model, options=_OPTIONS)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    python_rng = random.getstate()
    with open(os.path.join(tmp, f"python-rng-rank{rank}.json"), "w") as f:
        json.dump([python_rng[0], list(python_rng[1]), python_rng[2]], f)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(tmp, "model.safetensors"))
        tensors, scalars = _flatten_optimizer(optim_sd)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "data": data_state, "scheduler": scheduler.state_dict(), "optimizer_scalars": scalars,
                 "param_groups": optim_sd["param_groups"], "config": config, "fingerprint": fingerprint,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                 "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    if dist.is_initialized():
        dist.barrier()


def _damaged(path: str, err) -> ValueError:
    return ValueError(f"checkpoint {path!r} is damaged ({err}); delete it to resume from the one before, or "
                      "--restart to start over")


def read_checkpoint_state(path: str) -> dict:
    """The ``state.json`` of checkpoint ``path``; ValueError naming it when it is unreadable."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json has no step")
        return state
    except (OSError, ValueError) as err:
        raise _damaged(path, err) from None


def load_checkpoint(path: str, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore model, optimizer, scheduler, fp16 gradient scaler and RNG from ``path``; return its state (step,
    data position)."""
    state = read_checkpoint_state(path)
    try:
        return _restore(path, state, model, optimizer, scheduler, scaler)
    except (OSError, KeyError, RuntimeError) as err:  # missing files, keys or tensors of another shape
        raise _damaged(path, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise _damaged(path, err) from None


def _restore(path: str, state: dict, model, optimizer, scheduler, scaler=None) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state["world_size"] != world:
        raise ValueError(f"checkpoint {path!r} was written by {state['world_size']} processes, this run has {world}: "
                         "the data order would differ, so the resume would not be exact")
    set_model_state_dict(model, load_file(os.path.join(path, "model.safetensors")),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    osd = _unflatten_optimizer(load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer_scalars"],
                               state["param_groups"])
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rank = _rank()
    rng = load_file(os.path.join(path, f"rng-rank{rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    with open(os.path.join(path, f"python-rng-rank{rank}.json")) as f:
        version, internal, gauss = json.load(f)
    random.setstate((version, tuple(internal), gauss))
    return state
