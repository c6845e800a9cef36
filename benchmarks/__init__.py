"""Benchmarks: each module runs as `python -m benchmarks.<name>` and has `run(quick) -> rows`."""
