"""Training on CPU in bf16: ``--dtype bfloat16`` (bf16 weights) and ``--bf16`` (autocast over float32 weights) run
stage 1, the reference scores and stage 2 with every LM-head op on the online sweep in bf16, not on the
chunk driver's float32 copy of the head, and give finite losses."""
import json
import os

import pytest
import torch

from are_fast.cli import main
from are_fast.ops import head_matmuls, sweep_precision
from are_fast.toy.data import compression_rows, tiny_llama, triplet_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--bf16"]], ids=["dtype", "autocast"])
def test_stages_run_the_head_in_bf16(flags, tmp_path):
    base, s1, s2 = str(tmp_path / "base"), str(tmp_path / "s1"), str(tmp_path / "s2")
    tiny_llama(base, hidden_size=16, layers=1)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(12))
    write_jsonl(str(tmp_path / "t.jsonl"), triplet_rows(8, 2))
    common = ["--num-embed-tokens", "2", "--no-progress"]
    model_flags = flags if flags[0] == "--dtype" else []  # ref-scores takes the weights' dtype, not autocast
    scores = str(tmp_path / "scores.safetensors")
    commands = {
        "stage1": ["stage1", "--data", str(tmp_path / "c.jsonl"), "--base-model", base, "--output-dir", s1,
                   "--max-steps", "2", "--batch-size", "4"] + flags,
        "ref-scores": ["ref-scores", "--data", str(tmp_path / "t.jsonl"), "--model", os.path.join(s1, "model"),
                       "--base-model", base, "--output", scores, "--num-negatives", "2"] + model_flags,
        "stage2": ["stage2", "--data", str(tmp_path / "t.jsonl"), "--scores", scores, "--model",
                   os.path.join(s1, "model"), "--base-model", base, "--output-dir", s2, "--num-negatives", "2",
                   "--max-steps", "2", "--batch-size", "4"] + flags,
    }
    expected = sweep_precision.choose(torch.device("cpu"), torch.bfloat16).path  # this CPU's path (lowp or float32)
    for name, argv in commands.items():
        with sweep_precision.use_path() as choices, head_matmuls.use_mode() as chunk_drivers:
            assert main(argv + common) == 0, name
        if name == "ref-scores" and not model_flags:
            continue  # float32 weights without autocast: float32 ops
        assert choices, f"{name}: no LM-head op took the bf16 sweep"
        assert {(c.dtype, c.path) for c in choices} == {(torch.bfloat16, expected)}, name
        assert not chunk_drivers, f"{name}: an op ran on the chunk driver"
    for out in (s1, s2):
        with open(os.path.join(out, "loss.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
