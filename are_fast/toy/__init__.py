"""The embedded default: generated paraphrase data and a tiny Llama (``data``), the main job that trains both
stages on them (``job``) and its picture (``picture``). No download; it also drives the tests and CPU benchmarks."""
