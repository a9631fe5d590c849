"""`make verify`: checks a logit cache — every shard's footer against its manifest (size, schema, metadata,
rows), and the sha256 and value invariants of a seeded sample of shards (VERIFY_SAMPLE, a count or a
fraction; VERIFY_FULL=1: every shard) and of every shard changed since its capture record; with
VERIFY_WINDOWS=n the teacher re-runs n random windows and is compared with the cache. Under LAUNCH the
shards are split across the ranks and rank 0 reports. One line per problem naming the file (and window) and
a non-zero exit; one summary line when the cache is sound."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runtime import Runtime
from pipeline.verify import VerifyConfig, verify_cache
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("verify", __doc__)
    p.add_argument("--cache", type=Path, help="the logit cache to check (default: WORK/logits)")
    p.add_argument("--teacher", type=Path, help="the teacher the cache was made with, for --windows (default: "
                                                "WORK/teacher)")
    add_settings(p, VerifyConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    cache = args.cache or work.cache
    if not cache.is_dir():
        raise PipelineError(f"{cache}: no such cache folder; pass --cache (CACHE=…) or run `make teacher-logits`")
    runtime = Runtime.from_env()
    report = verify_cache(cache, build(VerifyConfig, args), args.teacher or work.teacher, runtime=runtime)
    if not runtime.is_main:
        return  # rank 0 reports for every rank
    for line in report.problems:
        print(" ".join(line.split()), file=sys.stderr)
    if report.problems:
        raise PipelineError(f"{cache}: {len(report.problems)} problem(s), listed above; the cache is not sound")
    print(report.summary(cache))


if __name__ == "__main__":
    run(main)
