"""`make teacher` (embedded default only): trains the demo teacher on the token shards with hard-label
cross-entropy, the same trainer the students use; writes a Hugging Face Gemma 2 directory that
`make teacher-logits` loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.losses import LossConfig
from pipeline.train import OptimConfig, TrainConfig, train
from stages._cli import add_settings, build, layout, parse, run, stage_parser
from stages.train_student import add_training_flags, end_processes

# The demo teacher's own defaults, where they differ from a student's.
TEACHER_DEFAULTS = {"max_tokens": 1_000_000, "warmup_steps": 30, "save_every": 100}


def parser() -> argparse.ArgumentParser:
    p = stage_parser("teacher", __doc__)
    p.add_argument("--preset", default="demo-teacher", help="model preset or config.json (default: demo-teacher)")
    p.add_argument("--tokens", type=Path, help="token shards to train on (default: WORK/tokens)")
    p.add_argument("--teacher", type=Path, help="output folder (default: WORK/teacher)")
    add_settings(p, LossConfig, exclude=("kind", "target", "temperature", "alpha"))
    add_training_flags(p, TEACHER_DEFAULTS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    loss = LossConfig(kind="ce", loss_chunk=args.loss_chunk)
    try:
        final = train("teacher", args.preset, args.tokens or work.tokens, args.teacher or work.teacher, loss,
                      build(OptimConfig, args), build(TrainConfig, args), args.tokenizer, args.resume)
    finally:
        end_processes()
    print(json.dumps({"teacher": str(args.teacher or work.teacher), **{k: round(v, 4) for k, v in final.items()}}))


if __name__ == "__main__":
    run(main)
