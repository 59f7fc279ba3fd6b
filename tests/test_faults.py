"""The fault-injection table: every job on the tiny model, with each input mistake and each fault.

Each case asserts the exit code (2: usage/input error before any work, 1: failure at run time, 130/143:
SIGINT/SIGTERM), the one line on stderr that names the problem and the fix, no traceback, and that every
finished output is intact (and that a rerun resumes). Most cases call the CLI's main() in-process; faults of
the file system are injected there as the OSError the kernel gives (EROFS at the write check, ENOSPC at a
checkpoint, score-file, model or shard write) because the tests run as root, which chmod does not stop; when
this process may mount, a small tmpfs (full, or read-only) gives the real errors too. Real signals (SIGTERM,
SIGKILL at random steps) go to real subprocesses.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import are_fast
from are_fast import runtime
from are_fast.cli import main
from are_fast.toy.data import compression_rows, tiny_llama, triplet_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers
def run(argv, capsys):
    """(exit code, stdout, stderr) of ``are-fast argv`` in this process; never a traceback on stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    return code, out, err


def expect(argv, capsys, code, message):
    """Run; assert the exit code and that the last stderr line is one ``are-fast ...`` line holding ``message``."""
    got, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err[-3000:])
    if code:
        assert lines and lines[-1].startswith("are-fast") and message in lines[-1], err[-3000:]
    return out, err


def os_error(code, path="x"):
    return OSError(code, os.strerror(code), path)


