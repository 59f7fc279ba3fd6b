"""Probes for people and benchmarks: the ops demo (``are-fast demo``) and peak-extra-memory measurement."""
