"""The training subcommands end to end on a tiny model: flags, a YAML config file, clear errors."""
import json
import math
import os

import pytest

from are_fast.cli import main
from are_fast.toy.data import compression_rows, tiny_llama, triplet_rows, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stage1_ref_scores_stage2_from_the_command_line(tmp_path, capsys):
    base, s1, s2 = str(tmp_path / "base"), str(tmp_path / "s1"), str(tmp_path / "s2")
    tiny_llama(base, hidden_size=16, layers=1)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(16))
    write_jsonl(str(tmp_path / "t.jsonl"), triplet_rows(12, 2))
    common = ["--num-embed-tokens", "2", "--no-progress"]
    (tmp_path / "s1.yaml").write_text(f"data: {tmp_path / 'c.jsonl'}\nbase-model: {base}\nmax_steps: 2\nbatch_size: 4\n")
    assert main(["stage1", "--config", str(tmp_path / "s1.yaml"), "--output-dir", s1, "--lr", "1e-3"] + common) == 0
    with open(os.path.join(s1, "loss.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # max_steps from the config file
    scores = str(tmp_path / "scores.safetensors")
    assert main(["ref-scores", "--data", str(tmp_path / "t.jsonl"), "--model", os.path.join(s1, "model"),
                 "--base-model", base, "--output", scores, "--num-negatives", "2"] + common) == 0
    args = ["stage2", "--data", str(tmp_path / "t.jsonl"), "--scores", scores, "--model", os.path.join(s1, "model"),
            "--base-model", base, "--output-dir", s2, "--num-negatives", "2", "--max-steps", "2", "--batch-size", "4"]
    assert main(args + common) == 0
    assert os.path.isfile(os.path.join(s2, "model", "model.safetensors"))
    assert "12 rows kept" in capsys.readouterr().out

    # Stage 2 with the JSD of the two positive streams as its distance (the op registry's "jsd").
    jsd_dir = str(tmp_path / "s2-jsd")
    assert main(args[:10] + [jsd_dir] + args[11:] + ["--distance", "jsd"] + common) == 0
    assert "distance jsd" in capsys.readouterr().out
    with open(os.path.join(jsd_dir, "loss.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)

    # A score file for other rows is refused with a clear message, not silently misaligned.
    write_jsonl(str(tmp_path / "other.jsonl"), triplet_rows(12, 2, seed=5))
    args[2] = str(tmp_path / "other.jsonl")
    assert main(args + common) == 2
    assert "no score for 12 of 12 data rows" in capsys.readouterr().err


def test_bad_invocations_give_clear_errors(tmp_path, capsys):
    assert main(["stage1", "--data", str(tmp_path / "missing.jsonl"), "--base-model", str(tmp_path),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stage2", "--data", "x"])
    assert "missing --scores, --model, --base-model, --output-dir" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"max_steps": 3, "no_such_option": 1}')
    with pytest.raises(SystemExit):
        main(["stage1", "--config", str(tmp_path / "bad.json")])
    assert "unknown options no_such_option" in capsys.readouterr().err


def test_every_option_is_documented():
    from are_fast.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("stage1", "ref-scores", "stage2", "main"):
        for action in subparsers[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_runtime_eval_and_summary_options(tmp_path, capsys):
    """--device/--threads on every job, held-out evaluation with the best model, --epochs, the end summary."""
    import torch

    base, s1, s2 = str(tmp_path / "base"), str(tmp_path / "s1"), str(tmp_path / "s2")
    tiny_llama(base, hidden_size=16, layers=1)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(16))
    write_jsonl(str(tmp_path / "t.jsonl"), triplet_rows(12, 2))
    common = ["--num-embed-tokens", "2", "--no-progress", "--device", "cpu", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["stage1", "--data", str(tmp_path / "c.jsonl"), "--base-model", base, "--output-dir", s1,
                     "--epochs", "1", "--batch-size", "4", "--eval-triplets", str(tmp_path / "t.jsonl"), "--no-tensorboard"] + common) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "are-fast stage1: done - 4 steps" in out  # 16 rows / 4 = one epoch of 4 steps
    assert f"model           {os.path.join(s1, 'model')}" in out and "eval_acc_hard" in out
    scores = str(tmp_path / "scores.safetensors")
    assert main(["ref-scores", "--data", str(tmp_path / "t.jsonl"), "--model", os.path.join(s1, "model"),
                 "--base-model", base, "--output", scores, "--num-negatives", "2"] + common) == 0
    out = capsys.readouterr().out
    assert "12 rows scored" in out and os.path.abspath(scores) in out
    assert main(["stage2", "--data", str(tmp_path / "t.jsonl"), "--scores", scores, "--model", os.path.join(s1, "model"),
                 "--base-model", base, "--output-dir", s2, "--num-negatives", "2", "--max-steps", "3",
                 "--batch-size", "4", "--eval-fraction", "0.25", "--eval-steps", "1",
                 "--best-metric", "eval_acc_random", "--no-tensorboard"] + common) == 0
    out = capsys.readouterr().out
    assert "12 rows kept" in out  # the file; 3 of its rows are held out
    with open(os.path.join(s2, "loss.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "loss" not in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert all({"eval_loss", "eval_acc_hard", "eval_acc_random"} <= set(r) for r in evals)
    best = max(evals, key=lambda r: r["eval_acc_random"])  # the first of equals
    with open(os.path.join(s2, "best", "state.json")) as f:
        assert json.load(f)["step"] == best["step"]
    assert f"best            eval_acc_random {best['eval_acc_random']:.4f} at step {best['step']}" in out


def test_bad_runtime_options_give_clear_errors(tmp_path, capsys):
    base = str(tmp_path / "base")
    tiny_llama(base, hidden_size=16, layers=1)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(8))
    args = ["stage1", "--data", str(tmp_path / "c.jsonl"), "--base-model", base, "--output-dir", str(tmp_path / "o"),
            "--num-embed-tokens", "2", "--no-progress", "--batch-size", "4"]
    with pytest.raises(SystemExit):
        main(args + ["--epochs", "1", "--max-steps", "2"])
    assert "--epochs and --max-steps: give one of them" in capsys.readouterr().err
    def exit_code(argv):  # usage errors (argparse) exit 2 by SystemExit, input errors found later return 2
        try:
            return main(argv)
        except SystemExit as stop:
            return stop.code

    for extra, message in ((["--threads", "0"], "argument --threads: expected a value >= 1, got 0"),
                           (["--device", "tpu"], "device: expected cpu, cuda or cuda:N, got 'tpu'"),
                           (["--eval-fraction", "1.5"], "argument --eval-fraction: expected a value >= 0 and <= 1"),
                           (["--eval-fraction", "1"], "eval_fraction: expected a number in [0, 1)"),
                           (["--best-metric", "eval_acc_hard", "--eval-fraction", "0.5"],
                            "best_metric: 'eval_acc_hard' is not evaluated in this run (held-out metrics: eval_loss)")):
        assert exit_code(args + extra) == 2, extra
        assert message in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    assert exit_code(["encode", "--model", base, "--input", "x.txt", "--output", str(tmp_path / "e"),
                      "--threads", "0"]) == 2
    assert "argument --threads: expected a value >= 1" in capsys.readouterr().err
