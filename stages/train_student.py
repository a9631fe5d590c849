"""`make train-student`: trains every student in STUDENTS from one teacher logit cache (or, with --loss ce,
from the same cache's tokens: the from-scratch twin). Each goes to --out/<name>/ as a Hugging Face Gemma 2
directory with its training state, metrics.jsonl and run_config.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.losses import LossConfig
from pipeline.train import OptimConfig, TrainConfig, train
from stages._cli import parse, run


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with `stages.teacher` (the same trainer with --loss ce)."""
    p.add_argument("--data", type=Path, required=True, help="logit cache (or token shards) with train/ and val/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, help="defaults to the data folder's tokenizer.model")
    p.add_argument("--max-tokens", type=int, required=True, help="training tokens per model")
    p.add_argument("--batch-size", type=int, default=16, help="windows per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation passes (0: only at the end)")
    p.add_argument("--eval-windows", type=int, default=256, help="val windows in the periodic passes")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--chunk-tokens", type=int, default=1024, help="positions per loss chunk (bounds logits memory)")
    p.add_argument("--init-from", default="", help="start from this model folder's weights (same config)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU (bf16 also speeds up CPUs with AVX512-BF16/AMX)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a killed run found in the output folder (default)")


def configs(args: argparse.Namespace, loss: LossConfig) -> tuple[LossConfig, OptimConfig, TrainConfig]:
    optim = OptimConfig(args.lr, args.min_lr_ratio, args.warmup_steps, args.weight_decay, clip=args.clip)
    cfg = TrainConfig(args.max_tokens, args.batch_size, args.grad_accum, args.eval_every, args.eval_windows,
                      args.save_every, args.log_every, args.seed, gradient_checkpointing=args.gradient_checkpointing,
                      precision=args.precision, init_from=args.init_from)
    return loss, optim, cfg


def split_spec(spec: str) -> tuple[str, str]:
    """`name=spec` names the output folder; a bare preset or config path is its own name."""
    if "=" in spec:
        name, spec = spec.split("=", 1)
        return name, spec
    return Path(spec).stem if spec.endswith(".json") else Path(spec).name, spec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.train_student", description=__doc__)
    p.add_argument("--student", action="append", required=True,
                   help="preset name, config.json or HF folder; `name=spec` sets the output name; repeatable")
    p.add_argument("--loss", choices=("kd", "ce"), default="kd")
    p.add_argument("--kd-target", choices=("auto", "tail", "renorm", "sampled"), default="auto",
                   help="how the cached target is used: top-K + tail bucket, top-K renormalised, top-K + tail draws; "
                        "auto: the draws when the cache has them, else the tail bucket")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0, help="KD weight; 1 - alpha goes to hard-label CE")
    add_training_flags(p)
    args = parse(p, argv)
    loss = LossConfig(args.loss, args.kd_target, args.temperature, args.alpha, args.chunk_tokens)
    students = [s for spec in args.student for s in spec.split()]
    for spec in students:
        name, spec = split_spec(spec)
        final = train(name, spec, args.data, args.out / name, *configs(args, loss), args.tokenizer, args.resume)
        print(json.dumps({"student": name, **{k: round(v, 4) for k, v in final.items()}}))


if __name__ == "__main__":
    run(main)
