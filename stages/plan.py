"""`make plan`: the capture of TEACHER (its config.json is enough) and one optimizer step of each student in
STUDENTS traced at full shape on fake tensors, against WORLD × GPU: peak memory per GPU, FLOPs per token,
tokens/s and GPU-hours at MFU, the cache's size for PLAN_TOKENS. Prints a table, writes WORK/plan.json, and
exits 2 with one line naming the setting to change when something does not fit. The same variables as the
real stages (SEQ_LEN, CAPTURE_BATCH, HEAD_CHUNK, TOPK, SAMPLES, BATCH_SIZE, GRAD_ACCUM/BATCH_TOKENS,
SHARDING, CONFIG's [teacher_logits] and [train_student] tables: the recipe's checkpointing and precision)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.capture import CACHE_PRESETS, DTYPES, CaptureConfig
from pipeline.checkpoint import load_config
from pipeline.errors import PipelineError
from pipeline.fsutil import write_json
from pipeline.losses import LossConfig, check_target, resolve_target
from pipeline.model import PRESETS, Gemma2Config
from pipeline.plan import CaptureJob, PlanConfig, StudentJob, make_plan, plan_json, table
from pipeline.topk import TopKConfig
from pipeline.train import TrainConfig, grad_accum_for, resolve_student
from stages._cli import add_settings, build, run, stage_parser
from stages._cli import load_config as load_toml
from stages.train_student import split_spec

TRAIN_FLAGS = ("batch_size", "grad_accum", "batch_tokens", "sharding", "gradient_checkpointing", "precision")
# [teacher_logits] keys of a CONFIG that size the capture, and the flag each sets here.
CAPTURE_KEYS = {"batch_size": "capture_batch", "head_chunk": "head_chunk", "topk": "topk", "samples": "samples",
                "dtype": "dtype", "logprob_coding": "logprob_coding", "cache_preset": "cache_preset"}


def parser() -> argparse.ArgumentParser:
    p = stage_parser("plan", __doc__)
    p.add_argument("--teacher", help="the teacher: a Hugging Face Gemma 2 directory (config.json alone is enough) "
                                     "or a preset name (default: WORK/teacher when it has a config.json)")
    p.add_argument("--student", action="extend", nargs="+", default=None,
                   help="students to plan: preset names, config.json files or HF folders (`name=spec` names them)")
    p.add_argument("--out", type=Path, help="the plan's JSON (default: WORK/plan.json)")
    add_settings(p, PlanConfig)
    p.add_argument("--capture-batch", type=int, default=CaptureConfig.batch_size,
                   help=f"windows per teacher forward, teacher-logits' --batch-size (default: {CaptureConfig.batch_size})")
    add_settings(p, TopKConfig, exclude=("sample_seed", "sampling", "temperature"))
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="the teacher's dtype: auto is bfloat16, as on a GPU")
    p.add_argument("--logprob-coding", default="float16", choices=("float16", "q8"),
                   help="the cache's log-prob coding (its size)")
    p.add_argument("--cache-preset", default="none", choices=("none", *CACHE_PRESETS), help="as teacher-logits'")
    add_settings(p, LossConfig, exclude=("temperature", "alpha"))
    add_settings(p, TrainConfig, exclude=tuple(f.name for f in dataclasses.fields(TrainConfig)
                                               if f.name not in TRAIN_FLAGS))
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Flags over the CONFIG's [plan], [train_student] and [teacher_logits] tables (the recipe a real run
    would use) over the cache preset's settings."""
    p = parser()
    args, _ = p.parse_known_args(argv)
    defaults: dict[str, Any] = {}
    if args.config is not None:
        raw = load_toml(args.config)
        known = {a.dest for a in p._actions}
        defaults.update({CAPTURE_KEYS[k]: v for k, v in raw.get("teacher_logits", {}).items() if k in CAPTURE_KEYS})
        defaults.update({k: v for k, v in raw.get("train_student", {}).items() if k in known})
        defaults.update(raw.get("plan", {}))
        unknown = sorted(k for k in defaults if k not in known)
        if unknown:
            raise PipelineError(f"{args.config}: unknown keys {unknown} in [plan]")
    preset = defaults.get("cache_preset", args.cache_preset)
    if preset != "none":
        defaults = {**CACHE_PRESETS[preset], **defaults}
    p.set_defaults(**{k: v for k, v in defaults.items() if k in {a.dest for a in p._actions}})
    return p.parse_args(argv)


def model_config(spec: str, what: str) -> Gemma2Config:
    """A preset name, an HF folder or a config.json file."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        return load_config(path)
    if path.suffix == ".json" and path.is_file():
        return load_config(path.parent)
    raise PipelineError(f"--{what} {spec}: neither a model folder with config.json nor a preset "
                        f"({', '.join(sorted(PRESETS))})")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    plan = build(PlanConfig, args)
    spec = args.teacher or (str(args.work / "teacher") if (args.work / "teacher" / "config.json").is_file() else None)
    teacher = None if spec is None else (Path(spec).name, model_config(spec, "teacher"))
    topk = build(TopKConfig, args)
    capture = None
    if teacher is not None:
        dtype = torch.bfloat16 if args.dtype == "auto" else DTYPES[args.dtype]
        if args.capture_batch < 1:
            raise PipelineError(f"--capture-batch {args.capture_batch}: must be >= 1")
        capture = CaptureJob(args.capture_batch, topk, dtype, args.logprob_coding == "q8")
    students, job = [], None
    for raw in [s for given in (args.student or ()) for s in given.split()]:
        name, spec_ = split_spec(raw)
        vocab = teacher[1].vocab_size if teacher else model_config(spec_, "student").vocab_size
        students.append((name, resolve_student(spec_, vocab) if spec_ not in PRESETS or teacher else PRESETS[spec_]))
    if students:
        train = build(TrainConfig, args)
        loss = build(LossConfig, args)
        loss = dataclasses.replace(loss, target=resolve_target(loss.target, topk.samples > 0))
        if loss.kind == "kd":
            check_target(loss.target, topk.topk, "the planned cache")
        job = StudentJob(train.batch_size, grad_accum_for(train, plan.world, plan.seq_len), train.sharding,
                         train.precision, train.gradient_checkpointing, loss, topk.topk, topk.samples)
    if teacher is None and not students:
        raise PipelineError("nothing to plan: give TEACHER=dir (its config.json is enough) and/or STUDENTS=…")
    result, problems = make_plan(plan, teacher, capture, students, job)
    out = args.out or args.work / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, plan_json(result))
    print(table(result))
    print(f"wrote {out}")
    if problems:
        raise PipelineError("; ".join(problems))
    print(json.dumps({"fits": True, "plan": str(out)}))


if __name__ == "__main__":
    run(main)
