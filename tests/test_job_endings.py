"""The small promises of the command line (issue 17, items 3 and 7): the traceback on request is the real one,
blank lines are bad rows, an exit-2 run creates nothing, options are never abbreviated, defaults that differ
between jobs say why, --ref-sign reads and shows as +1/-1, and a tokenizer that fails to load is reported as
the failure it is."""
import argparse
import os

import pytest

from are_fast import runtime
from are_fast.cli import build_parser, main, parse_args
from are_fast.training.data import load_stage1, load_stage2
from are_fast.toy.data import compression_rows, tiny_llama, triplet_rows, write_jsonl
from are_fast.cli.stage2 import objective_line

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("endings") / "base"
    tiny_llama(str(path), hidden_size=16, layers=1)
    return str(path)


def test_traceback_on_request_is_the_real_one(monkeypatch, capsys):
    def failing_job():
        raise RuntimeError("boom")

    monkeypatch.setenv("ARE_FAST_TRACEBACK", "1")
    assert runtime.run_guarded("stage1", failing_job) == 1
    err = capsys.readouterr().err
    assert "NoneType: None" not in err
    assert "Traceback (most recent call last)" in err and "in failing_job" in err and "RuntimeError: boom" in err
    assert err.splitlines()[-1].startswith("are-fast stage1: internal error: RuntimeError: boom")
    monkeypatch.delenv("ARE_FAST_TRACEBACK")
    assert runtime.run_guarded("stage1", failing_job) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_blank_lines_are_counted_as_bad_rows_in_training_data(tmp_path):
    rows = compression_rows(3)
    path = tmp_path / "s1.jsonl"
    write_jsonl(str(path), rows)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "\n" + lines[1] + "   \n" + lines[2])
    kept, report = load_stage1(str(path))
    assert len(kept) == 3 and report.skipped == {"empty line": 2} and report.examples["empty line"] == [2, 4]
    assert "2 skipped (empty line; lines 2, 4...)" in report.summary()
    write_jsonl(str(path), triplet_rows(2, 1))
    path.write_text("\n" + path.read_text())
    kept, report = load_stage2(str(path), 1)
    assert len(kept) == 2 and report.skipped == {"empty line": 1} and report.bad_fraction == pytest.approx(1 / 3)


