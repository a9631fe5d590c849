"""What every artifact shares: one JSON object of metadata under a single schema-metadata key, typed by a
frozen dataclass that converts to and from JSON and rejects what it does not know."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

META_KEY = b"distill"
T = TypeVar("T")


def to_json(obj: Any) -> dict[str, Any]:
    """A typed record as a JSON object; fields left at None are omitted (optional, absent in older files)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def from_json(cls: type[T], raw: Any, where: str | Path) -> T:
    """Builds `cls` from a JSON object: every required field present, no unknown field, so a file from
    another version or a foreign tool fails here with its name instead of deep inside a stage."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a JSON object, found {type(raw).__name__}; recreate it")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PipelineError(f"{where}: unknown keys {unknown}; written by another version of this pipeline, recreate it")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PipelineError(f"{where}: lacks {missing}; recreate it")
    return cls(**raw)


def with_meta(schema: pa.Schema, meta: Any) -> pa.Schema:
    return schema.with_metadata({META_KEY: json.dumps(to_json(meta), sort_keys=True).encode()})


def read_file_meta(path: str | Path) -> tuple[pa.Schema, dict[str, Any]]:
    """Opens a shard's footer only; a truncated or foreign file fails with its name."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: not a readable Parquet shard ({e}); delete it and rerun the stage") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise PipelineError(f"{path}: no '{META_KEY.decode()}' metadata; not a shard written by this pipeline")
    return schema, json.loads(raw)


def check_kind(path: str | Path, raw: dict[str, Any], kind: str, versions: tuple[int, ...]) -> None:
    if raw.get("kind") != kind or raw.get("schema_version") not in versions:
        expected = "/".join(f"v{v}" for v in versions)
        raise PipelineError(f"{path}: a {raw.get('kind')} shard v{raw.get('schema_version')}, expected {kind} {expected}")


def check_schema(path: str | Path, schema: pa.Schema, expected: pa.Schema) -> None:
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise PipelineError(
            f"{path}: schema does not match the expected one ({_diff(schema, expected)}); the file is from "
            "another version or corrupted, recreate it"
        )


def fixed_lists(values: Any, *sizes: int) -> pa.Array:
    """Nested fixed-size lists from a flat numpy array: sizes outermost first, e.g. [T][K]."""
    arr = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _diff(schema: pa.Schema, expected: pa.Schema) -> str:
    for field in expected:
        if field.name not in schema.names:
            return f"column {field.name!r} missing"
        if not schema.field(field.name).type.equals(field.type):
            return f"column {field.name!r} is {schema.field(field.name).type}, expected {field.type}"
    return f"columns {schema.names}, expected {expected.names}"
