"""The command line: --help documents the demo, and the demo runs on a tiny shape."""
import pytest

from are_fast.cli import build_parser, main
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
