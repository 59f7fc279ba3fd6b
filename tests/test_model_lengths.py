"""Lengths from the model, through the jobs: a base model with fewer positions than the 512-token defaults (a
GPT-2 with 32) trains with the defaults (texts and targets cut to what its positions leave, counted), and a
larger explicit limit ends the job with exit 2 naming both numbers, before any work, without a traceback."""
import os

import pytest
import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

from are_fast.cli import main
from are_fast.toy.data import compression_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A saved GPT-2 with 32 positions (ByT5 vocabulary) and stage-1 rows of about 40 bytes each."""
    root = tmp_path_factory.mktemp("short")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=4, n_positions=32, eos_token_id=1,
                               bos_token_id=None)).save_pretrained(root / "gpt2")
    ByT5Tokenizer().save_pretrained(root / "gpt2")
    rows = compression_rows(8)
    for row in rows:
        row["output"] += " and then the same again"  # targets past the positions too
    write_jsonl(root / "c.jsonl", rows)
    return root


def _stage1(root, out, *extra):
    return ["stage1", "--base-model", root / "gpt2", "--data", root / "c.jsonl", "--output-dir", out, "--no-progress",
            "--batch-size", "4", "--max-steps", "1", "--num-embed-tokens", "3", *extra]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    return code, out, err


def test_stage1_defaults_fit_a_model_with_few_positions(short_model, tmp_path, capsys):
    code, out, err = _run(_stage1(short_model, tmp_path / "run"), capsys)
    assert code == 0, err[-3000:]
    assert os.path.isfile(tmp_path / "run" / "model" / "config.json")


@pytest.mark.parametrize("option, value, message", [
    ("--max-text-tokens", 512, "max_text_tokens: 512 tokens do not fit the model's 32 positions"),
    ("--max-target-tokens", 30, "max_target_tokens: 30 tokens do not fit the model's 32 positions"),
])
def test_a_larger_explicit_limit_is_exit_2_naming_both_numbers(short_model, tmp_path, capsys, option, value, message):
    code, _, err = _run(_stage1(short_model, tmp_path / "run", option, value), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("are-fast stage1: error: ") and message in lines[-1], err[-3000:]
    assert not os.path.exists(tmp_path / "run" / "model")
