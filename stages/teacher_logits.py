"""`make teacher-logits`: the teacher over token shards → top-K logit shards + manifests (resumable;
under `accelerate launch`/torchrun the shards are split across ranks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.dist import current
from pipeline.topk import TopKConfig
from stages._cli import parse, run

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.teacher_logits", description=__doc__)
    p.add_argument("--teacher", type=Path, required=True, help="Hugging Face Gemma 2 directory with tokenizer.model")
    p.add_argument("--tokens", type=Path, required=True, help="token shards folder (with train/ and val/)")
    p.add_argument("--out", type=Path, required=True, help="logit shards folder to write")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--samples", type=int, default=0, help="draws per position from outside the top K (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail draws")
    p.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="positions per head/softmax chunk")
    p.add_argument("--max-train-tokens", type=int, default=0,
                   help="cache only the first train shards covering this many tokens (0: all); val is always whole")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    args = parse(p, argv)
    dist, device = current()
    cfg = CaptureConfig(TopKConfig(args.topk, args.samples, args.chunk_tokens, args.seed), args.batch_size,
                        max_train_tokens=args.max_train_tokens)
    manifests = capture(args.teacher, args.tokens, args.out, cfg, dist, device, DTYPES[args.dtype])
    if manifests:
        print(json.dumps({s: {"windows": m["rows"], **{k: round(v, 4) for k, v in m["stats"].items()
                                                      if isinstance(v, float)}} for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
