"""``are-fast encode``: embed every row of a file into resumable shards (``are_fast.encoding.encode_job``)."""
from __future__ import annotations

import argparse

from ..encoding.defaults import NORMALIZE
from .options import FRACTION, POSITIVE_INT

NAME = "encode"
HELP = "embed every row of a file into resumable shards (see are_fast.encoding.encode_job)"
DESCRIPTION = ("Embed each row of --input with the model into shards in --output, then write manifest.json. A rerun "
               "resumes (finished shards are kept); under torchrun each rank takes every WORLD_SIZE-th shard. Bad "
               "rows are skipped and reported with their line numbers. Exit 2: bad options, model, input or output "
               "folder (nothing is computed); 1: a failure at run time (finished shards are kept); 130/143: "
               "interrupted (finished shards are kept; rerun to resume).")
REQUIRED = ("model", "input", "output")


def add_options(enc) -> None:
    enc.add_argument("--model", default=None,
                     help="model directory (a trained checkpoint with <EMBED*> tokens) (required)")
    enc.add_argument("--input", default=None, help="a .jsonl, .txt (a text a line) or .parquet file (required)")
    enc.add_argument("--output", default=None, help="output directory (created; reused to resume) (required)")
    enc.add_argument("--field", default="text", help="the text field of .jsonl rows / .parquet column (default text)")
    enc.add_argument("--input-format", choices=["jsonl", "txt", "parquet"], default=None,
                     help="input format (default: from the file extension)")
    enc.add_argument("--instruction", default=None,
                     help="instruction appended after each text (default: the model folder's default prompt, its "
                     "training instruction, as Encoder.encode and sentence-transformers use it; \"\" for none)")
    enc.add_argument("--shard-size", type=POSITIVE_INT, default=10000, help="input rows per shard (default 10000)")
    enc.add_argument("--shard-format", choices=["safetensors", "npy"], default="safetensors",
                     help="safetensors: one file with embeddings and row_ids; npy: .npy and .rows.npy")
    enc.add_argument("--max-length", type=POSITIVE_INT, default=None,
                     help="texts are cut to this many tokens (default: the model folder's are_fast_module.json, its "
                     "training --max-text-tokens, else 512, as Encoder.from_pretrained)")
    enc.add_argument("--max-tokens", type=POSITIVE_INT, default=None,
                     help="token budget per batch (default 32768 on CUDA, 8192 on CPU)")
    enc.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="cap on texts per batch (default: none)")
    enc.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    enc.add_argument("--threads", type=POSITIVE_INT, default=None,
                     help="torch CPU threads (default: torch's choice, all cores); give 1-2 when other processes share the cores")
    enc.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default bfloat16 on CUDA and on CPUs whose bf16 units measure faster, else "
                     "float32); embeddings are saved in float32")
    enc.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=NORMALIZE,
                     help="L2-normalize the embeddings (default %(default)s, as Encoder.encode and sentence-transformers;"
                     " cosine similarity is the same either way)")
    enc.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    enc.add_argument("--num-embed-tokens", type=POSITIVE_INT, default=None,
                     help="k (default: the model's <EMBED*> tokens; needed only for a model without them, which then "
                     "gets k new untrained tokens: a baseline); a value that disagrees with the model is an error")
    enc.add_argument("--max-bad-fraction", type=FRACTION, default=0.5,
                     help="exit 2 when more than this fraction of the rows is bad (default 0.5)")
    enc.add_argument("--overwrite", action="store_true",
                     help="replace the shards of another job in --output (default: refuse; a rerun of the same job "
                     "resumes)")


def run(args) -> int:
    import torch

    from ..encoding.encode_job import JobConfig, run_job

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_job(JobConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "config", "threads")}))
