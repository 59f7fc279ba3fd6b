"""The op registry: every op of the fused layer, every backend, and how a backend is chosen.

Backends (``REGISTRY``, in this order; ``BACKENDS`` is their names, which the CLIs offer as --backend choices):
- ``reference``: the plain eager formulas (``are_fast.ops.reference``), materializing the logits: test oracle
  and naive baseline; differentiable by PyTorch autograd and traceable by torch.compile as is.
- ``chunked``: the chunk driver with PyTorch epilogues.
- ``online``: for a float32/float64 head, frozen (every kind with a sweep in the registry: log-probabilities, KL,
  JSD) or trainable (the log-probability ops), the online sweeps of ``are_fast.ops.online`` (flash-attention
  style: no logits chunk, each block of rows meets each block of the head once; bf16/fp16 heads and autocast
  too, ``are_fast.ops.sweep_precision``); anything else (compression_loss or a pair op with a trainable head, a
  kind without a sweep) the chunk driver with PyTorch epilogues, as ``chunked``. The default on CPU.
- ``triton``: the chunk driver with the Triton epilogue kernels of ``are_fast.kernels``; the default on CUDA.
  On CPU tensors it runs only under the Triton interpreter (TRITON_INTERPRET=1 set before the kernels are
  imported), which is how the tests exercise it without a GPU.
- ``native``: the chunk driver with the C++ (CPU) / CUDA epilogues of ``csrc/``, loaded by ``are_fast.ops.native``
  (built just in time on first use).

Ops (``OPS``, declared with their row epilogue kinds in ``are_fast.ops.registry``): each maps to
``reference.<op>`` on the reference backend and, on a fused backend, to the torch.library custom op
``are_fast::linear_streams`` (``are_fast.ops.autograd``) with the backend's epilogue of the op's kind (a backend
without one runs the kind's PyTorch epilogue on the chunk driver, saying so once).

Choice, first match wins: the op's ``backend=`` argument, the ``ARE_FAST_BACKEND`` environment variable,
then the tensors' device: ``triton`` on CUDA, else ``native`` where ``are_fast.ops.native.use_by_default`` says so
(``ARE_FAST_NATIVE``: auto, the default, means an ahead-of-time build is installed and the tensors are on CUDA;
1 means always), else ``online``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference, registry
from .registry import OPS


@dataclass(frozen=True)
class Backend:
    name: str
    fused: bool  # chunk driver + row epilogues through are_fast::linear_streams; False: the reference formulas
    family: str | None  # its row epilogues' family in the kinds' implementations (are_fast.ops.registry)
    unavailable: Callable[[torch.device], "str | None"]  # why it cannot run on tensors of that device, or None
    online: bool = False  # full-precision heads take the online sweeps where they apply (are_fast.ops.online)


def _triton_unavailable(device: torch.device) -> str | None:
    if not _triton_importable():
        return "backend='triton' needs the triton package (pip install 'triton>=3.6,<3.10')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"backend='triton' runs on CUDA tensors, or on {device.type} tensors only under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before are_fast.kernels is imported)"
        )
    return _interpreter_numpy_clash(device) if device.type != "cuda" else None


def _interpreter_numpy_clash(device: torch.device) -> str | None:
    # Triton < 3.7's interpreter turns a kernel's scalar arguments (1-element arrays) into ints with int(array),
    # which numpy >= 2.4 refuses (triton-lang/triton issue 9171): every kernel would fail inside the interpreter.
    import numpy
    import triton

    def minor(version: str) -> tuple:
        return tuple(int(part) for part in version.split(".")[:2])

    if minor(triton.__version__) < (3, 7) and minor(numpy.__version__) >= (2, 4):
        return (
            f"backend='triton' on {device.type} tensors: the interpreter of triton {triton.__version__} cannot run "
            f"with numpy {numpy.__version__} (fixed in triton 3.7): pip install 'numpy<2.4', or triton>=3.7"
        )
    return None


def _native_unavailable(device: torch.device) -> str | None:
    from . import native

    if not native.library.load(build=True):
        return f"backend='native' is unavailable: {native.library.reason}"
    if not native.supports(device):
        return f"backend='native': the native library has no kernels for {device.type} tensors"
    return None


REGISTRY = {
    b.name: b
    for b in (
        Backend("reference", False, None, lambda device: None),
        Backend("chunked", True, "torch", lambda device: None),
        Backend("online", True, "torch", lambda device: None, online=True),
        Backend("triton", True, "triton", _triton_unavailable),
        Backend("native", True, "native", _native_unavailable),
    )
}
BACKENDS = tuple(REGISTRY)

def reference_op(op: str) -> Callable:
    """The reference backend's implementation of ``op`` (``are_fast.ops.reference``)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    return getattr(reference, op)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use for tensors on ``device``."""
    name = backend or os.environ.get("ARE_FAST_BACKEND") or None
    if name is None:
        return _default_backend(device.type)
    return _checked(name, device.type)


@torch.compiler.assume_constant_result  # checked once, at trace time, under torch.compile
def _checked(name: str, device_type: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    reason = REGISTRY[name].unavailable(torch.device(device_type))
    if reason:
        raise ValueError(reason)
    return name


@torch.compiler.assume_constant_result  # torch.compile reads the answer at trace time, not the file system
def _default_backend(device_type: str) -> str:
    if device_type == "cuda" and _triton_importable():
        return "triton"
    from . import native  # imported on use: `python -m are_fast.ops.native` must find it not yet imported

    return "native" if native.use_by_default(torch.device(device_type)) else "online"


def epilogue(kind: str, name: str) -> Callable:
    """The row epilogue of ``kind`` on the fused backend ``name`` (its family's, else the kind's PyTorch one,
    said once: ``registry.epilogue_for``); see are_fast.ops.torch_epilogues for the contract."""
    backend = REGISTRY.get(name)
    if backend is None or not backend.fused:
        raise ValueError(f"backend: {name!r} has no fused epilogues")
    return registry.epilogue_for(kind, backend.family)


_triton_state: dict = {}


def _triton_importable() -> bool:
    if "ok" not in _triton_state:
        try:
            import triton  # noqa: F401

            _triton_state["ok"] = True
        except ImportError:
            _triton_state["ok"] = False
    return _triton_state["ok"]