def steps_logged(run_dir):
    with open(os.path.join(run_dir, "loss.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def checkpoints(run_dir):
    return sorted(n for n in os.listdir(run_dir) if n.startswith("step-"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny base model, data, models without a (usable) tokenizer, a finished stage-1 run (k=2) and its scores."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    w = {"root": root, "base": str(root / "base"), "other_base": str(root / "other_base"),
         "c": str(root / "c.jsonl"), "t": str(root / "t.jsonl"), "s1": str(root / "s1"),
         "scores": str(root / "scores.safetensors")}
    tiny_llama(w["base"], hidden_size=16, layers=1, seed=0)
    tiny_llama(w["other_base"], hidden_size=16, layers=1, seed=1)
    write_jsonl(w["c"], compression_rows(16))
    write_jsonl(w["t"], triplet_rows(12, 2))
    w["no_tokenizer"] = str(root / "no_tokenizer")
    shutil.copytree(w["base"], w["no_tokenizer"])
    for name in os.listdir(w["no_tokenizer"]):
        if name not in ("config.json", "model.safetensors", "generation_config.json"):
            os.remove(os.path.join(w["no_tokenizer"], name))
    w["empty_vocab"] = str(root / "empty_vocab")
    shutil.copytree(w["no_tokenizer"], w["empty_vocab"])
    from tokenizers import Regex, Tokenizer, normalizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every text normalizes to nothing
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(w["empty_vocab"])
    code = main(stage1(w, w["s1"]) + ["--num-embed-tokens", "2"])
    assert code == 0
    code = main(["ref-scores", "--data", w["t"], "--model", w["s1"] + "/model", "--base-model", w["base"], "--output",
                 w["scores"], "--num-negatives", "2", "--no-progress"])
    assert code == 0
    return w


def stage1(w, out, *extra):
    return ["stage1", "--base-model", w["base"], "--data", w["c"], "--output-dir", str(out), "--no-progress",
            "--batch-size", "4", "--max-steps", "2", *map(str, extra)]


def stage2(w, out, *extra):
    return ["stage2", "--data", w["t"], "--scores", w["scores"], "--model", w["s1"] + "/model", "--base-model",
            w["base"], "--output-dir", str(out), "--num-negatives", "2", "--max-steps", "2", "--batch-size", "4",
            "--no-progress", *map(str, extra)]


def ref_scores(w, output, *extra):
    return ["ref-scores", "--data", w["t"], "--model", w["s1"] + "/model", "--base-model", w["base"],
            "--output", str(output), "--num-negatives", "2", "--no-progress", *map(str, extra)]


def copy_run(w, tmp_path):
    shutil.copytree(w["s1"], tmp_path / "run")
    return str(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- models and k
@pytest.mark.parametrize("model, message", [
    ("no_tokenizer", "has no usable tokenizer"),
    ("empty_vocab", "to no tokens (an empty vocabulary"),
])
def test_a_model_without_a_usable_tokenizer_is_refused(world, tmp_path, capsys, model, message):
    args = stage1(world, tmp_path / "o")
    args[args.index("--base-model") + 1] = world[model]
    expect(args, capsys, 2, message)
    assert not os.path.exists(tmp_path / "o" / "model")
    expect(["encode", "--model", world[model], "--input", world["c"], "--field", "output", "--output",
            tmp_path / "e", "--no-progress"], capsys, 2, message)


def test_k_comes_from_the_model_and_a_disagreeing_flag_is_an_error(world, tmp_path, capsys):
    expect(stage2(world, tmp_path / "o", "--num-embed-tokens", 3), capsys, 2, "has k=2 <EMBED*> tokens; give 2")
    expect(ref_scores(world, tmp_path / "r.safetensors", "--num-embed-tokens", 5), capsys, 2, "has k=2")
    args = ref_scores(world, tmp_path / "r.safetensors")
    args[args.index("--model") + 1] = world["base"]
    expect(args, capsys, 2, "has no <EMBED0> token")
    args = stage2(world, tmp_path / "o")
    args[args.index("--model") + 1] = world["s1"]  # the run folder instead of <output-dir>/model (old README)
    expect(args, capsys, 2, "did you mean")
    shutil.copytree(world["s1"] + "/model", tmp_path / "retrained")
    with open(tmp_path / "retrained" / "generation_config.json", "a") as f:
        f.write("\n")  # another stage-1 model than the one the scores were computed with
    args = stage2(world, tmp_path / "o")
    args[args.index("--model") + 1] = str(tmp_path / "retrained")
    expect(args, capsys, 2, "were computed with another --model")
    enc = ["encode", "--input", world["c"], "--field", "output", "--no-progress", "--shard-size", 8]
    expect(enc + ["--model", world["base"], "--output", tmp_path / "e"], capsys, 2, "give --num-embed-tokens K")
    expect(enc + ["--model", world["s1"] + "/model", "--output", tmp_path / "e", "--num-embed-tokens", 3], capsys, 2,
           "has k=2")
    expect(enc + ["--model", world["base"], "--output", tmp_path / "e", "--num-embed-tokens", 2], capsys, 0, "")
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["model"]["num_embed_tokens"] == 2


# ---------------------------------------------------------------------------------------------- options
def test_numeric_options_and_config_keys_are_checked(world, tmp_path, capsys):
    for flag, value, message in [("--max-steps", -3, "--max-steps: expected a value >= 1, got -3"),
                                 ("--batch-size", 0, "--batch-size: expected a value >= 1"),
                                 ("--lr", "nan", "--lr: expected a value > 0"),
                                 ("--num-embed-tokens", 0, "--num-embed-tokens: expected a value >= 1"),
                                 ("--max-text-tokens", "2.5", "--max-text-tokens: expected an integer"),
                                 ("--max-bad-fraction", 2, "--max-bad-fraction: expected a value >= 0 and <= 1")]:
        expect(stage1(world, tmp_path / "o", flag, value), capsys, 2, message)
    expect(stage2(world, tmp_path / "o", "--num-negatives", 0), capsys, 2, "--num-negatives: expected a value >= 1")
    expect(stage2(world, tmp_path / "o", "--tau", 0), capsys, 2, "--tau: expected a value > 0")
    expect(["main", "--hidden-size", 12, "--output-dir", tmp_path / "m"], capsys, 2, "hidden_size: expected a multiple of 8")
    expect(["encode", "--model", "m", "--input", "i", "--output", "o", "--shard-size", -5], capsys, 2,
           "--shard-size: expected a value >= 1")
    assert not os.path.exists(tmp_path / "o")
    for text, message in [("dtype: float64\n", "argument --dtype: invalid choice: 'float64'"),
                          ("progress: false\n", "unknown options progress (the switch is no-progress: true)"),
                          ("max_steps: -3\n", "--max-steps: expected a value >= 1, got -3"),
                          ("no-progress: 1\n", "no-progress is a switch; expected true or false")]:
        (tmp_path / "run.yaml").write_text(text)
        expect(stage1(world, tmp_path / "o", "--config", tmp_path / "run.yaml"), capsys, 2, message)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_is_announced_and_checked(world, tmp_path, capsys):
    run_dir = copy_run(world, tmp_path)
    base = ["--num-embed-tokens", 2]
    out, _ = expect(stage1(world, run_dir, *base), capsys, 0, "")
    assert "already finished (2 of 2 steps)" in out
    expect(stage1(world, run_dir, *base, "--batch-size", 2), capsys, 2, "batch_size: 4 -> 2")
    expect(stage1(world, run_dir, *base, "--max-steps", 3), capsys, 2, "max_steps: 2 -> 3")
    expect(stage1(world, run_dir, "--num-embed-tokens", 3), capsys, 2, "num_embed_tokens: 2 -> 3")
    lines = open(world["c"]).read().splitlines(keepends=True)
    (tmp_path / "reordered.jsonl").write_text("".join(reversed(lines)))
    args = stage1(world, run_dir, *base)
    args[args.index("--data") + 1] = str(tmp_path / "reordered.jsonl")
    expect(args, capsys, 2, "data_sha256")
    args = stage1(world, run_dir, *base)
    args[args.index("--base-model") + 1] = world["other_base"]
    _, err = expect(args, capsys, 2, "holds a run with other settings (base-model:")
    assert "--restart to start over" in err
    before = checkpoints(run_dir)
    assert before == ["step-00000002"] and steps_logged(run_dir) == [1, 2]  # every refusal kept the run as it was
    # --restart (here from a config file whose keys are the flags' names) starts over with the new settings.
    (tmp_path / "run.yaml").write_text("restart: true\nno-progress: true\nbatch_size: 2\n")
    out, _ = expect(stage1(world, run_dir, *base, "--config", tmp_path / "run.yaml"), capsys, 0, "")
    assert "--restart: removed 1 checkpoints" in out and steps_logged(run_dir) == [1, 2]


def test_stray_and_damaged_files_in_the_output_folder(world, tmp_path, capsys):
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "loss.jsonl").write_text('{"loss": 1.0}\n')
    expect(stage1(world, tmp_path / "stray", "--num-embed-tokens", 2), capsys, 2, "line 1 is not a loss record")
    assert (tmp_path / "stray" / "loss.jsonl").read_text() == '{"loss": 1.0}\n'
    run_dir = copy_run(world, tmp_path)
    state = os.path.join(run_dir, "step-00000002", "state.json")
    with open(state, "r+") as f:
        f.truncate(10)
    expect(stage1(world, run_dir, "--num-embed-tokens", 2), capsys, 2, "step-00000002' is damaged")
    shutil.rmtree(run_dir)
    run_dir = copy_run(world, tmp_path)
    os.remove(os.path.join(run_dir, "step-00000002", "optimizer.safetensors"))
    expect(stage1(world, run_dir, "--num-embed-tokens", 2), capsys, 2, "is damaged")


# ---------------------------------------------------------------------------------------------- file system
def test_read_only_output_is_found_before_any_work(world, tmp_path, capsys, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise os_error(errno.EROFS, path)

    monkeypatch.setattr(runtime, "open", read_only, raising=False)  # the write check's probe file
    from are_fast.training import jobs

    monkeypatch.setattr(jobs, "compute_reference_scores", lambda *a, **k: pytest.fail("computed before the check"))
    monkeypatch.setattr(jobs, "build_models", lambda *a, **k: pytest.fail("loaded before the check"))
    hint = "Read-only file system; choose a writable folder"
    expect(stage1(world, tmp_path / "o"), capsys, 2, f"output-dir: cannot write to '{tmp_path / 'o'}': {hint}")
    expect(ref_scores(world, tmp_path / "r" / "s.safetensors"), capsys, 2, f"output: cannot write to")
    expect(stage2(world, tmp_path / "o"), capsys, 2, hint)
    expect(["main", "--output-dir", tmp_path / "m"], capsys, 2, hint)
    expect(["encode", "--model", world["s1"] + "/model", "--input", world["c"], "--field", "output", "--output",
            tmp_path / "e"], capsys, 2, hint)


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_a_rerun_resumes(world, tmp_path, capsys, monkeypatch):
    from are_fast.training import checkpoint

    real, calls = checkpoint.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second checkpoint's first file (each has rng, model, optimizer)
            raise os_error(errno.ENOSPC, args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "o"
    args = stage1(world, out, "--max-steps", 3, "--save-every", 1, "--num-embed-tokens", 2)
    expect(args, capsys, 1, "No space left on device")
    assert checkpoints(out) == ["step-00000001"]  # no half-written step-00000002(.tmp)
    monkeypatch.setattr(checkpoint, "save_file", real)
    stdout, _ = expect(args, capsys, 0, "")
    assert "resuming from step 1 of 3" in stdout and steps_logged(out) == [1, 2, 3]


def test_full_disk_messages_name_what_is_kept(world, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from are_fast.model import Compressor
    from are_fast.training import checkpoint, refscores

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(refscores, "save_file", full)
    output = tmp_path / "s.safetensors"
    expect(ref_scores(world, output), capsys, 1, "No space left on device (os error 28); nothing was written")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary
    monkeypatch.setattr(checkpoint, "save_file", full)
    expect(stage1(world, tmp_path / "o", "--num-embed-tokens", 2), capsys, 1,
           "No space left on device (os error 28); no checkpoint was written yet; rerun the same command to resume")
    monkeypatch.undo()

    def export_fails(self, path, **kwargs):
        raise os_error(errno.ENOSPC, str(path))

    monkeypatch.setattr(Compressor, "save_pretrained", export_fails)
    expect(stage1(world, tmp_path / "p", "--num-embed-tokens", 2), capsys, 1,
           "free some space; the checkpoints are kept: rerun the same command to export")
    monkeypatch.undo()
    out, _ = expect(stage1(world, tmp_path / "p", "--num-embed-tokens", 2), capsys, 0, "")
    assert "already finished" in out and os.path.isfile(tmp_path / "p" / "model" / "model.safetensors")


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of the given size and options (root only); skipped where mounting is not allowed - the
    injected-error cases above cover the same code without it."""
    mounted = []

    def mount(name, options):
        path = tmp_path / name
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root); injected OSErrors cover these faults")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_real_full_and_read_only_tmpfs(world, capsys, small_tmpfs):
    full = small_tmpfs("full", "size=96k")
    expect(stage1(world, full, "--num-embed-tokens", 2), capsys, 1, "No space left on device")
    assert not [n for n in os.listdir(full) if n.startswith("step-")]
    read_only = small_tmpfs("ro", "ro,size=64k")
    expect(stage1(world, read_only / "o", "--num-embed-tokens", 2), capsys, 2, "Read-only file system")


# ---------------------------------------------------------------------------------------------- interrupts, errors
def test_sigint_at_a_step_saves_a_checkpoint_and_a_rerun_resumes(world, tmp_path, capsys, monkeypatch):
    from are_fast.training.trainer import Trainer

    real = Trainer.train_step
    stop_at = random.Random(0).randint(1, 3)

    def train_step(self, micro):
        record = real(self, micro)
        if len(steps_logged(self.config.output_dir) if os.path.exists(self.log_path) else []) + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the step
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "o"
    args = stage1(world, out, "--max-steps", 4, "--num-embed-tokens", 2)
    expect(args, capsys, 130, f"interrupted (SIGINT) at step {stop_at} of 4 (checkpoint saved in {out}); rerun "
                              "the same command to resume")
    assert checkpoints(out) == [f"step-{stop_at:08d}"] and steps_logged(out) == list(range(1, stop_at + 1))
    monkeypatch.setattr(Trainer, "train_step", real)
    stdout, _ = expect(args, capsys, 0, "")
    assert f"resuming from step {stop_at} of 4" in stdout and steps_logged(out) == [1, 2, 3, 4]


def test_interrupts_and_internal_errors_outside_the_loop_are_one_line(world, tmp_path, capsys, monkeypatch):
    from are_fast.training import jobs
    from are_fast.training.trainer import Trainer

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "inspect_model_dir", ctrl_c)
    expect(stage1(world, tmp_path / "o"), capsys, 130, "interrupted; rerun the same command to resume")
    monkeypatch.undo()

    def boom(self, micro):
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "train_step", boom)
    expect(stage1(world, tmp_path / "o", "--num-embed-tokens", 2), capsys, 1,
           "internal error: RuntimeError: boom (ARE_FAST_TRACEBACK=1 prints the traceback")


def _cli_process(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "are_fast", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after(proc, run_dir, steps, signum):
    deadline = time.monotonic() + 120
    log = os.path.join(run_dir, "loss.jsonl")
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(steps_logged(run_dir)) >= steps:
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_real_sigterm_and_sigkill_at_random_steps_then_resume(world, tmp_path, capsys):
    """SIGTERM ends after the current step (exit 143, one line, a checkpoint); SIGKILL leaves the last whole
    checkpoint; the same command then finishes the run with every step logged once."""
    rng = random.Random(int(time.time()))
    out = tmp_path / "o"
    args = stage1(world, out, "--max-steps", 30, "--save-every", 1, "--num-embed-tokens", 2)
    at = rng.randint(2, 8)
    code, _, err = _signal_after(_cli_process(args), out, at, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("are-fast stage1: interrupted (SIGTERM) at step ") and "rerun the same command" in last
    step = int(last.split(" at step ")[1].split()[0])
    assert step >= at and checkpoints(out)[-1] == f"step-{step:08d}" and steps_logged(out) == list(range(1, step + 1))
    code, stdout, err = _signal_after(_cli_process(args), out, step + rng.randint(2, 8), signal.SIGKILL)
    assert code == -signal.SIGKILL and f"resuming from step {step} of 30" in stdout
    finished = [c for c in checkpoints(out) if not c.endswith(".tmp")]
    killed_at = int(finished[-1].split("-")[1])
    stdout, _ = expect(args, capsys, 0, "")  # the same command, in-process (a third interpreter start is slow)
    assert f"resuming from step {killed_at} of 30" in stdout
    assert steps_logged(out) == list(range(1, 31)) and os.path.isfile(out / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- data
def test_bad_rows_are_skipped_with_line_numbers_and_bounded(world, tmp_path, capsys):
    good = open(world["c"], "rb").read().splitlines(keepends=True)
    (tmp_path / "some_bad.jsonl").write_bytes(b"".join(good[:2]) + b'{"context": "caf\xe9"}\n' + b"".join(good[2:]))
    args = stage1(world, tmp_path / "o", "--num-embed-tokens", 2)
    args[args.index("--data") + 1] = str(tmp_path / "some_bad.jsonl")
    out, _ = expect(args, capsys, 0, "")
    assert "16 rows kept; 1 skipped (invalid UTF-8; lines 3...)" in out
    (tmp_path / "mostly_bad.jsonl").write_bytes(b"".join(good[:4]) + b"{broken\n" * 6)
    args[args.index("--data") + 1] = str(tmp_path / "mostly_bad.jsonl")
    expect(args, capsys, 2, "60% of the rows of")
    args[args.index("--output-dir") + 1] = str(tmp_path / "o2")
    expect(args + ["--max-bad-fraction", 0.7], capsys, 0, "")


# ---------------------------------------------------------------------------------------------- encode
def test_encode_faults_keep_finished_shards_and_resume(world, tmp_path, capsys, monkeypatch):
    from are_fast.encoding import encode_job

    texts = [{"text": r["output"]} for r in compression_rows(24)]
    write_jsonl(str(tmp_path / "in.jsonl"), texts)
    args = ["encode", "--model", world["s1"] + "/model", "--input", tmp_path / "in.jsonl", "--shard-size", 4,
            "--no-progress", "--max-length", 64]
    expect(args + ["--output", tmp_path / "reference"], capsys, 0, "")
    reference = {n: (tmp_path / "reference" / n).read_bytes() for n in os.listdir(tmp_path / "reference")}
    real_write = encode_job._write_shard

    def full_at_shard_3(cfg, plan, shard, *rest):
        if shard.index == 3:
            raise os_error(errno.ENOSPC, os.path.join(cfg.output, "shard-00003.safetensors.tmp"))
        return real_write(cfg, plan, shard, *rest)

    out = tmp_path / "out"
    monkeypatch.setattr(encode_job, "_write_shard", full_at_shard_3)
    expect(args + ["--output", out], capsys, 1, "writing shard 3 to")
    assert sorted(n for n in os.listdir(out) if n.endswith(".json")) == [f"shard-{i:05d}.json" for i in range(3)]

    def interrupted_after_shard_4(cfg, plan, shard, *rest):
        real_write(cfg, plan, shard, *rest)
        if shard.index == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(encode_job, "_write_shard", interrupted_after_shard_4)
    _, err = expect(args + ["--output", out], capsys, 130, "interrupted (SIGINT) with 5 of 6 shards finished (kept)")
    assert "resuming: 3 of 6 shards already done" in err
    monkeypatch.undo()
    _, err = expect(args + ["--output", out], capsys, 0, "")
    assert "resuming: 5 of 6 shards already done" in err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == reference
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a fine text"}\n' + b"\xff\n" * 2)
    _, err = expect(args + ["--input", tmp_path / "bad.jsonl", "--output", tmp_path / "b"], capsys, 2,
                    "2 of 3 rows are bad, more than --max-bad-fraction 0.5")
    assert "line 2: skipped, invalid UTF-8" in err


# ---------------------------------------------------------------------------------------------- main job
def test_main_job_runs_what_new_settings_ask_for(tmp_path, capsys):
    args = ["main", "--output-dir", tmp_path / "m", "--hidden-size", 16, "--layers", 1, "--num-embed-tokens", 2,
            "--stage1-rows", 64, "--stage2-rows", 32, "--eval-rows", 8, "--pretrain-steps", 2, "--stage1-steps", 2,
            "--batch-size", 8, "--no-progress"]
    threads = torch.get_num_threads()
    try:
        expect(args + ["--stage2-steps", 2], capsys, 0, "")
        out, _ = expect(args + ["--stage2-steps", 3], capsys, 0, "")
    finally:
        torch.set_num_threads(threads)
    assert "stage2: settings changed (max_steps: 2 -> 3" in out and out.count("already finished") == 2
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert {k: v["steps"] for k, v in summary["losses"].items()} == {"pretrain": 2, "stage1": 2, "stage2": 3}
    try:  # another model size: every step starts over (it was a size-mismatch traceback)
        out, _ = expect(args + ["--stage2-steps", 3, "--hidden-size", 8], capsys, 0, "")
    finally:
        torch.set_num_threads(threads)
    assert "pretrain: settings changed (base_init:" in out and "already finished" not in out
    assert "stage1: settings changed" in out and "stage2: settings changed" in out


def test_train_config_is_checked_in_the_library_too(tmp_path):
    from are_fast.training.trainer import TrainConfig, Trainer

    for options, message in [(dict(max_steps=-3), "max_steps: expected at least 1, got -3"),
                             (dict(lr=0.0), "lr: expected a positive learning rate"),
                             (dict(warmup_steps=-1), "warmup_steps: expected a value >= 0")]:
        with pytest.raises(ValueError, match=message):
            Trainer(None, [], TrainConfig(str(tmp_path), **options))


# ---------------------------------------------------------------------------------------------- ops
def test_op_arguments_are_validated():
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3))
    for chunk_rows, kind in [(-5, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(kind, match="chunk_rows: expected None or a positive int"):
            are_fast.compression_loss(hidden, weight, labels, chunk_rows=chunk_rows)
    for op in (are_fast.compression_loss, are_fast.sequence_logprobs):
        with pytest.raises(TypeError, match="ignore_index: expected an int"):
            op(hidden, weight, labels, ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        are_fast.token_logprobs(hidden, weight, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"chunk_rows"):
        are_fast.conditional_kl(hidden, hidden, weight, labels, chunk_rows=-1)
    lp, lpn = torch.randn(4), torch.randn(4, 2)
    for sign in (0, 2, 0.5):
        with pytest.raises(ValueError, match=r"ref_sign: expected \+1.0"):
            are_fast.alignment_loss(lp, lp, lpn, lp, lpn, ref_sign=sign)
    with pytest.raises(TypeError, match="beta: expected a positive scale"):
        are_fast.alignment_loss(lp, lp, lpn, lp, lpn, beta=float("inf"))
    with pytest.raises(TypeError, match="ref_n: expected a floating tensor"):
        are_fast.alignment_loss(lp, lp, lpn, lp, lpn.long())
    mixed = are_fast.alignment_loss(lp.bfloat16(), lp, lpn.half(), lp.double(), lpn.double())
    assert mixed.dtype == torch.float32
    expected = are_fast.alignment_loss(lp.bfloat16().float(), lp, lpn.half().float(), lp, lpn)
    assert torch.equal(mixed, expected)
    assert are_fast.alignment_loss(lp.double(), lp.double(), lpn.double(), lp, lpn).dtype == torch.float64


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """StopSignals.agreed(): one all-reduce per step, so ranks never disagree about the last step (a rank that
    stopped alone would leave the others waiting in a collective forever)."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import os, signal\n"
        "import torch.distributed as dist\n"
        "from are_fast.runtime import StopSignals\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "with StopSignals() as stop:\n"
        "    seen = []\n"
        "    for step in range(3):\n"
        "        if rank == 1 and step == 1:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        seen.append(stop.agreed())\n"
        "print(f'rank {rank}: {seen} {stop.signum}', flush=True)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: [False, True, True] {int(signal.SIGTERM)}" in proc.stdout, proc.stdout