def test_an_exit_2_run_creates_nothing(base, tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    write_jsonl(str(data), compression_rows(8))
    (tmp_path / "bad.jsonl").write_text("\n\n{}\n")
    new = tmp_path / "new" / "deeper"
    stage1 = ["stage1", "--base-model", base, "--data", data, "--output-dir", new, "--no-progress", "--max-steps", 1]
    for argv, message in [
        (stage1[:4] + [tmp_path / "bad.jsonl"] + stage1[5:], "no usable stage-1 row"),  # bad data
        (stage1[:2] + [tmp_path / "missing"] + stage1[3:], "is not a directory"),  # bad model
        (stage1 + ["--best-metric", "eval_loss"], "best_metric: 'eval_loss' is not evaluated"),  # the trainer's check
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err, err[-2000:]
        assert not os.path.exists(tmp_path / "new"), argv
    code, _, err = run(["encode", "--model", tmp_path / "missing", "--input", data, "--output", new], capsys)
    assert code == 2 and not os.path.exists(tmp_path / "new")
    code, _, err = run(["ref-scores", "--data", data, "--model", base, "--base-model", base, "--num-negatives", 1,
                        "--output", new / "scores.safetensors"], capsys)
    assert code == 2 and not os.path.exists(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    code, _, err = run(stage1[:6] + [tmp_path / "file" / "out"] + stage1[7:], capsys)
    assert code == 2 and "is a file, not a folder" in err


def _parsers():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, subparsers.choices


def test_no_option_is_abbreviated(base, tmp_path, capsys):
    parser, commands = _parsers()
    assert parser.allow_abbrev is False and all(p.allow_abbrev is False for p in commands.values())
    assert all(p.allow_abbrev is False for p in build_parser().job_parsers.values())
    code, _, err = run(["stage1", "--base-model", base, "--data", "d", "--output-dir", tmp_path / "o",
                        "--max-step", 2], capsys)
    assert code == 2 and "unrecognized arguments: --max-step 2" in err
    with pytest.raises(SystemExit):
        parse_args(["stage2", "--ref-sig", "-1"])
    from are_fast.ops import native

    with pytest.raises(SystemExit):
        native.main(["--chec"])
    assert "unrecognized arguments: --chec" in capsys.readouterr().err


# Options whose default differs between jobs, and the words of each job's --help that say why.
EXPLAINED = {
    "threads": {"main": "runs fastest on one thread"},
    "log_interval": {"main": "each stage lasts about a minute"},
    "batch_size": {"ref-scores": "no gradients are kept", "main": "stage1/stage2: 8"},
    "eval_steps": {"main": "stage1/stage2: 0"},
    "num_embed_tokens": {"main": "the other jobs read k from the model"},
    "num_negatives": {"main": "stage2: 1"},
    "output_dir": {"main": "runs without options"},
}


def test_each_default_that_differs_between_jobs_says_why():
    _, commands = _parsers()
    defaults: dict = {}
    for name, parser in commands.items():
        if name == "demo":  # not a job: its options are the shapes of random test data
            continue
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                defaults.setdefault(action.dest, {})[name] = action
    differing = {dest for dest, by_job in defaults.items()
                 if len({repr(a.default) for a in by_job.values()}) > 1}
    assert differing <= set(EXPLAINED), f"explain the default of {sorted(differing - set(EXPLAINED))} in --help"
    for dest, reasons in EXPLAINED.items():
        for job, words in reasons.items():
            assert words in defaults[dest][job].help, (dest, job)


def test_ref_sign_reads_and_shows_as_plus_or_minus_one(capsys):
    _, commands = _parsers()
    stage2 = commands["stage2"]
    assert "--ref-sign {+1,-1}" in stage2.format_help()
    required = ["--data", "d", "--scores", "s", "--model", "m", "--base-model", "b", "--output-dir", "o"]
    for text, value in (("+1", 1.0), ("1", 1.0), ("-1", -1.0), ("-1.0", -1.0)):
        args = parse_args(["stage2"] + required + ["--ref-sign", text])
        assert args.ref_sign == value and type(args.ref_sign) is float
    assert "ref-sign -1," in objective_line(parse_args(["stage2"] + required + ["--ref-sign", "-1"]))
    assert "ref-sign +1," in objective_line(parse_args(["stage2"] + required))
    with pytest.raises(SystemExit):
        parse_args(["stage2"] + required + ["--ref-sign", "0"])
    assert "argument --ref-sign: expected +1 or -1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("failure, shown", [
    (ImportError("cannot import name 'CUDAProperties' from 'kernels'"),
     "failed on an import (ImportError: cannot import name 'CUDAProperties' from 'kernels'); the installed packages"),
    (RuntimeError("the tokenizer broke"), "failed (RuntimeError: the tokenizer broke)"),
])
def test_a_tokenizer_that_fails_to_load_is_reported_as_what_failed(base, tmp_path, capsys, monkeypatch, failure,
                                                                   shown):
    import transformers

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(8))
    for argv in (["stage1", "--base-model", base, "--data", tmp_path / "c.jsonl", "--output-dir", tmp_path / "o"],
                 ["encode", "--model", base, "--input", tmp_path / "c.jsonl", "--output", tmp_path / "e"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and shown in err and "no usable tokenizer" not in err, err[-2000:]
        assert "Traceback" not in err


def test_a_folder_without_tokenizer_files_has_no_usable_tokenizer(base, tmp_path, capsys):
    import shutil

    shutil.copytree(base, tmp_path / "bare")
    for name in os.listdir(tmp_path / "bare"):
        if name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            os.remove(tmp_path / "bare" / name)
    write_jsonl(str(tmp_path / "c.jsonl"), compression_rows(8))
    code, _, err = run(["stage1", "--base-model", tmp_path / "bare", "--data", tmp_path / "c.jsonl", "--output-dir",
                        tmp_path / "o"], capsys)
    assert code == 2 and "has no usable tokenizer (none of tokenizer.json" in err and "copy the tokenizer files" in err
