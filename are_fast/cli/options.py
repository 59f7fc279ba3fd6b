"""The options the ``are-fast`` jobs share, declared once: the parser, checked number types, ``--config``
files (checked exactly as flags), and the groups of model, data, training, evaluation and runtime options."""
from __future__ import annotations

import argparse
import json
import math
import os

from ..runtime import run_guarded
from ..training.data import DEFAULT_MAX_BAD_FRACTION


def _number(kind, low: float, inclusive: bool = True, high: float | None = None):
    """An argparse type: ``kind`` (int or float) in [low, high] (or (low, high] when not ``inclusive``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low) or (
                high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a value {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, COUNT = _number(int, 1), _number(int, 0)
POSITIVE, NONNEGATIVE = _number(float, 0, False), _number(float, 0)
FRACTION = _number(float, 0, True, 1)
CONFIG_HELP = "JSON or YAML file of options (keys as the option names); flags override it"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line (the problem, then where the options are explained) and exit 2. Options are
    never abbreviated (``--max-step`` is an error, not ``--max-steps``): a typo must not pick another option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def model_options(p) -> None:
    from ..ops.backends import BACKENDS  # the op registry's backends

    g = p.add_argument_group("model")
    g.add_argument("--num-embed-tokens", type=POSITIVE_INT, default=None,
                   help="k, compressed tokens <EMBED0>..<EMBED{k-1}> (default: the model's own; 5 for a base LM in stage1); "
                   "a value that disagrees with the model's tokens is an error")
    g.add_argument("--max-text-tokens", type=POSITIVE_INT, default=None,
                   help="compressor texts are cut to this many tokens (default 512, or what the model's positions leave "
                   "after k and the instruction when fewer; a value above its positions less k is an error)")
    g.add_argument("--max-target-tokens", type=POSITIVE_INT, default=None,
                   help="decoder targets are cut to this many tokens (default 512, or what the model's positions leave "
                   "after k and the eos when fewer; a larger value is an error)")
    g.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa", "flash_attention_2"],
                   help="attention kernel (default: transformers' choice); flash_attention_2 needs flash-attn")
    g.add_argument("--route", default=None, choices=["padded", "packed", "varlen"],
                   help="how rows of different lengths run: padded, packed (several per row) or varlen (attention per "
                        "sequence); default: the fastest measured on the device (varlen on CPU, padded on CUDA)")
    g.add_argument("--checkpointing", action="store_true", help="per-layer activation checkpointing (compressor and decoder)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights' dtype (default: as saved)")
    g.add_argument("--lora-rank", type=COUNT, default=0, help="LoRA rank on the compressor via peft; 0: full fine-tuning (default)")
    g.add_argument("--lora-alpha", type=POSITIVE_INT, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--lora-dropout", type=_number(float, 0, True, 0.99), default=0.1, help="LoRA dropout (default 0.1)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory (default off)")
    g.add_argument("--backend", default=None, choices=list(BACKENDS),
                   help="loss-op backend (default: ARE_FAST_BACKEND, else by device)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization and data order (default 0)")


def runtime_options(p, threads: int | None = None, log_interval: float = 30.0, why: str = "",
                     training: bool = False) -> None:
    """Device, threads and progress options; ``threads`` / ``log_interval``: this job's defaults, ``why``: the
    reason they differ from the other jobs' (shown in --help); ``training``: add --logging-steps."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available; under torchrun "
                   "each process takes cuda:LOCAL_RANK)")
    default = threads or "torch's choice, usually all cores"
    g.add_argument("--threads", type=POSITIVE_INT, default=threads,
                   help=f"torch CPU threads (default {default}{why}); give fewer when other processes share the cores")
    g.add_argument("--log-interval", type=NONNEGATIVE, default=log_interval,
                   help=f"seconds between two progress lines when the output is not a terminal (default "
                   f"{log_interval:g}{why})")
    if training:
        g.add_argument("--logging-steps", type=COUNT, default=0,
                       help="a progress line every N steps instead (transformers' logging_steps; loss.jsonl gets "
                       "every step either way); 0: every --log-interval seconds (default 0)")


def eval_options(p, stage2: bool) -> None:
    g = p.add_argument_group("held-out evaluation")
    kind = "stage-2 rows: alignment loss and triplet accuracy" if stage2 else "stage-1 rows: compression loss"
    g.add_argument("--eval-data", default=None, help=f"held-out file in the --data format ({kind})")
    g.add_argument("--eval-fraction", type=FRACTION, default=0.0,
                   help="else hold out this fraction of --data (chosen with --seed); 0: none (default)")
    if not stage2:
        g.add_argument("--eval-triplets", default=None,
                       help="stage-2 rows {query, pos, neg, instruction}: also track triplet accuracy during stage 1")
    g.add_argument("--eval-steps", type=COUNT, default=0,
                   help="evaluate every N steps; 0: before training and at the end only (default 0)")
    g.add_argument("--eval-batch-size", type=POSITIVE_INT, default=32, help="rows per evaluation batch (default 32)")
    g.add_argument("--best-metric", default=None, choices=["eval_loss", "eval_acc_hard", "eval_acc_random"],
                   help="keep the best evaluation's weights in <output-dir>/best and export them as model/ "
                   "(default: export the last step)")
    g.add_argument("--early-stopping-patience", type=COUNT, default=0,
                   help="stop when --best-metric has not improved for N evaluations in a row (transformers' "
                   "EarlyStoppingCallback); needs --best-metric; 0: never (default 0)")
    g.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="write TensorBoard events to <output-dir>/tensorboard (default: when tensorboard is installed)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events")


