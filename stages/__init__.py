"""Thin command-line stages, one per Make target: `python -m stages.<name> --help`."""
