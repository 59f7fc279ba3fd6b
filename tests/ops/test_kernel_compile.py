"""The Triton kernels compile for the GPUs they are for (sm_80: A100; sm_90: H100, H200) with the installed
triton, on any machine: every variant a launcher can ask for, to a cubin. test_kernels.py runs their logic under
the interpreter on CPU; this catches what only the compiler sees (types of the stores, constexpr branches,
barriers, what the interpreter lets pass).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

HELPER = Path(__file__).with_name("kernel_compile.py")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_variant_compiles_for_the_gpu(arch):
    sys.path.insert(0, str(HELPER.parent))
    try:
        import kernel_compile
    finally:
        sys.path.pop(0)
    expected = [(name, *variant) for name in kernel_compile.ARGUMENTS for variant in kernel_compile.variants()]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(HELPER), str(arch)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["kernel"], r["grad"], r["write"], r["sync"], r["block"], r["softcap"]) for r in rows] == expected
    assert all(r["cubin_bytes"] > 0 for r in rows)
