"""`make train-student`: trains every student in STUDENTS from one teacher logit cache (or, with --loss ce,
from the same cache's tokens: the from-scratch twin). Each goes to STUDENT_DIR/<name>/ as a Hugging Face
Gemma 2 directory with its training state, metrics.jsonl and run_config.json. `--select` (`SELECT=`) keeps or
drops windows or positions by the teacher's loss or entropy stored in the cache (pipeline/select.py).
On-policy rounds: `--onpolicy DIR ...` (`ONPOLICY=`) mixes rollout caches (the teacher's pass over a student's
own samples) into every step at `--onpolicy-fraction` λ, from `--init-from` the student that sampled them;
`--loss reverse-kl` trains them by the importance-weighted reverse-KL estimate (pipeline/losses.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pipeline.checkpoint import cache_fingerprint
from pipeline.losses import LossConfig
from pipeline.train import OptimConfig, TrainConfig, train
from stages._cli import add_settings, build, layout, parse, run, stage_parser

DEFAULT_STUDENTS = ("demo-student-s", "demo-student-m")


def add_training_flags(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Flags shared with `stages.teacher` (the same trainer with --loss ce)."""
    add_settings(p, OptimConfig, defaults=defaults)
    add_settings(p, TrainConfig, defaults=defaults)
    p.add_argument("--tokenizer", type=Path, help="defaults to the data folder's tokenizer.model")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a killed run found in the output folder (default), on any number of processes "
                        "at the same global batch (--batch-tokens) and trajectory settings; --no-resume deletes it "
                        "first")


def parser() -> argparse.ArgumentParser:
    p = stage_parser("train_student", __doc__)
    p.add_argument("--student", action="extend", nargs="+", default=None,
                   help="preset name, config.json or HF folder; `name=spec` sets the output name; several allowed "
                        f"(default: {' '.join(DEFAULT_STUDENTS)})")
    p.add_argument("--cache", type=Path, help="the logit cache (or token shards, for --loss ce); default WORK/logits")
    p.add_argument("--students", type=Path, help="parent folder of the students (default: WORK/students)")
    p.add_argument("--onpolicy", type=Path, nargs="+", default=None, metavar="DIR",
                   help="rollout caches (`make teacher-logits` over `make rollouts`' shards) mixed into every step at "
                        "--onpolicy-fraction; with --init-from the model that sampled them (default: none)")
    add_settings(p, LossConfig)
    add_training_flags(p)
    return p


def split_spec(spec: str) -> tuple[str, str]:
    """`name=spec` names the output folder; a bare preset or config path is its own name."""
    if "=" in spec:
        name, spec = spec.split("=", 1)
        return name, spec
    return Path(spec).stem if spec.endswith(".json") else Path(spec).name, spec


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    loss, optim, cfg = build(LossConfig, args), build(OptimConfig, args), build(TrainConfig, args)
    students = [s for spec in (args.student or DEFAULT_STUDENTS) for s in spec.split()]
    cache, out = args.cache or work.cache, args.students or work.students
    onpolicy = tuple(args.onpolicy or ())
    if onpolicy and cfg.onpolicy_fraction == 1 and args.cache is None and cache_fingerprint(cache) is None:
        cache = None  # rollouts only, and no fixed cache in WORK: trained without one (and not evaluated)
    try:
        for spec in students:
            name, spec = split_spec(spec)
            final = train(name, spec, cache, out / name, loss, optim, cfg, args.tokenizer, args.resume, onpolicy)
            if int(os.environ.get("RANK", 0)) == 0:
                print(json.dumps({"student": name, **{k: round(v, 4) for k, v in final.items()}}), flush=True)
    finally:
        end_processes()


def end_processes() -> None:
    """Leaves the process group (torchrun warns about one left open)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
