"""`make rollouts MODEL=… PROMPTS=…`: a model's own sampled replies to chat prompts → chat token shards in
ROLLOUTS (default WORK/rollouts): `train/*.parquet` + `train/manifest.json`, with the sampling model's
log-probability of each generated token (`behaviour_logprob`) and metadata naming the model's fingerprint,
its on-policy round and the sampling settings. The prompts go through the chat template and the chat
filters of `make tokens`; sampling is seeded per sequence (the output does not depend on --batch-size or
the rank count); prompts are split across ranks under LAUNCH; a rerun keeps finished shards. Then
`make teacher-logits TOKENS=<ROLLOUTS> CACHE=…` scores them with the teacher (pipeline/rollouts.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.rollouts import RolloutConfig, run_rollouts
from pipeline.runtime import Runtime
from pipeline.train import unfinished
from stages._cli import add_settings, build, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("rollouts", __doc__)
    p.add_argument("--model", type=Path, help="the sampling model: a finished student or any Hugging Face Gemma 2 "
                                              "directory with its tokenizer.model (required)")
    p.add_argument("--prompts", type=Path, help="JSONL of prompts: {\"messages\": [...]} ending with the user's turn, "
                                                "or {\"prompt\": ...} (required)")
    p.add_argument("--rollouts", type=Path, help="output folder (default: WORK/rollouts)")
    add_settings(p, RolloutConfig)
    add_settings(p, FilterConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    if args.model is None or args.prompts is None:
        raise PipelineError("--model and --prompts are required (make rollouts MODEL=dir PROMPTS=file.jsonl)")
    reason = unfinished(args.model)
    if reason:
        raise PipelineError(reason)
    summary = run_rollouts(args.model, args.prompts, args.rollouts or args.work / "rollouts",
                           build(RolloutConfig, args), build(FilterConfig, args), Runtime.from_env())
    if summary is not None:
        print(json.dumps(summary))


if __name__ == "__main__":
    run(main)
