"""The main job end to end at a toy size: every step runs and writes its outputs."""
import json
import os

import torch

from are_fast.toy.job import MainJobConfig, run_main_job
from are_fast.toy.picture import smooth
from are_fast.training.reporting import read_log


def test_main_job_runs_every_step(tmp_path, capsys):
    threads = torch.get_num_threads()
    cfg = MainJobConfig(output_dir=str(tmp_path / "run"), hidden_size=16, layers=1, num_embed_tokens=2,
                        stage1_rows=64, stage2_rows=32, eval_rows=8, pretrain_steps=2, stage1_steps=2, stage2_steps=2,
                        eval_steps=1, batch_size=8, progress=False)
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
    # The table is the held-out evaluations: before stage 1, at the end of stage 1, at the end of stage 2.
    s1, s2 = read_log(os.path.join(cfg.output_dir, "stage1"))[1], read_log(os.path.join(cfg.output_dir, "stage2"))[1]
    assert [r["step"] for r in s1] == [r["step"] for r in s2] == [0, 1, 2]
    for name, record in (("base model", s1[0]), ("after stage 1", s1[-1]), ("after stage 2", s2[-1])):
        assert acc[name] == {"hard negatives": record["eval_acc_hard"], "random negatives": record["eval_acc_random"]}
    assert s2[0]["eval_acc_hard"] == s1[-1]["eval_acc_hard"]  # stage 2 starts from the exported stage-1 model
    out = capsys.readouterr().out
    assert "on 16 held-out (q, pos, neg) triplets" in out and "after stage 2" in out
    assert f"picture  {os.path.join(cfg.output_dir, 'loss_curves.png')}" in out and "tokens/s" in out
    with open(os.path.join(cfg.output_dir, "summary.json")) as f:
        assert json.load(f)["triplet_accuracy"] == acc


def test_smoothing_is_a_centered_moving_average():
    assert smooth([3.0, 1.0, 2.0], 1) == [3.0, 1.0, 2.0]
    assert smooth([3.0, 1.0, 2.0, 6.0], 3) == [2.0, 2.0, 3.0, 4.0]  # fewer points at the ends
    values = smooth([float(i) for i in range(10)], 5)
    assert values[2:8] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # no lag on a trend
