"""The ``are-fast`` command line (also ``python -m are_fast``): one subcommand per job."""
from __future__ import annotations

import argparse
import sys

from .encoding.defaults import NORMALIZE
from .runtime import run_guarded
from .ops.backends import BACKENDS
from .train_cli import FRACTION, POSITIVE_INT, add_training_commands, parse_training_args, run_training_command


class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line (the problem, then where the options are explained) and exit 2. Options are
    never abbreviated (``--max-step`` is an error, not ``--max-steps``): a typo must not pick another option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="run each fused op on random data; print time and peak memory against the reference"
    )
    demo.add_argument("--hidden-size", type=POSITIVE_INT, default=512, help="H, the LM head's hidden size (default 512)")
    demo.add_argument("--vocab", type=POSITIVE_INT, default=32000, help="V, the vocabulary size (default 32000)")
    demo.add_argument("--batch", type=POSITIVE_INT, default=4, help="sequences per stream (default 4)")
    demo.add_argument("--length", type=POSITIVE_INT, default=256, help="tokens per sequence (default 256)")
    demo.add_argument("--negatives", type=POSITIVE_INT, default=2, help="negatives per query in alignment_loss (default 2)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    demo.add_argument("--repeats", type=POSITIVE_INT, default=2, help="timed runs per case; the best is shown (default 2)")
    demo.add_argument("--backend", action="append", choices=[b for b in BACKENDS if b != "reference"],
                      help="fused backend set against the reference; repeat for one table each (default: the device's, "
                      "ARE_FAST_BACKEND); native builds on first use; triton on CPU needs TRITON_INTERPRET=1")


def _add_encode(subparsers) -> None:
    enc = subparsers.add_parser(
        "encode", help="embed every row of a file into resumable shards (see are_fast.encoding.encode_job)",
        description="Embed each row of --input with the model into shards in --output, then write manifest.json. "
        "A rerun resumes (finished shards are kept); under torchrun each rank takes every WORLD_SIZE-th shard. "
        "Bad rows are skipped and reported with their line numbers. Exit 2: bad options, model, input or output "
        "folder (nothing is computed); 1: a failure at run time (finished shards are kept); 130/143: interrupted "
        "(finished shards are kept; rerun to resume).",
    )
    enc.add_argument("--model", required=True, help="model directory (a trained checkpoint with <EMBED*> tokens)")
    enc.add_argument("--input", required=True, help="a .jsonl, .txt (a text a line) or .parquet file")
    enc.add_argument("--output", required=True, help="output directory (created; reused to resume)")
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
                     help="model dtype (default bfloat16 on CUDA, float32 on CPU); embeddings are saved in float32")
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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="are-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_demo(subparsers)
    _add_encode(subparsers)
    add_training_commands(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("stage1", "ref-scores", "stage2", "main"):  # reparsed: a --config file gives defaults
        argv = sys.argv[1:] if argv is None else list(argv)
        command = args.command
        args = parse_training_args(command, argv[argv.index(command) + 1:])
        args.command = command
        return run_training_command(args)
    if args.command == "demo":
        from .tools.demo import run_demo

        def demo() -> None:  # run_demo returns its table's rows; the command's result is the printed tables
            for backend in args.backend or [None]:
                run_demo(args.hidden_size, args.vocab, args.batch, args.length, args.negatives, args.device, args.dtype,
                         args.repeats, backend)

        return run_guarded("demo", demo)
    import torch

    from .encoding.encode_job import JobConfig, run_job

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_job(JobConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "threads")}))
