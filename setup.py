"""Packaging for are_fast.

The default install is pure Python: no torch import here (it would break build isolation) and no hardware
probing. Triton kernels live in the top-level folder ``kernels/`` and are installed as the subpackage
``are_fast.kernels`` (a PyPI package named ``kernels`` exists, so a top-level module would clash).
"""
from setuptools import setup

setup(
    name="are_fast",
    version="0.1.0",
    description="Fused, memory-bounded loss ops, trainer and encoder for AutoRegEmbed text-embedding models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["are_fast", "are_fast.kernels"],
    package_dir={"are_fast": "are_fast", "are_fast.kernels": "kernels"},
    install_requires=[
        # The supported stacks: torch 2.11-2.13, triton 3.6-3.9, transformers 5.17+.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=5.17", "safetensors"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "liger-kernel", "cut-cross-entropy"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["are-fast=are_fast.cli:main"]},
)
