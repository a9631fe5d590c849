"""Benchmarks: scripts that print numbers (never timed tests). `python -m benchmarks.run --help`."""
