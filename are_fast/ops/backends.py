"""Backend registry: which implementation an op runs.

- ``reference``: the plain eager formulas (``are_fast.reference``), materializing the logits.
- ``chunked``: the chunk driver with PyTorch epilogues; the default on CPU.
- ``triton``: the chunk driver with the Triton epilogue kernels of ``are_fast.kernels``; the default on CUDA.
  On CPU tensors it runs only under the Triton interpreter (TRITON_INTERPRET=1 set before the kernels are
  imported), which is how the tests exercise it without a GPU.
- ``native``: the chunk driver with the C++ (CPU) / CUDA epilogues of ``csrc/``, loaded by ``are_fast.ops.native``
  (built just in time on first use).

Choice, first match wins: the op's ``backend=`` argument, the ``ARE_FAST_BACKEND`` environment variable,
then the tensors' device: ``triton`` on CUDA, else ``native`` where ``are_fast.ops.native.use_by_default`` says so
(``ARE_FAST_NATIVE``: auto, the default, means an ahead-of-time build is installed), else ``chunked``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

BACKENDS = ("reference", "chunked", "triton", "native")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use for tensors on ``device``."""
    name = backend or os.environ.get("ARE_FAST_BACKEND") or None
    if name is None:
        return _default_backend(device.type)
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "triton":
        if not _triton_importable():
            raise ValueError("backend='triton' needs the triton package (pip install 'triton>=3.6,<3.10')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, or on {device.type} tensors only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before are_fast.kernels is imported)"
            )
    if name == "native":
        from . import native

        if not native.library.load(build=True):
            raise ValueError(f"backend='native' is unavailable: {native.library.reason}")
        if not native.supports(device):
            raise ValueError(f"backend='native': the native library has no kernels for {device.type} tensors")
    return name


@torch.compiler.assume_constant_result  # torch.compile reads the answer at trace time, not the file system
def _default_backend(device_type: str) -> str:
    if device_type == "cuda" and _triton_importable():
        return "triton"
    from . import native  # imported on use: `python -m are_fast.ops.native` must find it not yet imported

    return "native" if native.use_by_default(torch.device(device_type)) else "chunked"


def epilogues(name: str) -> SimpleNamespace:
    """The row epilogues (``logprob``, ``kl``) of a fused backend; see are_fast.ops.torch_epilogues."""
    if name == "chunked":
        from . import torch_epilogues as impl

        return SimpleNamespace(logprob=impl.logprob_epilogue, kl=impl.kl_epilogue)
    if name == "triton":
        from .. import kernels

        return SimpleNamespace(logprob=kernels.logprob_epilogue, kl=kernels.kl_epilogue)
    if name == "native":
        from . import native

        return native.epilogues()
    raise ValueError(f"backend: {name!r} has no fused epilogues")


_triton_state: dict = {}


def _triton_importable() -> bool:
    if "ok" not in _triton_state:
        try:
            import triton  # noqa: F401

            _triton_state["ok"] = True
        except ImportError:
            _triton_state["ok"] = False
    return _triton_state["ok"]
