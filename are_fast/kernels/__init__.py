"""Triton kernels of are_fast, one file per pass; launchers only (no autograd).

The pass files live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose:
from the repository root (``python -m ...``, pytest, torchrun) a regular package there would shadow PyPI's
``kernels``, which transformers imports, while a folder without one never outranks an installed package. A
wheel carries the pass files here beside this file (setup.py copies them); a source checkout (editable
install) reads them from the top-level folder.
"""
from pathlib import Path

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if (_CHECKOUT_KERNELS.parent / "setup.py").is_file():  # a source checkout, not site-packages
    __path__.append(str(_CHECKOUT_KERNELS))
