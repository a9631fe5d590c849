"""`manifest.json`, one per split folder, version 1: lists the complete shards (file, rows, tokens, bytes,
sha256), the settings every shard shares (`meta`) and statistics. It is written last, so its presence
means the split is complete; readers trust only the shards it lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json, sha256_file, write_json

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("file", "rows", "tokens", "bytes", "sha256")


def write_manifest(folder: str | Path, kind: str, meta: dict[str, Any], shards: list[dict[str, Any]],
                   stats: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {
        "kind": kind, "manifest_version": MANIFEST_VERSION, "meta": meta,
        "shards": sorted(shards, key=lambda s: s["file"]),
        "rows": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "stats": stats or {},
    }
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path, kind: str | tuple[str, ...], verify_sha: bool = False) -> dict[str, Any]:
    """A split's manifest, checked: its kind (one of `kind`), version, and every listed shard's presence and
    size (and sha256 with verify_sha)."""
    folder = Path(folder)
    kinds = (kind,) if isinstance(kind, str) else kind
    hints = {"tokens": "run `make tokens` first", "logits": "run `make teacher-logits` first"}
    hint = " or ".join(hints.get(k, k) for k in kinds)
    manifest = read_json(folder / MANIFEST, f"the {'/'.join(kinds)} split is incomplete or missing; {hint}")
    if manifest.get("kind") not in kinds or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise PipelineError(f"{folder / MANIFEST}: a {manifest.get('kind')} manifest, expected "
                            f"{'/'.join(kinds)} v{MANIFEST_VERSION}")
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise PipelineError(f"{path}: listed in the manifest but missing; rerun the stage that writes {folder}")
        if path.stat().st_size != shard["bytes"] or (verify_sha and sha256_file(path) != shard["sha256"]):
            raise PipelineError(f"{path}: size or sha256 differs from {folder / MANIFEST}; the shard is corrupted, delete it and rerun")
    return manifest
