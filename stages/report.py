"""`make report`: report/report.md, report/summary.json and report/val_loss.png for a work directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.report import build_report
from stages._cli import run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--machine", default="", help="how to describe the machine (default: detected)")
    args = p.parse_args(argv)
    build_report(args.work, args.machine)
    print((args.work / "report" / "report.md").read_text())


if __name__ == "__main__":
    run(main)
