"""``are-fast demo``: each fused op on random data, time and peak memory against the reference."""
from __future__ import annotations

from ..ops.backends import BACKENDS
from ..runtime import run_guarded
from .options import POSITIVE_INT

NAME = "demo"
HELP = "run each fused op on random data; print time and peak memory against the reference"
DESCRIPTION = None
REQUIRED = ()


def add_options(demo) -> None:
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


def run(args) -> int:
    def demo() -> None:  # run_demo returns its table's rows; the command's result is the printed tables
        from ..tools.demo import run_demo

        for backend in args.backend or [None]:
            run_demo(args.hidden_size, args.vocab, args.batch, args.length, args.negatives, args.device, args.dtype,
                     args.repeats, backend)

    return run_guarded(NAME, demo)
