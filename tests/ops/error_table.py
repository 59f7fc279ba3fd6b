"""Print the largest relative error of every op, dtype and backend against the float64 reference.

Run: python tests/ops/error_table.py [--trials 20] [--device cpu|cuda]. Each trial draws fresh inputs (the
shapes of _helpers.make_inputs), runs the ops on the device (default: cuda when available; the Triton interpreter
on cpu) and compares the value and every gradient with the float64 reference on CPU, frozen and trainable head.
"""
import argparse
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(here)]  # _helpers in tests/



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20, help="fresh random inputs per cell (default 20)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":  # the Triton interpreter, set before _helpers imports the kernels
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    from _helpers import FUSED_BACKENDS, OPS, make_inputs, rel_error, representable, run_op

    torch.manual_seed(1234)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"| op | backend | {' | '.join(dtypes)} |\n|---|---|{'---|' * len(dtypes)}")
    for op in OPS:
        for backend in FUSED_BACKENDS:
            cells = []
            for dtype in dtypes.values():
                worst = 0.0
                for trial in range(args.trials):
                    trainable = trial % 2 == 1
                    masters = representable(make_inputs(), dtype)
                    ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", trainable)
                    out, _, grads = run_op(op, masters, dtype, backend, trainable, upstream=upstream,
                                           device=args.device, chunk_rows=4)
                    worst = max([worst, rel_error(out, ref)] + [rel_error(grads[n], g) for n, g in ref_grads.items() if g is not None])
                cells.append(f"{worst:.1e}")
            print(f"| {op} | {backend} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
