"""`make help`'s variable table: each Make variable, the stage flag it sets and that flag's default, read
from the stage's own parser (so the defaults shown are the ones that apply)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

MAKE_ONLY = {
    "RUN": "run name (default: demo)", "WORK": "work directory (default: runs/$(RUN))",
    "CONFIG": "a TOML file whose [stage] tables set any flag (default: none; the demo uses configs/demo.toml)",
    "STUDENTS": "train-student: presets, config.json files or HF folders, `name=spec` to name them "
                "(default: demo-student-s demo-student-m)",
    "MERGE_INPUTS": "merge: the model folders to average", "EXTRA": "more flags for the stage",
    "PROMPT": "generate: the prompt (read from the environment, so quotes and backticks survive)",
    "LAUNCH": "prefix of the GPU stages, e.g. \"accelerate launch --num_processes 8\" (default: the venv's python)",
    "VENV": "the virtual environment make install creates and every target uses (default: .venv)",
    "TORCH_SPEC": "the torch requirement make install installs (default: torch==2.13.0, a CPU wheel here; "
                  "plain torch for a CUDA build)",
}


def default_of(stage: str, key: str) -> tuple[Any, str]:
    parser = importlib.import_module(f"stages.{stage}").parser()
    action = next(a for a in parser._actions if a.dest == key)
    return action.default, (action.help or "").split(" (default")[0].split(" (required")[0]


def show(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value) if not isinstance(value, Path) else f"{value} (from WORK)"


def main(settings: list[str]) -> None:
    print("variables (a variable becomes its stage's flag only when set; defaults are the stages'):")
    rows: dict[str, list[str]] = {}
    for entry in settings:
        var, stage, key = entry.split(":")
        default, text = default_of(stage, key)
        where = f"{stage} --{key.replace('_', '-')}" if key != "file" else f"{stage} FILE"
        shown = "WORK-relative" if default is None and key in ("teacher", "cache", "students", "tokens", "out", "file") \
            else show(default)
        rows.setdefault(var, []).append(f"{where} [{shown}]")
        rows[var + "\0help"] = [text]
    width = max(len(v) for v in rows if "\0" not in v)
    for var, places in rows.items():
        if "\0" in var:
            continue
        # A variable several stages read sets all of them at once (SEED seeds generate, teacher and training).
        shared = f"shared by {len(places)} stages, one value for all: " if len(places) > 1 else ""
        print(f"  {var:<{width}}  {shared}{'; '.join(places)}  {rows[var + chr(0) + 'help'][0]}")
    for var, text in MAKE_ONLY.items():
        print(f"  {var:<{width}}  {text}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
