"""The defaults every way of encoding shares, so that ``Encoder.encode``, ``are-fast encode`` and the
sentence-transformers module (``st_module``) give the same vectors when no option is given:

- the instruction: the model folder's default prompt (``config_sentence_transformers.json``, which the training
  jobs write with their instruction; none when the folder has none); ``""`` asks for no instruction;
- normalization: ``NORMALIZE`` (off: sentence-transformers' default; cosine similarity does not depend on it);
- the length limit: the folder's ``are_fast_module.json`` (the training ``--max-text-tokens``), else
  ``DEFAULT_MAX_LENGTH`` tokens.

``Encoder.from_pretrained`` applies the folder's values; the file job loads its model through it.
"""
NORMALIZE = False
DEFAULT_MAX_LENGTH = 512
