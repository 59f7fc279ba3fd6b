"""The encode job: equals Encoder.encode and the naive oracle, survives SIGKILL byte for byte, splits over torchrun
ranks, reads every input format as a stream, and reports bad rows without stopping."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _helpers import ENCODER_INSTRUCTION, ENCODER_MAX_LENGTH, naive_embeddings, random_texts, rel_error

from are_fast.encoding.encode_job import MANIFEST, JobConfig, read_embeddings, run_job
from are_fast.encoding.encoder import Encoder
from are_fast.encoding.readers import scan

BAD_LINES = [b"", b"   ", b"{not json", b"\xff\xfe broken", b'{"other": "x"}', b'{"text": 7}', b"[1, 2]", b'{"text": ""}']


def write_jsonl(path, texts, bad_every=0) -> list[int]:
    """texts as {"text": ...} lines, a bad line after every ``bad_every`` texts; returns the good rows' ids."""
    good, row = [], 0
    with open(path, "wb") as f:
        for i, text in enumerate(texts):
            if bad_every and i % bad_every == bad_every - 1:
                f.write(BAD_LINES[(i // bad_every) % len(BAD_LINES)] + b"\n")
                row += 1
            f.write(json.dumps({"text": text, "id": i}).encode() + b"\n")
            good.append(row)
            row += 1
    return good


def cli(*args, env=None, check=True, **kwargs) -> subprocess.CompletedProcess:
    """``python -m are_fast encode ...`` in a fresh process, in float32 unless ``--dtype`` is given (the CPU
    default is bf16 where the CPU has faster bf16 units; these tests compare with float32 to 1e-5)."""
    run_env = {k: v for k, v in os.environ.items() if k != "ARE_FAST_ENCODE_KILL_AT"}
    run_env.update(env or {})
    args = args if "--dtype" in args else (*args, "--dtype", "float32")
    proc = subprocess.run([sys.executable, "-m", "are_fast", "encode", "--no-progress", *map(str, args)],
                          env=run_env, capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def snapshot(folder) -> dict:
    """Every file of an output folder: name -> bytes."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def job(model_dir, inp, out, **kwargs) -> int:
    kwargs.setdefault("max_length", ENCODER_MAX_LENGTH)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("dtype", "float32")
    return run_job(JobConfig(model_dir, str(inp), str(out), **kwargs))


@pytest.mark.parametrize("shard_format", ["safetensors", "npy"])
def test_job_equals_encode_equals_naive(model_dir, tmp_path, shard_format):
    texts = random_texts(29, seed=7)
    good = write_jsonl(tmp_path / "in.jsonl", texts, bad_every=5)
    assert job(model_dir, tmp_path / "in.jsonl", tmp_path / "out", shard_size=8, instruction=ENCODER_INSTRUCTION,
               shard_format=shard_format, max_tokens=200) == 0
    ids, emb = read_embeddings(str(tmp_path / "out"))
    assert ids.tolist() == good  # every good row once, in input order
    assert emb.dtype == np.float32 and emb.shape == (len(texts), 32)
    enc = Encoder.from_pretrained(model_dir, "cpu", torch.float32, max_length=ENCODER_MAX_LENGTH)
    direct = enc.encode(texts, prompt=ENCODER_INSTRUCTION, convert_to_tensor=True)  # both unnormalized by default
    assert rel_error(torch.from_numpy(emb), direct) <= 1e-5
    assert rel_error(torch.from_numpy(emb), naive_embeddings(model_dir, texts, ENCODER_INSTRUCTION, normalize=False)) <= 1e-5


def test_manifest_and_bad_rows(model_dir, tmp_path, capfd):
    texts = random_texts(20, seed=8)
    good = write_jsonl(tmp_path / "in.jsonl", texts, bad_every=2)
    assert job(model_dir, tmp_path / "in.jsonl", tmp_path / "out", shard_size=7) == 0
    err = capfd.readouterr().err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    info = scan(str(tmp_path / "in.jsonl"))
    assert manifest["input"]["sha256"] == info.sha256 and manifest["input"]["rows"] == info.rows == 30
    assert manifest["rows"]["embedded"] == 20 and manifest["rows"]["bad"] == 10
    assert manifest["bad_rows_by_reason"] == {"empty": 5, "invalid_json": 1, "invalid_utf8": 1, "missing_field": 1,
                                              "not_a_string": 1, "not_an_object": 1}
    bad_ids = sorted(set(range(30)) - set(good))
    assert [b["row"] for b in manifest["bad_rows_first"]] == bad_ids
    for b in manifest["bad_rows_first"]:
        assert b["line"] == b["row"] + 1  # row ids count from 0 like the embeddings' row_ids; lines from 1
        assert f"line {b['line']}: skipped, {b['detail']}" in err
    tokenizer_lengths = [len(t.encode()) + 1 for t in texts]  # byte tokenizer: a token per byte, plus "\n"
    assert manifest["rows"]["truncated"] == sum(n > ENCODER_MAX_LENGTH for n in tokenizer_lengths) > 0
    assert "texts cut to 48 tokens" in err
    assert manifest["model"]["num_embed_tokens"] == 3 and manifest["model"]["hidden_size"] == 32
    assert [s["first_row"] for s in manifest["shards"]] == [0, 7, 14, 21, 28]
    assert sum(s["embedded"] for s in manifest["shards"]) == 20


def test_txt_and_parquet_inputs(model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet reader) is not installed")
    import pyarrow.parquet as pq

    texts = random_texts(9, seed=9)
    (tmp_path / "in.txt").write_bytes(b"\n".join(t.encode() for t in texts[:4]) + b"\r\n\n"
                                      + b"\n".join(t.encode() for t in texts[4:]))  # CRLF, a blank line, no final \n
    assert job(model_dir, tmp_path / "in.txt", tmp_path / "txt") == 0
    ids, emb_txt = read_embeddings(str(tmp_path / "txt"))
    assert ids.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    pq.write_table(pa.table({"body": texts[:3] + [None] + texts[3:]}), tmp_path / "in.parquet", row_group_size=4)
    assert job(model_dir, tmp_path / "in.parquet", tmp_path / "pq", field="body", shard_size=4) == 0
    ids, emb_pq = read_embeddings(str(tmp_path / "pq"))
    assert ids.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    ref = naive_embeddings(model_dir, texts, normalize=False)  # the job's default, as Encoder.encode's
    assert rel_error(torch.from_numpy(emb_txt), ref) <= 1e-5 and rel_error(torch.from_numpy(emb_pq), ref) <= 1e-5


def test_parquet_without_pyarrow_is_a_clear_error(model_dir, tmp_path, monkeypatch, capfd):
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert job(model_dir, tmp_path / "in.parquet", tmp_path / "out") == 2  # a usage error: nothing computed
    assert "needs pyarrow" in capfd.readouterr().err


def test_input_errors_exit_2(model_dir, tmp_path, capfd):
    texts = random_texts(5, seed=10)
    write_jsonl(tmp_path / "in.jsonl", texts)
    cases = [
        (dict(model=str(tmp_path / "nope")), "is not a directory"),
        (dict(model=str(tmp_path)), "no config.json"),
        (dict(input=str(tmp_path / "missing.jsonl")), "is not a file"),
        (dict(input=str(tmp_path / "in.csv")), "cannot tell the format"),
        (dict(field="body"), "no row could be embedded"),  # every row lacks the field: reported, then exit 2
        (dict(shard_size=0), "shard_size"),
    ]
    (tmp_path / "in.csv").write_text("a\n")
    for overrides, message in cases:
        args = dict(model=model_dir, input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"),
                    max_length=ENCODER_MAX_LENGTH, progress=False)
        args.update(overrides)
        assert run_job(JobConfig(**args)) == 2, overrides
        assert message in capfd.readouterr().err, overrides
    # An output folder that holds another job's result is refused, not overwritten; --overwrite replaces it.
    assert job(model_dir, tmp_path / "in.jsonl", tmp_path / "done") == 0
    before = snapshot(tmp_path / "done")
    assert job(model_dir, tmp_path / "in.jsonl", tmp_path / "done", instruction="other") == 2
    err = capfd.readouterr().err
    assert "another job" in err and "--overwrite" in err
    assert snapshot(tmp_path / "done") == before
    (tmp_path / "done" / "notes.txt").write_text("mine")
    assert job(model_dir, tmp_path / "in.jsonl", tmp_path / "done", instruction="other", overwrite=True) == 0
    assert "--overwrite: removed 3 files of another job" in capfd.readouterr().err
    after = snapshot(tmp_path / "done")
    assert after["notes.txt"] == b"mine" and after[MANIFEST] != before[MANIFEST]


@pytest.fixture(scope="module")
def kill_input(model_dir, tmp_path_factory):
    """60 texts with a bad line after every 7th, the job's args, and the output of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("kill")
    write_jsonl(folder / "in.jsonl", random_texts(60, seed=11), bad_every=7)
    args = ["--model", model_dir, "--input", folder / "in.jsonl", "--max-length", ENCODER_MAX_LENGTH, "--shard-size", 6,
            "--instruction", ENCODER_INSTRUCTION, "--dtype", "float32"]
    cli(*args, "--output", folder / "reference")
    return folder, args, snapshot(folder / "reference")


def test_sigkill_at_each_write_step_then_resume_is_byte_identical(kill_input):
    """Killed after computing a shard, with a temporary file written, with data but no record, and after a
    record; each rerun resumes; the final folder equals the uninterrupted run's, byte for byte."""
    folder, args, reference = kill_input
    out = folder / "killed"
    for point in ("computed:1", "tmp:3", "data:5", "record:7"):
        proc = cli(*args, "--output", out, env={"ARE_FAST_ENCODE_KILL_AT": point}, check=False)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        assert not (out / MANIFEST).exists()
        index = int(point.split(":")[1])
        record = out / f"shard-{index:05d}.json"
        assert record.exists() == (point.startswith("record")), point  # the record comes last
        if point.startswith("tmp"):  # a temporary file is left behind, never a half-written shard
            assert f"shard-{index:05d}.safetensors.tmp" in os.listdir(out)
            assert f"shard-{index:05d}.safetensors" not in os.listdir(out)
    proc = cli(*args, "--output", out)
    assert "resuming: " in proc.stderr
    assert snapshot(out) == reference  # no stale temporary file, no missing or extra byte
    ids, _ = read_embeddings(str(out))
    assert len(set(ids.tolist())) == len(ids) == 60 and ids.tolist() == sorted(ids.tolist())


def test_external_sigkill_mid_run_then_resume_is_byte_identical(kill_input):
    folder, args, reference = kill_input
    out = folder / "external"
    env = {k: v for k, v in os.environ.items() if k != "ARE_FAST_ENCODE_KILL_AT"}
    proc = subprocess.Popen([sys.executable, "-m", "are_fast", "encode", "--no-progress", *map(str, args),
                             "--output", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and sum(n.endswith(".json") for n in os.listdir(out)) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished first
    assert not (out / MANIFEST).exists()
    cli(*args, "--output", out)
    assert snapshot(out) == reference


def test_torchrun_two_ranks_equal_one_process(kill_input, tmp_path):
    folder, args, _ = kill_input
    env = {"OMP_NUM_THREADS": "1"}  # torchrun's default per rank; the single process uses it too
    cli(*args, "--output", tmp_path / "one", env=env)
    run_env = {**os.environ, **env}
    run_env.pop("ARE_FAST_ENCODE_KILL_AT", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "are_fast", "encode", "--no-progress", *map(str, args),
                           "--output", str(tmp_path / "two")],
                          env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0:" in proc.stderr and "rank 1:" in proc.stderr  # both ranks encoded shards
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_help_documents_every_option(capsys):
    from are_fast.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["encode", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--input", "--output", "--field", "--input-format", "--instruction", "--shard-size",
                   "--shard-format", "--max-length", "--max-tokens", "--batch-size", "--device", "--dtype",
                   "--no-normalize", "--no-progress"):
        assert option in text
