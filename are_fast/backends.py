"""Backend registry: which implementation an op runs.

- ``reference``: the plain eager formulas (``are_fast.reference``), materializing the logits.
- ``chunked``: the chunk driver with PyTorch epilogues; the default on CPU.
- ``triton``: the chunk driver with the Triton epilogue kernels of ``are_fast.kernels``; the default on CUDA.
  On CPU tensors it runs only under the Triton interpreter (TRITON_INTERPRET=1 set before the kernels are
  imported), which is how the tests exercise it without a GPU.

Choice, first match wins: the op's ``backend=`` argument, the ``ARE_FAST_BACKEND`` environment variable,
then the tensors' device.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

BACKENDS = ("reference", "chunked", "triton")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use for tensors on ``device``."""
    name = backend or os.environ.get("ARE_FAST_BACKEND") or None
    if name is None:
        return "triton" if device.type == "cuda" and _triton_importable() else "chunked"
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
    return name


def epilogues(name: str) -> SimpleNamespace:
    """The row epilogues (``logprob``, ``kl``) of a fused backend; see are_fast.torch_epilogues."""
    if name == "chunked":
        from . import torch_epilogues as impl

        return SimpleNamespace(logprob=impl.logprob_epilogue, kl=impl.kl_epilogue)
    if name == "triton":
        from . import kernels

        return SimpleNamespace(logprob=kernels.logprob_epilogue, kl=kernels.kl_epilogue)
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
