"""The defaults every way of encoding shares (``Encoder.encode``, ``are-fast encode``, the sentence-transformers
module), so that they give the same vectors without options: the folder's prompt, ``NORMALIZE``, the folder's
length limit else ``DEFAULT_MAX_LENGTH``. README "Encoding" (One set of defaults)."""
NORMALIZE = False
DEFAULT_MAX_LENGTH = 512
