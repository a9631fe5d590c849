"""`make merge`: averages the weights of students with the same config and tokenizer (model merging)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.merge import merge_models
from stages._cli import layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("merge", __doc__)
    p.add_argument("--inputs", type=Path, nargs="+", help="Hugging Face Gemma 2 folders (at least two)")
    p.add_argument("--out", type=Path, help="output folder (default: WORK/students/merged)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per input (default: equal)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    if not args.inputs:
        raise PipelineError("--inputs: name the model folders to merge (MERGE_INPUTS=\"dirA dirB\")")
    out = args.out or layout(args).students / "merged"
    merge_models(args.inputs, out, args.weights)
    print(f"merged {len(args.inputs)} models into {out}")


if __name__ == "__main__":
    run(main)
