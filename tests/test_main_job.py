"""The main job end to end at a toy size: every step runs and writes its outputs."""
import json
import os

import torch

from are_fast.main_job import MainJobConfig, run_main_job


def test_main_job_runs_every_step(tmp_path, capsys):
    threads = torch.get_num_threads()
    cfg = MainJobConfig(output_dir=str(tmp_path / "run"), hidden_size=16, layers=1, num_embed_tokens=2,
                        stage1_rows=64, stage2_rows=32, eval_rows=8, pretrain_steps=2, stage1_steps=2, stage2_steps=2,
                        batch_size=8, progress=False)
    try:
        summary = run_main_job(cfg)
    finally:
        torch.set_num_threads(threads)
    acc = summary["triplet_accuracy"]
    assert set(acc) == {"base model", "after stage 1", "after stage 2"}
    assert all(0.0 <= v <= 1.0 for sets in acc.values() for v in sets.values())
    assert all(set(sets) == {"hard negatives", "random negatives"} for sets in acc.values())
    assert {k: v["steps"] for k, v in summary["losses"].items()} == {"pretrain": 2, "stage1": 2, "stage2": 2}
    for path in ("loss_curves.png", "summary.json", "reference_scores.safetensors", "stage2/model/config.json"):
        assert os.path.isfile(os.path.join(cfg.output_dir, path)), path
    out = capsys.readouterr().out
    assert "on 16 held-out (q, pos, neg) triplets" in out and "after stage 2" in out
    with open(os.path.join(cfg.output_dir, "summary.json")) as f:
        assert json.load(f)["triplet_accuracy"] == acc
