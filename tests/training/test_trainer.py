"""The trainer: DDP equals gradient accumulation, exact resume, bucketing, LoRA."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from _helpers import rel_error

from are_fast.training.data import stage1_items
from are_fast.model import Stage1Model
from are_fast.toy.data import compression_rows, triplet_rows, write_jsonl
from are_fast.training.jobs import ModelOptions, build_models, run_reference_scores
from are_fast.training.refscores import compute_reference_scores, load_reference_scores
from are_fast.training.trainer import BucketedBatches, Trainer, TrainConfig


def _trainer(base, output_dir, rows=24, lora=0, evaluator=None, **config):
    compressor, decoder = build_models(base, base, ModelOptions(num_embed_tokens=2, lora_rank=lora))
    items = stage1_items(compression_rows(rows, seed=1), compressor, decoder)
    cfg = TrainConfig(**{"output_dir": str(output_dir), "lr": 1e-3, "warmup_steps": 1, "progress": False,
                         "bucket_window": 2, **config})
    return Trainer(Stage1Model(compressor, decoder), items, cfg, evaluator=evaluator)


def _grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer.core.named_parameters() if p.requires_grad}


def _ddp_worker(rank, port, base, out, result, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = _trainer(base, out, max_steps=1, batch_size=3, grad_accum=1)
    record = trainer.train()[0]
    if rank == 0:
        save_file(_grads(trainer), result)
        with open(result + ".json", "w") as f:
            json.dump(record, f)
    # The reference-score job shards rows over the processes and gathers them in order.
    run_reference_scores(data, base, base, result + ".scores", 2, ModelOptions(num_embed_tokens=2),
                         batch_size=2, progress=False)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_equals_single_process_accumulation(tiny_dir, tmp_path):
    """(c) one DDP step, 2 gloo processes x 1 micro-batch == one process x 2 accumulated micro-batches; the
    reference scores computed by 2 processes == one process's."""
    result, data = str(tmp_path / "ddp.safetensors"), str(tmp_path / "triplets.jsonl")
    write_jsonl(data, triplet_rows(5, 2))
    mp.spawn(_ddp_worker, args=(_free_port(), tiny_dir, str(tmp_path / "ddp"), result, data), nprocs=2, join=True)
    single = _trainer(tiny_dir, tmp_path / "single", max_steps=1, batch_size=3, grad_accum=2)
    record = single.train()[0]
    ddp_grads = load_file(result)
    with open(result + ".json") as f:
        ddp_record = json.load(f)
    assert ddp_grads.keys() == _grads(single).keys()
    for name, grad in _grads(single).items():
        assert rel_error(ddp_grads[name], grad) <= 1e-5, name
    assert abs(ddp_record["loss"] - record["loss"]) <= 1e-5 * abs(record["loss"])
    assert abs(ddp_record["grad_norm"] - record["grad_norm"]) <= 1e-5 * record["grad_norm"]
    compressor, decoder = build_models(tiny_dir, tiny_dir, ModelOptions(num_embed_tokens=2))
    expected = compute_reference_scores(compressor, decoder, triplet_rows(5, 2), batch_size=2, progress=False)
    scores = load_reference_scores(result + ".scores", triplet_rows(5, 2))
    for i, row in enumerate(triplet_rows(5, 2)):
        assert scores[row["id"]][0] == pytest.approx(float(expected[0][i]), rel=1e-5)
        assert scores[row["id"]][1] == pytest.approx(expected[1][i].tolist(), rel=1e-5)


def test_resume_continues_the_exact_loss_sequence(tiny_dir, tmp_path):
    """(d) a run stopped after a checkpoint and resumed logs the same losses as an uninterrupted run."""
    full = _trainer(tiny_dir, tmp_path / "run", max_steps=8, batch_size=4, grad_accum=2, save_every=3,
                    keep_checkpoints=5)
    expected = [r["loss"] for r in full.train()]
    for later in ("step-00000006", "step-00000008"):  # as if killed after step 5: the last checkpoint is step 3
        shutil.rmtree(tmp_path / "run" / later)
    resumed = _trainer(tiny_dir, tmp_path / "run", max_steps=8, batch_size=4, grad_accum=2, save_every=3)
    records = resumed.train()
    assert [r["step"] for r in records] == list(range(4, 9))  # step 3 ends mid-epoch: the data position resumes
    assert [r["loss"] for r in records] == expected[3:]  # bit-identical
    with open(tmp_path / "run" / "loss.jsonl") as f:
        assert [json.loads(line)["loss"] for line in f] == expected


def test_bucketed_batches_are_deterministic_and_disjoint():
    lengths = [(i * 37) % 50 for i in range(40)]
    one = BucketedBatches(lengths, 4, seed=3, window=2)
    assert one.epoch(0) == BucketedBatches(lengths, 4, seed=3, window=2).epoch(0)
    assert one.epoch(0) != one.epoch(1)
    assert sorted(i for b in one.epoch(0) for i in b) == list(range(40))
    ranks = [BucketedBatches(lengths, 4, seed=3, window=2, rank=r, world_size=2).epoch(0) for r in range(2)]
    assert ranks[0] + ranks[1] and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    assert ranks[0] == one.epoch(0)[0::2] and ranks[1] == one.epoch(0)[1::2]
    for batch in one.epoch(0):  # within a window, rows are sorted by length
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BucketedBatches([1, 2], 4, seed=0)


def test_lora_trains_adapters_and_new_token_rows_only(tiny_dir, tmp_path):
    pytest.importorskip("peft", reason="LoRA is optional and needs peft")
    trainer = _trainer(tiny_dir, tmp_path / "lora", max_steps=2, batch_size=4, lora=4)
    records = trainer.train()
    names = [n for n, p in trainer.core.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
