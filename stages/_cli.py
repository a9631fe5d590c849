"""What every stage shares: one line on error, a non-zero exit, and the resolved settings on disk."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Runs a stage: a PipelineError becomes `error: <one line>` and exit 2; Ctrl-C exits 130."""
    try:
        main(argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses flags; `--config FILE.toml` supplies defaults (unknown keys rejected), flags override."""
    parser.add_argument("--config", type=Path, help="TOML file of defaults for these flags")
    args, _ = parser.parse_known_args(argv)
    if args.config is not None:
        parser.set_defaults(**load_toml(args.config, parser))
    return parser.parse_args(argv)


def load_toml(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{path}: no such config file")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"{path}: invalid TOML ({e})") from None
    known = {a.dest for a in parser._actions}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise PipelineError(f"{path}: unknown keys {unknown}; valid: {sorted(known - {'help', 'config'})}")
    return {k.replace("-", "_"): v for k, v in values.items()}