def train_options(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default=None, help="run directory: checkpoints, loss.jsonl, model/ (required)")
    g.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="optimizer steps (default 100 unless --epochs)")
    g.add_argument("--epochs", type=POSITIVE, default=None,
                   help="passes over the data instead of --max-steps (fractions allowed); not with --max-steps")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="rows per micro-batch per process (default 8)")
    g.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=POSITIVE, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--lr-scheduler", default="cosine", choices=["constant", "linear", "cosine"],
                   help="learning-rate schedule after the warmup (transformers' get_scheduler): constant, linear or "
                   "cosine decay to 0 at the last step (default cosine)")
    g.add_argument("--warmup-steps", type=COUNT, default=0,
                   help="linear warmup steps from 0 to --lr before the schedule (default 0)")
    g.add_argument("--max-grad-norm", type=NONNEGATIVE, default=1.0, help="gradient clipping norm; 0 turns it off (default 1)")
    g.add_argument("--save-every", type=COUNT, default=0, help="checkpoint every N steps; 0: at the end only (default 0)")
    g.add_argument("--keep-checkpoints", type=POSITIVE_INT, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--restart", dest="resume", action="store_false",
                   help="start over: remove the checkpoints and loss.jsonl of --output-dir (default: resume them when "
                   "their settings match, else stop with the settings that differ)")
    g.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="bf16 autocast (default: on CUDA only, unless --fp16)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 autocast with a gradient scaler (for GPUs without bf16; not with --bf16) (default off)")
    g.add_argument("--bucket-window", type=POSITIVE_INT, default=32, help="batches per length-sorted window (default 32)")
    g.add_argument("--fsdp", action="store_true", help="shard the models with FSDP2 under torchrun (NCCL on GPU, gloo on CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress (default: a bar on a terminal, else a line every --log-interval seconds)")


def data_options(p, stage2: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="JSON-lines file of rows (required): " +
                   ("{query, pos, neg, instruction}" if stage2 else "{context, instruction, output}"))
    g.add_argument("--instruction", default=None, help="instruction for rows that have none (default: such rows are skipped)")
    g.add_argument("--max-bad-fraction", type=FRACTION, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail when more than this fraction of the rows is bad (skipped rows are reported with "
                   f"their line numbers) (default {DEFAULT_MAX_BAD_FRACTION})")
    if stage2:
        g.add_argument("--num-negatives", type=POSITIVE_INT, default=1, help="negatives per row; rows with fewer are skipped (default 1)")


def config_argv(path: str, parser) -> list[str]:
    """The config file's options as command-line tokens, so the file is checked exactly as flags are."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--config {path!r} cannot be read: {getattr(err, 'strerror', None) or err}")
    kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    try:
        if kind == "YAML":
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # the parsers raise their own error types
        parser.error(f"--config {path!r} is not valid {kind}: {' '.join(str(err).split())}")
    if not isinstance(values, dict):
        parser.error(f"--config {path!r}: expected a mapping of option names to values")
    flags = {o: a for a in parser._actions for o in a.option_strings if o.startswith("--")}
    argv, unknown = [], []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = flags.get(flag)
        if action is None or flag in ("--config", "--help"):
            switch = [o for o, a in flags.items() if a.dest == str(key).replace("-", "_") and a.nargs == 0]
            unknown.append(f"{key} (the switch is {switch[0][2:]}: true)" if switch else str(key))
            continue
        if value is None:
            continue
        if action.nargs == 0:  # a switch: true gives the flag, false leaves it out
            if not isinstance(value, bool):
                parser.error(f"--config {path!r}: {key} is a switch; expected true or false, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (bool, list, dict)):
            parser.error(f"--config {path!r}: {key} expects a single value, got {value!r}")
        else:
            argv.append(f"{flag}={value}")
    if unknown:
        parser.error(f"--config {path!r}: unknown options {', '.join(unknown)}")
    return argv


def parse_with_config(parser, argv, required=()) -> argparse.Namespace:
    """Parse ``argv`` (after the command) after the ``--config`` file's options; check the ``required`` ones
    (names of ``args``), which may come from either."""
    args = parser.parse_args(argv)
    if args.config:
        args = parser.parse_args(config_argv(args.config, parser) + list(argv))
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing) + " (a flag or a --config key)")
    return args


def check_steps(parser, args) -> None:
    """--epochs or --max-steps (default 100 steps), not both."""
    if args.epochs is not None and args.max_steps is not None:
        parser.error("--epochs and --max-steps: give one of them (the number of steps follows from --epochs)")
    if args.max_steps is None:
        args.max_steps = 100


def pick(cls, args, **renames):
    from dataclasses import fields

    values = vars(args)
    return cls(**{f.name: values[renames.get(f.name, f.name)] for f in fields(cls)
                  if renames.get(f.name, f.name) in values})


def run_training_job(args: argparse.Namespace, work) -> int:
    """Run ``work(args)`` for a parsed training job: one line and exit 2 for bad input, 1 for run-time failures,
    130/143 on SIGINT/SIGTERM (after the current step; a rerun resumes); see ``are_fast.runtime``."""
    def job() -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        work(args)

    return run_guarded(args.command, job, "rerun the same command to resume")


def on_first_rank() -> bool:
    """Whether this process prints the job's summary (rank 0 under torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def held_out(args):
    from ..training.evaluate import HeldOut

    return pick(HeldOut, args, data="eval_data", fraction="eval_fraction", triplets="eval_triplets",
                 batch_size="eval_batch_size")
