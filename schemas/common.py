"""What every shard shares: one JSON object of metadata under a single schema-metadata key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

META_KEY = b"distill"


def with_meta(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    return schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


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


def check_schema(path: str | Path, schema: pa.Schema, expected: pa.Schema) -> None:
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise PipelineError(
            f"{path}: schema does not match the expected one ({_diff(schema, expected)}); the file is from "
            "another version or corrupted, recreate it"
        )


def require(meta: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise PipelineError(f"{path}: metadata lacks {missing}; recreate the shard")


def _diff(schema: pa.Schema, expected: pa.Schema) -> str:
    for field in expected:
        if field.name not in schema.names:
            return f"column {field.name!r} missing"
        if not schema.field(field.name).type.equals(field.type):
            return f"column {field.name!r} is {schema.field(field.name).type}, expected {field.type}"
    return f"columns {schema.names}, expected {expected.names}"
