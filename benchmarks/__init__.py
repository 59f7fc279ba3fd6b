"""pytest-benchmark suites of are_fast (``pytest benchmarks/``) and their report (``python -m benchmarks.report``)."""
