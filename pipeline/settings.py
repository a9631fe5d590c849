"""How a component's settings are declared: a frozen dataclass whose fields carry their default and a
one-line help. The stage CLIs turn the fields into flags (`--field-name`), TOML keys and Make variables, so
each default is written exactly once, here in the library."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, **extra: Any) -> Any:
    """A dataclass field with CLI metadata: `help`, and `flag` when the flag's name is not the field's."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, **extra})
