"""The command line: --help documents the demo, the demo runs on a tiny shape, every job reads --config."""
import json

import pytest

from are_fast.cli import JOBS, build_parser, main, parse_args
from are_fast.ops import registry


def test_help_lists_every_demo_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--hidden-size", "--vocab", "--batch", "--length", "--negatives", "--device", "--dtype", "--repeats"):
        assert option in text


def test_demo_runs(capsys):
    assert main(["demo", "--hidden-size", "16", "--vocab", "50", "--batch", "2", "--length", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for op in (*registry.OPS, "alignment_loss"):
        assert op in out


def test_every_job_takes_a_config_file():
    parsers = build_parser().job_parsers
    assert set(parsers) == set(JOBS) and all("--config" in p.format_help() for p in parsers.values())


def test_encode_reads_its_options_from_a_config_file_below_the_flags(tmp_path, capsys):
    config = tmp_path / "encode.json"
    config.write_text(json.dumps({"model": "m", "input": "rows.jsonl", "output": "out", "shard_size": 5,
                                  "no-progress": True}))
    args = parse_args(["encode", "--config", str(config), "--output", "flag-out"])
    assert (args.model, args.input, args.output, args.shard_size, args.progress) == ("m", "rows.jsonl", "flag-out", 5,
                                                                                       False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["encode", "--input", "rows.jsonl"])
    assert exit_info.value.code == 2
    assert "missing --model, --output (a flag or a --config key)" in capsys.readouterr().err
    config.write_text(json.dumps({"model": "m", "input": "rows.jsonl", "output": "out", "shard-size": 0}))
    with pytest.raises(SystemExit):
        parse_args(["encode", "--config", str(config)])
    assert "argument --shard-size: expected a value >= 1, got 0" in capsys.readouterr().err
