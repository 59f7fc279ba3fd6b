"""The defaults every way of encoding shares, so that ``Encoder.encode``, ``are-fast encode`` and the
sentence-transformers module (``st_module``) give the same vectors when no option is given:

- the instruction: the model folder's default prompt (``config_sentence_transformers.json``, which the training
  jobs write with their instruction; none when the folder has none); ``""`` asks for no instruction;
- normalization: ``NORMALIZE`` (off: sentence-transformers' default; cosine similarity does not depend on it);
- the length limit: the folder's ``are_fast_module.json`` (the training ``--max-text-tokens``), else
  ``DEFAULT_MAX_LENGTH`` tokens;
- the compute dtype: ``default_dtype`` (bfloat16 where it measures faster, else float32; vectors are float32).

``Encoder.from_pretrained`` applies the folder's values; the file job loads its model through it.
"""
import torch

from ..ops import sweep_precision

NORMALIZE = False
DEFAULT_MAX_LENGTH = 512


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, and on a CPU whose bf16 matrix units measure faster than float32
    (``sweep_precision.automatic``: ISA flags, then a one-time matmul measurement); else float32."""
    cpu_units = device.type == "cpu" and sweep_precision.automatic(device, torch.bfloat16).path == "lowp"
    return torch.bfloat16 if device.type == "cuda" or cpu_units else torch.float32
