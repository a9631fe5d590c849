"""`make teacher-logits`: the teacher over token shards → top-K logit shards + manifests (resumable: a rerun
captures only the shards without a capture record for its settings, and on a finished cache reads no shard;
under `accelerate launch`/torchrun rank 0 plans and the shards left are split across ranks by tokens, and the
ranks never wait for each other in a collective that can time out). `--tokens` (`TOKENS=`) may be a folder of
rollouts (`make rollouts`: train/ only): the cache then carries their `behaviour_logprob` and records which
model sampled them. `--cache-preset compact` (`CACHE_PRESET=compact`) sets the
measured compact setting's flags as defaults; flags given explicitly still win."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.capture import CACHE_PRESETS, TIMEOUT_ENV, CaptureConfig, capture
from pipeline.errors import PipelineError
from pipeline.plan import check_capture_run
from pipeline.runtime import Runtime
from pipeline.topk import TopKConfig
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("teacher_logits", __doc__)
    p.add_argument("--teacher", type=Path, help="Hugging Face Gemma 2 directory with tokenizer.model (default: "
                                                "WORK/teacher)")
    p.add_argument("--tokens", type=Path, help="token shards folder with train/ and val/, or train/ alone (rollouts "
                                               "from `make rollouts`) (default: WORK/tokens)")
    p.add_argument("--cache", type=Path, help="logit shards folder to write (default: WORK/logits)")
    add_settings(p, TopKConfig)
    add_settings(p, CaptureConfig)
    return p


def collective_timeout() -> float | None:
    """The process group's timeout from $DISTILL_COLLECTIVE_TIMEOUT_S (tests shorten it); default torch's."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else None
    except ValueError:
        raise PipelineError(f"${TIMEOUT_ENV}={raw!r}: expected seconds") from None


def parse_with_preset(argv: list[str] | None) -> argparse.Namespace:
    """Flags over the preset over the --config table: a preset (from either) becomes the defaults of its
    flags, then the command line is parsed again."""
    p = parser()
    args = parse(p, argv)
    if args.cache_preset != "none":
        p.set_defaults(**CACHE_PRESETS[args.cache_preset])
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_with_preset(argv)
    work = layout(args)
    cfg = build(CaptureConfig, args, topk=build(TopKConfig, args))
    runtime = Runtime.from_env(timeout_s=collective_timeout())
    teacher, tokens = args.teacher or work.teacher, args.tokens or work.tokens
    check_capture_run(teacher, tokens, cfg, runtime.device)  # on a GPU: refuses what cannot fit, before loading
    manifests = capture(teacher, tokens, args.cache or work.cache, cfg, runtime)
    if manifests:
        print(json.dumps({s: {"windows": m.rows, "bytes_per_token": round(m.stats.bytes_per_token, 4),
                              "target_bytes_per_token": round(m.stats.target_bytes_per_token or 0.0, 4),
                              "topk": m.meta.topk, "samples": m.meta.samples, "id_coding": m.meta.id_coding,
                              "logprob_coding": m.meta.logprob_coding,
                              "mean_tail_mass": round(m.stats.mean_tail_mass, 4),
                              "mean_teacher_entropy": round(m.stats.mean_teacher_entropy, 4),
                              "temperature": m.meta.temperature, "dtype": m.meta.capture_dtype,
                              **({"rollouts": m.meta.rollouts} if m.meta.rollouts else {})}
                          for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
