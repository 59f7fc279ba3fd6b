"""The training subcommands of ``are-fast``: stage1, ref-scores, stage2 and main (the embedded default).

Every option can come from a flag or from a config file (``--config run.yaml`` or ``.json``) whose keys are
the flags' names (``max-steps`` or ``max_steps``; a switch such as ``no-progress`` takes true or false); the
file's values are checked exactly as flags are (types, ranges, choices), and flags win over the file.
Every numeric option is range-checked. Errors print one line and exit 2 (see ``are_fast.runtime``).
Run under ``torchrun`` for DDP.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from .training.data import DEFAULT_MAX_BAD_FRACTION
from .runtime import run_guarded

_PARSERS: dict = {}


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
_REQUIRED = {
    "stage1": ("data", "base_model", "output_dir"),
    "ref-scores": ("data", "model", "base_model", "output"),
    "stage2": ("data", "scores", "model", "base_model", "output_dir"),
    "main": (),
}


def _model_options(p) -> None:
    from .ops.backends import BACKENDS  # the op registry's backends

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


def _runtime_options(p, threads: int | None = None, log_interval: float = 30.0, why: str = "",
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


def _ref_sign(text: str) -> float:
    """--ref-sign: +1 or -1 (1, 1.0, -1.0 too), as a float."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, -1.0):
        raise argparse.ArgumentTypeError(f"expected +1 or -1, got {text!r}")
    return value


def _eval_options(p, stage2: bool) -> None:
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


def _train_options(p) -> None:
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


def _data_options(p, stage2: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="JSON-lines file of rows (required): " +
                   ("{query, pos, neg, instruction}" if stage2 else "{context, instruction, output}"))
    g.add_argument("--instruction", default=None, help="instruction for rows that have none (default: such rows are skipped)")
    g.add_argument("--max-bad-fraction", type=FRACTION, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail when more than this fraction of the rows is bad (skipped rows are reported with "
                   f"their line numbers) (default {DEFAULT_MAX_BAD_FRACTION})")
    if stage2:
        g.add_argument("--num-negatives", type=POSITIVE_INT, default=1, help="negatives per row; rows with fewer are skipped (default 1)")


def add_training_commands(subparsers) -> None:
    """Add stage1, ref-scores, stage2 and main to the ``are-fast`` parser."""
    config_help = "JSON or YAML file of options (keys as the option names); flags override it"
    p = subparsers.add_parser("stage1", help="stage 1: information compression",
                              description="Train the compressor to let the frozen base LM reconstruct each row's output.")
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--base-model", default=None, help="base causal LM directory: compressor start and frozen decoder (required)")
    _data_options(p, False), _model_options(p), _train_options(p), _eval_options(p, False)
    _runtime_options(p, training=True)
    _PARSERS["stage1"] = p

    p = subparsers.add_parser("ref-scores", help="reference scores of stage-2 rows under the stage-1 model",
                              description="log p(pos|c(q)) and log p(neg_j|c(q)) per row, saved by row id (safetensors).")
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--model", default=None, help="stage-1 model directory (<output-dir>/model of stage1) (required)")
    p.add_argument("--base-model", default=None, help="base causal LM directory, the frozen decoder (required)")
    p.add_argument("--output", default=None, help="score file to write (.safetensors) (required)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                   help="rows per batch (default 32, not training's 8: no gradients are kept, so batches can be larger)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress (default: a bar on a terminal, else a line every --log-interval seconds)")
    _data_options(p, True), _model_options(p), _runtime_options(p)
    _PARSERS["ref-scores"] = p

    p = subparsers.add_parser("stage2", help="stage 2: conditional distribution alignment",
                              description="Train the stage-1 compressor with the alignment loss and the reference scores.")
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--scores", default=None, help="reference-score file from ref-scores (required)")
    p.add_argument("--model", default=None, help="stage-1 model directory, the compressor's start (required)")
    p.add_argument("--base-model", default=None, help="base causal LM directory, the frozen decoder (required)")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="sigmoid scale of the alignment loss (default 0.1)")
    p.add_argument("--tau", type=POSITIVE, default=0.1, help="temperature of the alignment loss (default 0.1)")
    p.add_argument("--ref-sign", type=_ref_sign, default=1.0, metavar="{+1,-1}",
                   help="+1 adds the reference margin as released (default); -1 subtracts it (DPO-consistent)")
    p.add_argument("--distance", default="logprob", choices=["logprob", "kl"],
                   help="logprob: |log p(pos|c(q)) - log p(pos|c(pos))| as released (default); kl: conditional KL")
    _data_options(p, True), _model_options(p), _train_options(p), _eval_options(p, True)
    _runtime_options(p, training=True)
    _PARSERS["stage2"] = p

    from .toy.job import MainJobConfig

    d = MainJobConfig()
    p = subparsers.add_parser("main", help="the main job on the embedded default (tiny Llama, ByT5 bytes, toy data)",
                              description="Pretrain a tiny Llama on generated restatements, then stage 1 -> "
                              "reference scores -> stage 2, with held-out triplet accuracy through both. No download; "
                              "about 2.5 minutes on 2 CPU cores.")
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--output-dir", default=d.output_dir,
                   help=f"where everything goes (default {d.output_dir}: the embedded default runs without options)")
    for name, help_text in (("hidden_size", "hidden size of the tiny Llama"), ("layers", "its layers"),
                            ("num_embed_tokens", "k compressed tokens (stage1's default for a base LM; the other "
                             "jobs read k from the model)"),
                            ("stage1_rows", "generated stage-1 rows"),
                            ("stage2_rows", "generated stage-2 rows"), ("eval_rows", "held-out evaluation rows"),
                            ("num_negatives", "negatives per stage-2 row (stage2: 1; the generated rows have a hard "
                             "negative per changed slot, and two make the accuracy table)"), ("pretrain_steps", "LM pretraining steps"),
                            ("stage1_steps", "stage-1 steps"), ("stage2_steps", "stage-2 steps"),
                            ("eval_steps", "held-out evaluation every N steps of stages 1 and 2 (stage1/stage2: 0, "
                             "before and after only; here the accuracy table needs the curve)"),
                            ("batch_size", "rows per batch (stage1/stage2: 8; the tiny model's batches are cheap)"),
                            ("seed", "seed")):
        kind = int if name == "seed" else COUNT if name == "eval_steps" else POSITIVE_INT
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    for name, help_text in (("stage1_lr", "stage-1 learning rate"), ("stage2_lr", "stage-2 learning rate"),
                            ("beta", "alignment beta"), ("tau", "alignment tau")):
        p.add_argument("--" + name.replace("_", "-"), type=POSITIVE, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or lines")
    p.add_argument("--restart", dest="resume", action="store_false",
                   help="start every step over (default: resume; a step whose settings changed starts over by itself)")
    _runtime_options(p, threads=d.threads, log_interval=d.log_interval,
                     why=": the tiny model runs fastest on one thread and each stage lasts about a minute")
    _PARSERS["main"] = p


def _config_argv(path: str, parser) -> list[str]:
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


def parse_training_args(command: str, argv) -> argparse.Namespace:
    """Parse ``argv`` (after the command) after the config file's options; check required options."""
    parser = _PARSERS[command]
    args = parser.parse_args(argv)
    if args.config:
        args = parser.parse_args(_config_argv(args.config, parser) + list(argv))
    missing = [name for name in _REQUIRED[command] if getattr(args, name) is None]
    if missing:
        parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing) + " (a flag or a --config key)")
    if command in ("stage1", "stage2"):
        if args.epochs is not None and args.max_steps is not None:
            parser.error("--epochs and --max-steps: give one of them (the number of steps follows from --epochs)")
        if args.max_steps is None:
            args.max_steps = 100
    return args


