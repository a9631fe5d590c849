"""`make verify`: checks a logit cache — every shard against its manifest (size, sha256, schema, metadata,
rows) and the cache's value invariants; with VERIFY_WINDOWS=n the teacher re-runs n random windows and is
compared with the cache. One line per problem naming the file (and window) and a non-zero exit; one summary
line when the cache is sound."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError
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
    report = verify_cache(cache, build(VerifyConfig, args), args.teacher or work.teacher)
    for line in report.problems:
        print(" ".join(line.split()), file=sys.stderr)
    if report.problems:
        raise PipelineError(f"{cache}: {len(report.problems)} problem(s), listed above; the cache is not sound")
    print(report.summary(cache))


if __name__ == "__main__":
    run(main)
