"""Loader of the native row epilogues in ``csrc/`` (C++ with OpenMP, plus CUDA when torch and nvcc have it).

Once loaded, ``torch.ops.are_fast.logprob_epilogue``, ``torch.ops.are_fast.kl_epilogue`` and
``torch.ops.are_fast.jsd_epilogue`` follow the contract of ``are_fast.ops.torch_epilogues`` (logits [C, V] float32/float64, overwritten in place with their
gradient when ``grad_scale`` is given; optional ``softcap`` and ``logit_scale``, the logit transforms). The
library comes from, first match wins:

1. an ahead-of-time build, ``are_fast/_native*.so``
   (``ARE_FAST_BUILD_NATIVE=1 pip install --no-build-isolation -e .``);
2. a just-in-time build with ``torch.utils.cpp_extension.load`` and ninja, made on first use (one C++ file,
   10-30 s) and cached under ``ARE_FAST_NATIVE_DIR`` (default: ``TORCH_EXTENSIONS_DIR`` or torch's
   ~/.cache/torch_extensions), in a folder named after a hash of the sources, the torch and Python versions
   and the build flags, so a stale build is never loaded.

Importing this module compiles nothing and never raises. Without a C++ compiler, ninja or the sources, or when
the build fails, the library is unavailable: the reason is logged once (warning) and kept in
``library.reason``, and the PyTorch epilogues remain.

Who uses it (see ``are_fast.ops.backends``): ``backend="native"`` (or ``ARE_FAST_BACKEND=native``), building on
first use and raising ValueError with the reason when that fails. With no backend named, the environment
variable ``ARE_FAST_NATIVE`` decides whether the chunk driver takes the native epilogues instead of the
PyTorch ones: ``auto`` (default) on CUDA tensors when an ahead-of-time build loads, so an op call never stalls on
a compiler unasked and the choice does not depend on what happens to sit in a cache, and never on CPU tensors,
where the chunk driver with these epilogues took 1.0-1.6x the online sweep's (the CPU default) time in float32 and
1.7-7x in bf16 for every op but the float32 JSD (benchmarks/RESULTS.md); ``1`` always, building on the first op call
(falling back to the PyTorch epilogues, with the logged reason, if that fails); ``0`` never.

``python -m are_fast.ops.native --check`` builds if needed and prints what was built, or why not; ``--plan``
prints what a build here would compile and with what, building nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .torch_epilogues import store_gradient

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]  # the are_fast package (csrc/ and _native*.so live beside it)
# Also in setup.py (which cannot import this module). No -ffast-math: NaN and inf must survive. -fno-trapping-math
# (FP operations raise no traps that matter) lets GCC evaluate both sides of a select, so that the loops of
# csrc/ vectorize without AVX-512's masked instructions too; it changes no result.
_CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_CUDA_CFLAGS = ["-O3"]
_MODES = ("auto", "0", "1")


def ahead_of_time_builds() -> list:
    """The libraries that ``ARE_FAST_BUILD_NATIVE=1 pip install`` put into the package."""
    return sorted(_PACKAGE.glob("_native*.so"))


def _sources_dir() -> Path | None:
    """csrc/ of a source checkout (editable install), or its copy installed inside the package."""
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc"):
        if (candidate / "epilogues.cpp").is_file():
            return candidate
    return None


class NativeLibrary:
    """Finds, builds (on request) and loads the native library once per process; thread-safe.

    After ``load`` succeeds: ``path`` (the shared library), ``origin`` ("ahead-of-time", "cached just-in-time"
    or "just-in-time, N s"), ``cuda`` (whether it has the CUDA kernels). After it fails: ``reason``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aot_checked = False
        self.path: str | None = None
        self.origin: str | None = None
        self.cuda = False
        self.reason: str | None = None

    def load(self, build: bool = True) -> bool:
        """True once the ops are registered. ``build=False`` only tries the ahead-of-time build."""
        with self._lock:
            if self.path is not None:
                return True
            if self.reason is not None:  # a build was already tried and failed: do not retry every call
                return False
            if not self._aot_checked:
                self._aot_checked = True
                for path in ahead_of_time_builds():
                    if self._load_library(str(path), "ahead-of-time"):
                        return True
            if not build:
                return False
            plan = self._make_plan()
            if isinstance(plan, str):
                return self._fail(plan)
            cached = plan.directory / f"{plan.name}.so"
            if cached.is_file() and self._load_library(str(cached), "cached just-in-time"):
                return True
            return self._build(plan)

    def _make_plan(self) -> SimpleNamespace | str:
        """What a build of this checkout would be (sources, flags, cache folder), or why there can be none."""
        sources_dir = _sources_dir()
        if sources_dir is None:
            return f"the C++ sources (csrc/epilogues.cpp) were not found next to {_PACKAGE}"
        from torch.utils import cpp_extension

        cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()
        sources = [sources_dir / "epilogues.cpp"] + ([sources_dir / "epilogues_cuda.cu"] if cuda else [])
        digest = hashlib.sha256()
        for path in sorted(sources_dir.iterdir()):
            if path.suffix in (".cpp", ".cu", ".h"):
                digest.update(path.name.encode() + path.read_bytes())
        for part in (torch.__version__, sys.version, str(cuda), *_CFLAGS, *_LDFLAGS, *_CUDA_CFLAGS):
            digest.update(part.encode())
        name = f"are_fast_native_{digest.hexdigest()[:16]}"
        root = (
            os.environ.get("ARE_FAST_NATIVE_DIR")
            or os.environ.get("TORCH_EXTENSIONS_DIR")
            or cpp_extension.get_default_build_root()
        )
        return SimpleNamespace(name=name, sources=[str(s) for s in sources], directory=Path(root) / name)

    def _build(self, plan: SimpleNamespace) -> bool:
        from torch.utils import cpp_extension

        compiler = os.environ.get("CXX", "").strip() or "c++"
        if shutil.which(compiler.split()[0]) is None:
            return self._fail(f"no C++ compiler: {compiler!r} (the CXX environment variable, or c++) is not on PATH")
        if not cpp_extension.is_ninja_available():
            return self._fail("ninja is not installed (pip install ninja)")
        plan.directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            path = cpp_extension.load(
                name=plan.name,
                sources=plan.sources,
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                extra_cuda_cflags=_CUDA_CFLAGS,
                build_directory=str(plan.directory),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # a failed build must leave the PyTorch path working
            tail = "\n".join(str(exc).strip().splitlines()[-20:])  # the compiler's last words
            return self._fail(f"the build in {plan.directory} failed: {type(exc).__name__}: {tail}")
        self._loaded(str(path), f"just-in-time, {time.perf_counter() - start:.1f} s")
        return True

    def _load_library(self, path: str, origin: str) -> bool:
        try:
            torch.ops.load_library(path)
        except Exception as exc:  # e.g. built against another torch: fall through to the next candidate
            logger.warning("are_fast native epilogues: could not load %s (%s): %s", path, origin, exc)
            return False
        self._loaded(path, origin)
        return True

    def _loaded(self, path: str, origin: str) -> None:
        self.path, self.origin = path, origin
        self.cuda = torch._C._dispatch_has_kernel_for_dispatch_key("are_fast::logprob_epilogue", "CUDA")

    def _fail(self, reason: str) -> bool:
        self.reason = reason
        logger.warning("are_fast native epilogues unavailable, using the PyTorch epilogues: %s", reason)
        return False


library = NativeLibrary()


# The native row epilogues, with the gradient-output arguments of the PyTorch ones (the library must be loaded).
# The C++/CUDA ops write the gradient over the float32 logits; a requested gradient output (a low-precision
# head's) is then filled by one cast pass (``store_gradient``).
def logprob_epilogue(logits, targets, ignore_index, grad_scale, grad_out=None, *, softcap=None, logit_scale=None):
    values = torch.ops.are_fast.logprob_epilogue(logits, targets, ignore_index, grad_scale, softcap, logit_scale)
    if grad_scale is not None:
        store_gradient(logits, grad_out)
    return values


def kl_epilogue(logits_p, logits_q, valid, grad_scale, grad_out_p=None, grad_out_q=None, *, softcap=None,
                logit_scale=None):
    values = torch.ops.are_fast.kl_epilogue(logits_p, logits_q, valid, grad_scale, softcap, logit_scale)
    if grad_scale is not None:
        store_gradient(logits_p, grad_out_p)
        store_gradient(logits_q, grad_out_q)
    return values


def jsd_epilogue(logits_p, logits_q, valid, grad_scale, grad_out_p=None, grad_out_q=None, *, beta, softcap=None,
                 logit_scale=None):
    values = torch.ops.are_fast.jsd_epilogue(logits_p, logits_q, valid, grad_scale, beta, softcap, logit_scale)
    if grad_scale is not None:
        store_gradient(logits_p, grad_out_p)
        store_gradient(logits_q, grad_out_q)
    return values


def epilogues() -> SimpleNamespace:
    """The native row epilogues (``logprob``, ``kl``, ``jsd``) as one namespace."""
    return SimpleNamespace(logprob=logprob_epilogue, kl=kl_epilogue, jsd=jsd_epilogue)


def supports(device: torch.device) -> bool:
    """Whether the loaded library has kernels for ``device``."""
    return device.type == "cpu" or (device.type == "cuda" and library.cuda)


def use_by_default(device: torch.device) -> bool:
    """Whether an op with no backend named runs the native epilogues on ``device`` (ARE_FAST_NATIVE, above).

    Raises ValueError for an ARE_FAST_NATIVE other than auto, 0 or 1.
    """
    mode = os.environ.get("ARE_FAST_NATIVE", "auto")
    if mode not in _MODES:
        raise ValueError(f"ARE_FAST_NATIVE: expected one of {', '.join(_MODES)}, got {mode!r}")
    if mode == "0" or (mode == "auto" and (device.type == "cpu" or not ahead_of_time_builds())):
        return False  # auto: never on what this process happened to load, never on CPU (measured slower there)
    return library.load(build=mode == "1") and supports(device)


def print_plan() -> None:
    """What a just-in-time build here compiles and with what: sources, compilers, CUDA toolkit and targets, and
    the cache folder (with whether it already holds the build)."""
    from torch.utils import cpp_extension

    plan = library._make_plan()
    if isinstance(plan, str):
        print(f"are_fast native build: none possible: {plan}")
        return
    cuda = any(source.endswith(".cu") for source in plan.sources)
    print(f"are_fast native build: {', '.join(Path(source).name for source in plan.sources)}")
    compiler = os.environ.get("CXX", "").strip() or "c++"
    print(f"  C++ compiler: {compiler} ({shutil.which(compiler.split()[0]) or 'not on PATH'})")
    print(f"  CUDA_HOME (torch's): {cpp_extension.CUDA_HOME}; torch built with CUDA {torch.version.cuda}")
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        targets = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"the visible GPU's, sm_{major}{minor}"
        nvcc = Path(cpp_extension.CUDA_HOME, "bin", "nvcc")
        print(f"  nvcc: {nvcc}; targets: {targets}; flags {' '.join(_CUDA_CFLAGS)}")
    else:
        print("  no CUDA kernels: " + ("no GPU visible" if torch.version.cuda and cpp_extension.CUDA_HOME else
                                      "torch without CUDA or no CUDA toolkit found"))
    cached = (plan.directory / f"{plan.name}.so").is_file()
    print(f"  cache: {plan.directory} ({'holds this build' if cached else 'empty: the first use builds it'})")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m are_fast.ops.native", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="build if needed; print what was built or why not")
    parser.add_argument("--plan", action="store_true", help="print what a build here would use; build nothing")
    args = parser.parse_args(argv)
    if args.plan:
        print_plan()
        return 0
    if not args.check:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not library.load(build=True):
        print(f"are_fast native epilogues: NOT available: {library.reason}")
        return 1
    print("are_fast native epilogues: available")
    print(f"  library: {library.path} ({library.origin})")
    print(f"  CUDA kernels: {'yes' if library.cuda else 'no'}")
    for op in (torch.ops.are_fast.logprob_epilogue, torch.ops.are_fast.kl_epilogue, torch.ops.are_fast.jsd_epilogue):
        print(f"  op: {op.default._schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
