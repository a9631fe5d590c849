"""`make merge`: averages the weights of students with the same config and tokenizer (model merging)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.merge import merge_models
from stages._cli import run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.merge", description=__doc__)
    p.add_argument("--inputs", type=Path, nargs="+", required=True, help="Hugging Face Gemma 2 folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", type=float, nargs="+", help="one weight per input (default: equal)")
    args = p.parse_args(argv)
    merge_models(args.inputs, args.out, args.weights)
    print(f"merged {len(args.inputs)} models into {args.out}")


if __name__ == "__main__":
    run(main)
