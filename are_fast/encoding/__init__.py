"""Encoding: texts -> embeddings, one job per module.

batching (length-sorted token-budget batches), pipeline (tokenize in a background thread, run the model),
encoder (``Encoder``: the public API), mteb_adapter (MTEB's model interface), st_module (the sentence-transformers
module; imports sentence-transformers), readers (streaming input files), encode_job (the resumable file-to-shards job).
"""
