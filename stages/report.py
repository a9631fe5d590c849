"""`make report`: report.md, summary.json and val_loss.png comparing the teacher, the students (KD beside
their from-scratch twins), the cache modes and merged models, all evaluated on the same val cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.report import Paths, build_report
from stages._cli import layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("report", __doc__)
    p.add_argument("--cache", type=Path, help="the logit cache whose val split every model is evaluated on "
                                              "(default: WORK/logits)")
    p.add_argument("--teacher", type=Path, help="default: WORK/teacher (reported when present)")
    p.add_argument("--students", type=Path, help="folder of student folders (default: WORK/students)")
    p.add_argument("--report", type=Path, help="output folder (default: WORK/report)")
    p.add_argument("--machine", default="", help="how to describe the machine (default: detected)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    default = Paths.of(layout(args))
    paths = Paths(args.cache or default.cache, args.teacher or default.teacher, args.students or default.students,
                  args.report or default.out)
    build_report(paths, args.machine)
    print((paths.out / "report.md").read_text())


if __name__ == "__main__":
    run(main)
