"""FSDP2 (``--fsdp``) on CPU: a 2-process gloo stage-2 step equals one process's accumulated step."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from _helpers import rel_error

from are_fast.training.data import stage2_items
from are_fast.model import Stage2Model
from are_fast.toy.data import triplet_rows
from are_fast.model import load_compressor
from are_fast.training.jobs import ModelOptions, _export, build_models
from are_fast.training.trainer import Trainer, TrainConfig

ROWS, NEGATIVES = 6, 2


def _trainer(base, output_dir, **config):
    """A stage-2 trainer on toy triplets with fixed random reference scores (identical in every process)."""
    compressor, decoder = build_models(base, base, ModelOptions(num_embed_tokens=2))
    rows = triplet_rows(ROWS, NEGATIVES)
    gen = torch.Generator().manual_seed(0)
    scores = {r["id"]: (float(torch.randn(1, generator=gen)), torch.randn(NEGATIVES, generator=gen).tolist())
              for r in rows}
    items = stage2_items(rows, compressor, decoder, scores=scores)
    cfg = TrainConfig(output_dir=str(output_dir), lr=1e-2, warmup_steps=0, progress=False, bucket_window=2,
                      max_steps=1, batch_size=3, **config)
    return Trainer(Stage2Model(compressor, decoder), items, cfg)


def _trained_weights(trainer) -> dict:
    """Full (unsharded) trainable weights after the step, on the CPU."""
    out = {}
    for name, p in trainer.core.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone()
    return out


def _fsdp_worker(rank, port, base, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = _trainer(base, out, fsdp=True, grad_accum=1)
    from torch.distributed.tensor import DTensor, Shard

    trainable = [p for p in trainer.core.parameters() if p.requires_grad]
    assert trainable and all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in trainable)
    record = trainer.train()[0]
    weights = _trained_weights(trainer)  # a collective: every rank takes part
    _export(trainer.core.compressor, os.path.join(out, "model"), triplet_rows(ROWS, NEGATIVES))  # gathers the shards too
    if rank == 0:
        save_file(weights, result)
        with open(result + ".json", "w") as f:
            json.dump(record, f)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_step_equals_single_process_accumulation(tiny_dir, tmp_path):
    """One FSDP2 step, 2 gloo processes x 1 micro-batch of 3 rows == one process x 2 accumulated micro-batches:
    the same loss, gradient norm and updated weights (every parameter sharded across the two processes)."""
    result = str(tmp_path / "fsdp.safetensors")
    mp.spawn(_fsdp_worker, args=(_free_port(), tiny_dir, str(tmp_path / "fsdp"), result), nprocs=2, join=True)
    single = _trainer(tiny_dir, tmp_path / "single", grad_accum=2)
    before = _trained_weights(single)
    record = single.train()[0]
    expected = _trained_weights(single)
    got = load_file(result)
    with open(result + ".json") as f:
        fsdp_record = json.load(f)
    assert got.keys() == expected.keys()
    moved = 0
    for name, weight in expected.items():
        assert rel_error(got[name], weight) <= 1e-5, name
        moved += not torch.equal(weight, before[name])
    assert moved == len(expected)  # the step changed every trainable weight, so the comparison means something
    assert abs(fsdp_record["loss"] - record["loss"]) <= 1e-5 * abs(record["loss"])
    assert abs(fsdp_record["grad_norm"] - record["grad_norm"]) <= 1e-5 * record["grad_norm"]
    # The checkpoint holds full tensors under the plain names, whatever the wrapping, and so does the model export.
    saved = load_file(str(tmp_path / "fsdp" / "step-00000001" / "model.safetensors"))
    assert saved.keys() == got.keys() and all(torch.equal(saved[n], got[n]) for n in got)
    exported = load_compressor(str(tmp_path / "fsdp" / "model")).state_dict()
    assert all(torch.equal(exported[n.removeprefix("compressor.")], got[n]) for n in got)
