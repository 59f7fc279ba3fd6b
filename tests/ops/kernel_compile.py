"""Compile every variant of the Triton kernels for one CUDA architecture with the installed triton, no GPU needed
(triton's own LLVM and ptxas take the source to a cubin): ``python tests/ops/kernel_compile.py 90`` prints one
JSON line per variant. It must run without TRITON_INTERPRET (under it @triton.jit gives interpreted functions,
which do not compile); test_kernel_compile.py starts it so.
"""
import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CONSTEXPRS = ("BLOCK_V", "WRITE_GRAD", "SYNC_TILES", "HAS_SOFTCAP")
# The type of each argument as the launchers pass it (GRAD: the gradient output's element type; Python ints of
# these sizes are 32-bit).
ARGUMENTS = {
    "logprob_epilogue": {
        "logits_ptr": "*fp32", "stride_row": "i32", "grad_ptr": "GRAD", "stride_grad": "i32", "targets_ptr": "*i64",
        "scale_ptr": "*fp32", "out_ptr": "*fp32", "vocab": "i32", "ignore_index": "i32", "softcap": "fp32", "logit_scale": "fp32",
    },
    "kl_epilogue": {
        "p_ptr": "*fp32", "q_ptr": "*fp32", "stride_p": "i32", "stride_q": "i32", "grad_p_ptr": "GRAD",
        "grad_q_ptr": "GRAD", "stride_grad_p": "i32", "stride_grad_q": "i32", "valid_ptr": "*u8",
        "scale_ptr": "*fp32", "out_ptr": "*fp32", "vocab": "i32", "softcap": "fp32", "logit_scale": "fp32",
    },
    "jsd_epilogue": {
        "p_ptr": "*fp32", "q_ptr": "*fp32", "stride_p": "i32", "stride_q": "i32", "grad_p_ptr": "GRAD",
        "grad_q_ptr": "GRAD", "stride_grad_p": "i32", "stride_grad_q": "i32", "valid_ptr": "*u8",
        "scale_ptr": "*fp32", "out_ptr": "*fp32", "vocab": "i32", "beta": "fp32", "log_odds": "fp32",
        "entropy": "fp32", "softcap": "fp32", "logit_scale": "fp32",
    },
}
GRADIENT_TYPES = ("*fp32", "*bf16", "*fp16")


def variants():
    """(gradient pointer type, WRITE_GRAD, SYNC_TILES, BLOCK_V, HAS_SOFTCAP) the launchers can ask for: SYNC_TILES
    only for a low-precision view of the logits' own bytes; the smallest and the largest tile; the softcap's
    branch with the largest tile (its code does not depend on the tile size)."""
    for grad in GRADIENT_TYPES:
        for write, sync in ((False, False), (True, False), (True, True)):
            if sync and grad == "*fp32":
                continue
            for block, softcap in ((16, False), (4096, False), (4096, True)):
                yield grad, write, sync, block, softcap


def triton_modules() -> list:
    """The kernel modules the op registry names ("triton" implementations), e.g. "jsd_epilogue"."""
    from are_fast.ops.registry import KINDS

    return [kind.implementations["triton"].split(":")[0].rsplit(".", 1)[1]
            for kind in KINDS.values() if "triton" in kind.implementations]


def compile_all(arch: int) -> list:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    missing = set(triton_modules()) - set(ARGUMENTS)
    if missing:
        raise SystemExit(f"kernels without their argument types in ARGUMENTS: {', '.join(sorted(missing))}")
    launch_options = importlib.import_module("are_fast.kernels.logprob_epilogue").LAUNCH_OPTIONS  # every kernel's
    for module_name, arguments in ARGUMENTS.items():
        module = importlib.import_module(f"are_fast.kernels.{module_name}")
        kernel = getattr(module, f"_{module_name}_kernel")
        if set(kernel.arg_names) != set(arguments) | set(CONSTEXPRS):
            raise SystemExit(f"{module_name}: the kernel's parameters changed ({kernel.arg_names}); update ARGUMENTS")
        for grad, write, sync, block, softcap in variants():
            signature = {
                name: "constexpr" if name in CONSTEXPRS else arguments[name].replace("GRAD", grad)
                for name in kernel.arg_names
            }
            constants = {"BLOCK_V": block, "WRITE_GRAD": write, "SYNC_TILES": sync, "HAS_SOFTCAP": softcap}
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=target,
                                      options=launch_options)
            rows.append({"kernel": module_name, "grad": grad, "write": write, "sync": sync, "block": block,
                         "softcap": softcap, "cubin_bytes": len(compiled.asm["cubin"])})
    return rows


if __name__ == "__main__":
    for row in compile_all(int(sys.argv[1])):
        print(json.dumps(row))
