"""Encoding: the Encoder (texts -> embeddings), the streaming file readers and the resumable file-to-shards job."""
