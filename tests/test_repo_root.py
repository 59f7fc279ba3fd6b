"""Run from the repository root as a user of a fresh clone does (``python -m ...`` puts the root first on
sys.path), with transformers, the PyPI ``kernels`` package it imports, and a real byte-level BPE tokenizer.

The top-level ``kernels/`` folder (our Triton passes, installed as ``are_fast.kernels``) once shadowed PyPI's
``kernels`` there, so ``import transformers`` failed and a model's tokenizer check blamed the tokenizer. These
tests run every step in a subprocess whose working directory is the repository root: nothing of this pytest
process's sys.path leaks in.
"""
import importlib.metadata
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from _helpers import tiny_llama_with_bpe
from are_fast.encoding.encode_job import read_embeddings
from are_fast.toy.data import compression_rows, write_jsonl

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def from_repo_root(*args, timeout=600):
    """(exit code, stdout, stderr) of ``python ARGS`` run in the repository root, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", ARE_FAST_TRACEBACK="1")
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_import_kernels_from_the_repo_root_gives_pypis_package():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed (transformers >= 5.25 requires it), so nothing can shadow it")
    code, out, err = from_repo_root("-c", "import kernels, transformers; from transformers import PreTrainedModel; "
                                    "print(kernels.__file__)")
    assert code == 0, err[-3000:]
    location = os.path.realpath(out.strip())
    assert location.startswith(os.path.realpath(str(dist.locate_file("kernels")))), location
    assert not location.startswith(os.path.join(os.path.realpath(REPO_ROOT), "kernels")), location


def test_a_bpe_model_runs_a_job_from_the_repo_root(tmp_path):
    """A tiny Llama with a trained byte-level BPE tokenizer: the tokenizer loads and round-trips text, then
    ``python -m are_fast stage1`` trains 2 steps and ``python -m are_fast encode`` embeds a few texts with it."""
    model = tmp_path / "model"
    tiny_llama_with_bpe(model)
    texts = ["A small dog runs in the park.", "The big cat sleeps at home.", "A red bird sings by the river."]
    script = ("import json, sys; from transformers import AutoTokenizer, PreTrainedModel; "
              f"tok = AutoTokenizer.from_pretrained({str(model)!r}); texts = {texts!r}; "
              "ids = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]; "
              "print(json.dumps({'fast': tok.is_fast, 'ids': ids, 'back': [tok.decode(i) for i in ids]}))")
    code, out, err = from_repo_root("-c", script)
    assert code == 0, err[-3000:]
    loaded = json.loads(out)
    assert loaded["fast"] and loaded["back"] == texts
    assert all(0 < len(ids) < len(t.encode()) / 2 for ids, t in zip(loaded["ids"], texts))  # merges are used

    data = tmp_path / "stage1.jsonl"
    write_jsonl(str(data), compression_rows(16))
    code, out, err = from_repo_root("-m", "are_fast", "stage1", "--base-model", model, "--data", data, "--output-dir",
                                    tmp_path / "s1", "--max-steps", 2, "--batch-size", 4, "--num-embed-tokens", 2,
                                    "--no-progress", "--threads", 1)
    assert code == 0, err[-3000:]
    with open(tmp_path / "s1" / "loss.jsonl") as f:
        steps = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    code, out, err = from_repo_root("-m", "are_fast", "encode", "--model", tmp_path / "s1" / "model", "--input",
                                    tmp_path / "texts.txt", "--output", tmp_path / "emb", "--no-progress",
                                    "--threads", 1)
    assert code == 0, err[-3000:]
    row_ids, emb = read_embeddings(str(tmp_path / "emb"))
    assert row_ids.tolist() == [0, 1, 2] and emb.shape == (3, 16) and np.isfinite(emb).all()
    assert np.linalg.norm(emb[0] - emb[1]) > 1e-3 and np.linalg.norm(emb[1] - emb[2]) > 1e-3  # texts differ
