"""`make onpolicy ROUNDS=R MODEL=<finished student> PROMPTS=<file> TEACHER=<dir>`: R rounds of lagged
on-policy distillation. Round r samples the current model's own replies (`stages.rollouts` →
WORK/onpolicy/round-r/rollouts), scores them with the teacher once (`stages.teacher_logits` →
round-r/logits), and trains the next model from the current one on them (`stages.train_student
--init-from <current> --onpolicy round-r/logits` → round-r/student), optionally mixed with a fixed cache
(`--cache`, at `--onpolicy-fraction` λ). The current model is MODEL in round 1, then the last round's
student. Each step is the stage a user runs, under LAUNCH (`--launch`), with the same `--config` (its
[rollouts], [teacher_logits] and [train_student] tables); a step whose output is finished is skipped, and
each stage resumes its own unfinished work, so a killed chain continues where it stopped. Round r samples
with seed SEED + r − 1."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json
from pipeline.train import FINISHED, unfinished
from schemas.manifest import MANIFEST, read_manifest
from stages._cli import parse, run, stage_parser

# Flags forwarded to a step when given (their defaults are the step's own): (chain flag, step, step flag).
FORWARD = (
    ("rollouts_per_prompt", "rollouts", "rollouts_per_prompt"), ("max_new_tokens", "rollouts", "max_new_tokens"),
    ("top_p", "rollouts", "top_p"), ("temperature", "rollouts", "temperature"), ("engine", "rollouts", "engine"),
    ("rollout_batch", "rollouts", "batch_size"), ("seq_len", "rollouts", "seq_len"),
    ("topk", "teacher_logits", "topk"), ("samples", "teacher_logits", "samples"),
    ("loss", "train_student", "loss"), ("onpolicy_fraction", "train_student", "onpolicy_fraction"),
    ("max_tokens", "train_student", "max_tokens"), ("allow_stale_rounds", "train_student", "allow_stale_rounds"),
    ("lr", "train_student", "lr"), ("precision", "train_student", "precision"),
)


def parser() -> argparse.ArgumentParser:
    p = stage_parser("onpolicy", __doc__)
    p.add_argument("--model", type=Path, help="the student to start from: a finished student or HF Gemma 2 folder "
                                              "(required)")
    p.add_argument("--prompts", type=Path, help="JSONL of prompts sampled every round (required)")
    p.add_argument("--teacher", type=Path, help="the teacher that scores the rollouts (default: WORK/teacher)")
    p.add_argument("--cache", type=Path, help="a fixed (off-policy) logit cache mixed in at --onpolicy-fraction "
                                              "(default: none: rollouts only)")
    p.add_argument("--rounds", type=int, default=1, help="rounds to run (default: 1)")
    p.add_argument("--out", type=Path, help="folder of the rounds (default: WORK/onpolicy)")
    p.add_argument("--seed", type=int, default=0, help="round r samples with seed SEED + r - 1 (default: 0)")
    p.add_argument("--launch", default=sys.executable,
                   help="prefix of each step, e.g. \"torchrun --nproc_per_node 8\" (default: this python)")
    for name, step, flag in FORWARD:
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       help=f"passed to {step} as --{flag.replace('_', '-')} (default: that stage's)")
    return p


def finished_cache(folder: Path) -> bool:
    return (folder / "train" / MANIFEST).is_file()


def finished_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / FINISHED).is_file()


class Chain:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.launch = shlex.split(args.launch)
        self.common = ["--work", str(args.work), *(["--config", str(args.config)] if args.config else [])]
        self.start = time.perf_counter()

    def forwarded(self, step: str) -> list[str]:
        return [x for name, s, flag in FORWARD if s == step and getattr(self.args, name) is not None
                for x in ("--" + flag.replace("_", "-"), str(getattr(self.args, name)))]

    def step(self, title: str, stage: str, *args: str) -> None:
        print(f"\n== {title}  [{time.perf_counter() - self.start:.0f} s]", flush=True)
        cmd = [*self.launch, "-m", f"stages.{stage}", *self.common, *args, *self.forwarded(stage)]
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise PipelineError(f"on-policy step '{title}' failed (exit {result.returncode}); fix the error above and "
                                "rerun the same command: finished steps are kept")


def rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the chain; returns one summary per round."""
    if args.model is None or args.prompts is None:
        raise PipelineError("--model and --prompts are required (make onpolicy MODEL=dir PROMPTS=file ROUNDS=n)")
    if args.rounds < 1:
        raise PipelineError(f"--rounds {args.rounds}: at least 1")
    reason = unfinished(args.model)  # its hint (rerun train-student) fits what MODEL= usually is
    if reason or not (args.model / "config.json").is_file():
        raise PipelineError(reason or f"{args.model}: no config.json; MODEL= is a finished student or a Hugging "
                                      "Face Gemma 2 folder")
    teacher = args.teacher or args.work / "teacher"
    out = args.out or args.work / "onpolicy"
    chain = Chain(args)
    current, summary = args.model, []
    for r in range(1, args.rounds + 1):
        folder = out / f"round-{r}"
        rollouts, logits, student = folder / "rollouts", folder / "logits", folder / "student"
        if not finished_model(student):
            if not finished_cache(logits):  # the rollouts stage itself keeps what is finished for its settings
                chain.step(f"round {r}/{args.rounds}: rollouts from {current}", "rollouts", "--model", str(current),
                           "--prompts", str(args.prompts), "--rollouts", str(rollouts), "--seed", str(args.seed + r - 1))
                chain.step(f"round {r}/{args.rounds}: teacher-logits on the rollouts", "teacher_logits",
                           "--teacher", str(teacher), "--tokens", str(rollouts), "--cache", str(logits))
            fixed = ["--cache", str(args.cache)] if args.cache else []
            chain.step(f"round {r}/{args.rounds}: train from {current}", "train_student", "--student",
                       f"student={current}", "--init-from", str(current), "--students", str(folder),
                       "--onpolicy", str(logits), *fixed)
        else:
            print(f"\n== round {r}/{args.rounds}: {student} is finished; skipped", flush=True)
        summary.append({"round": r, "sampled_by": str(current), "student": str(student),
                        "rollout_windows": read_manifest(rollouts / "train", "tokens", check_files=False).rows
                        if finished_cache(rollouts) else None,
                        **{k: v for k, v in read_json(student / FINISHED, "the round's student").items()
                           if isinstance(v, (int, float))}})
        current = student
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    for line in rounds(args):
        print(json.dumps(line))


if __name__ == "__main__":
    run(main)