def _pick(cls, args, **renames):
    from dataclasses import fields

    values = vars(args)
    return cls(**{f.name: values[renames.get(f.name, f.name)] for f in fields(cls)
                  if renames.get(f.name, f.name) in values})


def run_training_command(args: argparse.Namespace) -> int:
    """Run a parsed training subcommand: one line and exit 2 for bad input, 1 for run-time failures, 130/143
    on SIGINT/SIGTERM (after the current step; a rerun resumes); see ``are_fast.runtime``."""
    return run_guarded(args.command, lambda: _run(args), "rerun the same command to resume")


def _run(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from .training.jobs import ModelOptions, run_reference_scores, run_stage1, run_stage2
    from .training.reporting import run_summary
    from .training.trainer import TrainConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "main":
        from .toy.job import MainJobConfig, run_main_job

        run_main_job(_pick(MainJobConfig, args))
        return
    opts = _pick(ModelOptions, args)
    if args.command == "stage1":
        run_stage1(args.data, args.base_model, _pick(TrainConfig, args), opts, args.instruction, args.max_bad_fraction,
                   _held_out(args))
    elif args.command == "ref-scores":
        ref_p, _, _ = run_reference_scores(args.data, args.model, args.base_model, args.output, args.num_negatives,
                                           opts, args.batch_size, args.instruction, args.progress,
                                           args.max_bad_fraction, args.device, args.log_interval)
    else:
        run_stage2(args.data, args.scores, args.model, args.base_model, _pick(TrainConfig, args), opts,
                   args.num_negatives, args.beta, args.tau, args.ref_sign, args.distance, args.instruction,
                   args.max_bad_fraction, _held_out(args))
    if os.environ.get("RANK", "0") == "0":
        if args.command == "ref-scores":
            seconds = time.perf_counter() - start
            print(f"are-fast ref-scores: done - {len(ref_p)} rows scored in {seconds:.0f} s "
                  f"({len(ref_p) / seconds:.0f} rows/s)\n  {'scores':<15} {os.path.abspath(args.output)}")
        else:
            settings = {"objective": objective_line(args)} if args.command == "stage2" else None
            print(run_summary(f"are-fast {args.command}", args.output_dir,
                              {"model": os.path.join(args.output_dir, "model")}, settings))


def objective_line(args: argparse.Namespace) -> str:
    """Stage 2's loss settings as its summary shows them (the reference sign as +1 or -1, as --ref-sign takes it)."""
    return (f"beta {args.beta:g}, tau {args.tau:g}, ref-sign {args.ref_sign:+.0f}, distance {args.distance}")


def _held_out(args):
    from .training.evaluate import HeldOut

    return _pick(HeldOut, args, data="eval_data", fraction="eval_fraction", triplets="eval_triplets",
                 batch_size="eval_batch_size")
