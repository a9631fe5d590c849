"""What every stage shares: flags generated from the library's settings dataclasses, `--config FILE.toml`
(the stage's own `[section]`), `--work` with path overrides, one line on error and a non-zero exit.

One TOML dialect: a file has one table per stage, named like the stage module (`[tokenize]`,
`[teacher_logits]`, `[train_student]`, …), whose keys are that stage's flag names; `configs/demo.toml` is
such a file. Flags on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.layout import Layout

STAGES = ("tokenize", "teacher", "teacher_logits", "train_student", "report", "merge", "inspect", "verify", "demo",
          "generate", "demo_chat", "plan", "rollouts", "onpolicy", "demo_onpolicy", "reward_model", "rlhf",
          "demo_rlhf")


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


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """A stage's parser with the flags every stage has: --work and --config."""
    p = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc)
    p.add_argument("--work", type=Path, default=Path("runs/demo"),
                   help="work directory; inputs and outputs default to their place in it (see pipeline/layout.py)")
    p.add_argument("--config", type=Path, help=f"TOML file whose [{stage}] table holds defaults for these flags")
    p.set_defaults(_stage=stage)
    return p


def add_settings(parser: argparse.ArgumentParser | Any, cls: type, exclude: tuple[str, ...] = (),
                 defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of a settings dataclass: `--field-name` (or the field's `flag`), its default and
    help from the field (or `defaults`, a stage's own); a field without a default is required (from the
    command line or the config)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:  # plain fields are not user settings
            continue
        dest = f.metadata.get("flag") or f.name
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"dest": dest, "help": f.metadata.get("help", "")}
        default = defaults.get(dest, None if f.default is dataclasses.MISSING else f.default)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = kind
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if default is None and f.default is dataclasses.MISSING:
            kwargs["help"] += " (required)"
            _required(parser).append(dest)
        elif default not in (None, "") and kind is not bool:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument("--" + dest.replace("_", "-"), default=default, **kwargs)


def build(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The settings dataclass from parsed flags, by keyword (never positionally)."""
    values = {f.name: getattr(args, f.metadata.get("flag") or f.name) for f in dataclasses.fields(cls)
              if f.init and f.name not in overrides and hasattr(args, f.metadata.get("flag") or f.name)}
    return cls(**values, **overrides)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses flags; `--config FILE.toml` supplies defaults from the stage's table, flags override; required
    settings are checked after both."""
    args, _ = parser.parse_known_args(argv)
    if args.config is not None:
        parser.set_defaults(**load_section(args.config, args._stage, parser))
    args = parser.parse_args(argv)
    missing = [d for d in _required(parser) if getattr(args, d, None) is None]
    if missing:
        flags = ", ".join("--" + d.replace("_", "-") for d in missing)
        raise PipelineError(f"{flags} required: pass it, or set it in the [{args._stage}] table of a --config file")
    return args


def layout(args: argparse.Namespace) -> Layout:
    return Layout(args.work)


def load_config(path: Path) -> dict[str, Any]:
    """A TOML config: tables named after stages only."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(k for k in raw if k not in STAGES or not isinstance(raw[k], dict))
    if unknown:
        raise PipelineError(f"{path}: unknown tables {unknown}; a config has one [table] per stage: {', '.join(STAGES)}")
    return raw


def load_section(path: Path, stage: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    values = load_config(path).get(stage, {})
    known = {a.dest for a in parser._actions} - {"help", "config", "_stage"}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise PipelineError(f"{path}: unknown keys {unknown} in [{stage}]; valid: {sorted(known)}")
    return {k.replace("-", "_"): (Path(v) if _is_path(parser, k) else v) for k, v in values.items()}


def _is_path(parser: argparse.ArgumentParser, key: str) -> bool:
    action = next((a for a in parser._actions if a.dest == key.replace("-", "_")), None)
    return action is not None and action.type is Path


def _required(parser: Any) -> list[str]:
    root = getattr(parser, "_root", parser)
    if not hasattr(root, "_required_settings"):
        root._required_settings = []
    return root._required_settings
