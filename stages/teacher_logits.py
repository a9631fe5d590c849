"""`make teacher-logits`: the teacher over token shards → top-K logit shards + manifests (resumable;
under `accelerate launch`/torchrun the shards are split across ranks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.runtime import Runtime
from pipeline.topk import TopKConfig
from stages._cli import add_settings, build, layout, parse, run, stage_parser

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = stage_parser("teacher_logits", __doc__)
    p.add_argument("--teacher", type=Path, help="Hugging Face Gemma 2 directory with tokenizer.model (default: "
                                                "WORK/teacher)")
    p.add_argument("--tokens", type=Path, help="token shards folder with train/ and val/ (default: WORK/tokens)")
    p.add_argument("--cache", type=Path, help="logit shards folder to write (default: WORK/logits)")
    add_settings(p, TopKConfig)
    add_settings(p, CaptureConfig)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    cfg = build(CaptureConfig, args, topk=build(TopKConfig, args))
    manifests = capture(args.teacher or work.teacher, args.tokens or work.tokens, args.cache or work.cache, cfg,
                        Runtime.from_env(), DTYPES[args.dtype])
    if manifests:
        print(json.dumps({s: {"windows": m.rows, "bytes_per_token": round(m.stats.bytes_per_token, 4),
                              "mean_tail_mass": round(m.stats.mean_tail_mass, 4),
                              "mean_teacher_entropy": round(m.stats.mean_teacher_entropy, 4)}
                          for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
