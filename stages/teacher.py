"""`make teacher` (embedded default only): trains the demo teacher on the token shards with hard-label
cross-entropy, the same trainer the students use; writes a Hugging Face Gemma 2 directory that
`make teacher-logits` loads."""

from __future__ import annotations

import argparse
import json

from pipeline.losses import LossConfig
from pipeline.train import train
from stages._cli import parse, run
from stages.train_student import add_training_flags, configs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.teacher", description=__doc__)
    p.add_argument("--preset", default="demo-teacher", help="model preset or config.json")
    add_training_flags(p)
    args = parse(p, argv)
    loss = LossConfig(kind="ce", chunk_tokens=args.chunk_tokens)
    final = train("teacher", args.preset, args.data, args.out, *configs(args, loss), args.tokenizer, args.resume)
    print(json.dumps({"teacher": str(args.out), **{k: round(v, 4) for k, v in final.items()}}))


if __name__ == "__main__":
    run(main)
