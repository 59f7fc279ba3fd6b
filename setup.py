"""Packaging for are_fast.

The default install is pure Python: no torch import here (it would break build isolation) and no hardware
probing. Triton kernels live in the top-level folder ``kernels/`` and are installed into the subpackage
``are_fast.kernels`` (see its ``__init__.py``: the folder has no ``__init__.py``, so that from the repo root it
never shadows PyPI's ``kernels``, which transformers imports). The C++/CUDA sources of ``csrc/`` ship as
``are_fast/csrc`` for the just-in-time build of ``are_fast.ops.native``.
"""
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """The standard build, plus the top-level kernels/*.py copied into are_fast/kernels/ of the build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib, "are_fast", "kernels")
        for source in sorted(Path("kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


def native_build() -> dict:
    """With ARE_FAST_BUILD_NATIVE=1, compile csrc/ ahead of time into are_fast/_native*.so (else it is built
    just in time on first use). Needs torch at build time: pip install --no-build-isolation."""
    if os.environ.get("ARE_FAST_BUILD_NATIVE") != "1":
        return {}
    try:  # torch only here, so the default install never imports it
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(f"ARE_FAST_BUILD_NATIVE=1 needs torch installed first and --no-build-isolation ({exc})")
    sources, make = ["csrc/epilogues.cpp"], cpp_extension.CppExtension
    # nvcc needs GPU targets: the visible GPU's, or TORCH_CUDA_ARCH_LIST's. A build without either (a container
    # image built on a machine without a GPU) gets the CPU epilogues, as the just-in-time build would.
    gpu_targets = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.is_available()
    if torch.version.cuda and cpp_extension.CUDA_HOME is not None and gpu_targets:
        sources, make = sources + ["csrc/epilogues_cuda.cu"], cpp_extension.CUDAExtension
    flags = {"cxx": ["-O3", "-fno-trapping-math", "-fopenmp"], "nvcc": ["-O3"]}  # as in are_fast/ops/native.py
    extension = make("are_fast._native", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


def commands() -> dict:
    native = native_build()
    return {**native, "cmdclass": {"build_py": BuildPyWithKernels, **native.get("cmdclass", {})}}


setup(
    name="are_fast",
    version="0.1.0",
    description="Fused, memory-bounded loss ops, trainer and encoder for AutoRegEmbed text-embedding models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["are_fast", "are_fast.ops", "are_fast.model", "are_fast.training", "are_fast.encoding", "are_fast.toy",
              "are_fast.tools", "are_fast.cli", "are_fast.kernels", "are_fast.csrc"],
    package_dir={"are_fast": "are_fast", "are_fast.csrc": "csrc"},
    package_data={"are_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    install_requires=[
        # The supported stacks: torch 2.11-2.13, triton 3.6-3.9, transformers 5.17+.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "transformers>=5.17",  # the model layer, trainer and encoder
        "safetensors",  # reference scores, checkpoints and embeddings on disk
        "matplotlib",  # the main job's loss curves
        "ninja",  # the just-in-time build of the optional native epilogues
    ],
    extras_require={
        # The test extra holds every optional integration, so CI tests them all (none is skipped).
        # numpy < 2.4: the Triton interpreter of triton < 3.7, which runs the kernel tests on CPU, fails on newer.
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout", "pyarrow", "peft", "sentence-transformers>=6,<7",
                 "mteb>=2,<3", "tensorboard", "numpy<2.4"],
        "parquet": ["pyarrow"],
        "st": ["sentence-transformers>=6,<7"],  # SentenceTransformer(path); 6.x passes the prompt to our module
        "mteb": ["mteb>=2,<3"],  # mteb.evaluate(MTEBModel(encoder, ...), tasks)
        "lora": ["peft"],
        "bench": ["pytest-benchmark>=4", "liger-kernel", "cut-cross-entropy"],
        "flash": ["flash-attn"],
        "tensorboard": ["tensorboard"],  # event files of training runs (without it, loss.jsonl only)
    },
    entry_points={"console_scripts": ["are-fast=are_fast.cli:main"]},
    **commands(),
)
