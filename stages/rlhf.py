"""`make rlhf MODEL=dir REWARD_MODEL=dir PROMPTS=file`: RLHF of a finished chat student (or any Hugging Face
Gemma 2 folder with its tokenizer.model) with TRL's RLOO against a sequence-classification reward model
(`make reward-model`), KL-regularised to the starting student (`KL_COEF`), on the prompts of a chat JSONL in
the student's chat template. Writes a student folder (default WORK/students/<name>-rlhf) that `report`,
`merge` and `generate` read; a rerun continues from the last checkpoint. Under LAUNCH (accelerate / torchrun)
every process runs TRL's data-parallel trainer; on a GPU with vLLM installed completions come from TRL's
colocated vLLM. No network: the hub and datasets are used offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.rlhf import RLHFConfig, offline, process_state, train_rlhf
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("rlhf", __doc__)
    p.add_argument("--model", type=Path, help="the starting student: a Hugging Face Gemma 2 folder with its "
                                              "tokenizer.model (required)")
    p.add_argument("--reward-model", type=Path, help="the reward model folder (make reward-model) (required)")
    p.add_argument("--prompts", type=Path, help="chat JSONL of prompts: {\"messages\": [...]} ending with the "
                                                "user's turn, or {\"prompt\": \"...\"} (required)")
    p.add_argument("--out", type=Path, help="the policy's folder (default: WORK/students/<model name>-rlhf)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue the run found in --out (default); --no-resume deletes it first")
    add_settings(p, RLHFConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    missing = [flag for flag, value in (("--model", args.model), ("--reward-model", args.reward_model),
                                        ("--prompts", args.prompts)) if value is None]
    if missing:
        raise PipelineError(f"{', '.join(missing)} required (make rlhf MODEL=dir REWARD_MODEL=dir PROMPTS=file)")
    offline()
    out = args.out or layout(args).students / f"{args.model.name}-rlhf"
    final = train_rlhf(args.model, args.reward_model, args.prompts, out, build(RLHFConfig, args), args.resume)
    if process_state().is_main_process:
        print(json.dumps({"policy": str(out), **final}), flush=True)


if __name__ == "__main__":
    run(main)
