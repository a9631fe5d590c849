"""`manifest.json`, one per split folder, version 1: lists the complete shards (file, rows, tokens, bytes,
sha256), the settings every shard shares (`meta`) and statistics. It is written last, so its presence
means the split is complete; readers trust only the shards it lists.

Capture records (`.capture/<split>/<file>.<key>.json` in a logit cache): what the rank that wrote a shard
saw right after its rename — sha256 (taken while writing), bytes, mtime, rows, target bytes and the footer's
statistics; `key` is a digest of the metadata the shard was made for, so a folder listing alone tells which
shards are complete for a run's settings. Manifests are assembled from these records, never by re-reading
shards, so a manifest vouches only for bytes the writer wrote."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json, sha256_file, write_json
from schemas.common import from_json, to_json
from schemas.logits import LogitsMeta
from schemas.tokens import TokensMeta

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = ".capture"  # in a logit cache: one capture record per shard, <split>/<file>.<key>.json
HINTS = {"tokens": "run `make tokens` first", "logits": "run `make teacher-logits` first"}


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    file: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    max_id: int | None = None  # token shards: the largest id, checked against a teacher's vocabulary


@dataclass(frozen=True, kw_only=True)
class TokensStats:
    max_id: int
    units: int | None = None  # leading work units the manifests draw from (all, unless --corpus-tokens stops early)
    documents: int | None = None  # documents (or first pieces of documents) of this split read in those units
    available_tokens: int | None = None  # tokens those units hold for this split, before --corpus-tokens/--val-tokens
    units_sha256: str | None = None  # the corpus's unit plan (paths, sizes, mtimes): a changed corpus is rebuilt
    filters: dict[str, int] | None = None  # documents each filter dropped, and pii_* replacements (when filtered)
    conversations: dict[str, int] | None = None  # chat: packed whole / cut at a turn / dropped (too_long, no_reply, markers)


@dataclass(frozen=True, kw_only=True)
class LogitsStats:
    bytes_per_token: float
    mean_tail_mass: float
    mean_teacher_entropy: float
    capture_config: dict[str, Any] = field(default_factory=dict)
    positions: int | None = None  # trained positions (the means are over them); absent in older manifests
    mean_teacher_loss: float | None = None  # mean −label_logprob over trained positions (caches with signals)
    target_bytes_per_token: float | None = None  # compressed bytes of the target columns per token (no window columns)
    # Histograms of the teacher's loss and entropy per trained position and per window (pipeline/select.py):
    # what `--select` quantiles are read from, with no pass over the cache.
    histograms: dict[str, Any] | None = None


META_TYPES = {"tokens": (TokensMeta, TokensStats), "logits": (LogitsMeta, LogitsStats)}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    kind: str
    manifest_version: int = MANIFEST_VERSION
    meta: TokensMeta | LogitsMeta
    shards: tuple[ShardRecord, ...]
    rows: int
    tokens: int
    stats: TokensStats | LogitsStats

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "manifest_version": self.manifest_version, "meta": to_json(self.meta),
                "shards": [to_json(s) for s in self.shards], "rows": self.rows, "tokens": self.tokens,
                "stats": to_json(self.stats)}

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> Manifest:
        meta_type, stats_type = META_TYPES[raw["kind"]]
        return cls(kind=raw["kind"], manifest_version=raw["manifest_version"],
                   meta=from_json(meta_type, raw["meta"], f"{where} (meta)"),
                   shards=tuple(from_json(ShardRecord, s, f"{where} (shards)") for s in raw["shards"]),
                   rows=raw["rows"], tokens=raw["tokens"], stats=from_json(stats_type, raw["stats"], f"{where} (stats)"))


def write_manifest(folder: str | Path, meta: TokensMeta | LogitsMeta, shards: list[ShardRecord],
                   stats: TokensStats | LogitsStats) -> Manifest:
    manifest = Manifest(kind=meta.kind, meta=meta, shards=tuple(sorted(shards, key=lambda s: s.file)),
                        rows=sum(s.rows for s in shards), tokens=sum(s.tokens for s in shards), stats=stats)
    write_json(Path(folder) / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(folder: str | Path, kind: str | tuple[str, ...], verify_sha: bool = False,
                  check_files: bool = True) -> Manifest:
    """A split's manifest, checked: its kind (one of `kind`), version, and every listed shard's presence and
    size (and sha256 with verify_sha; neither with check_files=False: a caller that reads each shard later and
    fails on a missing one by name need not stat them all first)."""
    folder = Path(folder)
    kinds = (kind,) if isinstance(kind, str) else kind
    hint = " or ".join(HINTS.get(k, k) for k in kinds)
    raw = read_json(folder / MANIFEST, f"the {'/'.join(kinds)} split is incomplete or missing; {hint}")
    if not isinstance(raw, dict) or raw.get("kind") not in kinds or raw.get("manifest_version") != MANIFEST_VERSION:
        found = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
        raise PipelineError(f"{folder / MANIFEST}: a {found} manifest, expected {'/'.join(kinds)} v{MANIFEST_VERSION}")
    manifest = Manifest.from_json(raw, folder / MANIFEST)
    for shard in manifest.shards if check_files or verify_sha else ():
        path = folder / shard.file
        if not path.is_file():
            raise PipelineError(f"{path}: listed in the manifest but missing; rerun the stage that writes {folder}")
        if path.stat().st_size != shard.bytes or (verify_sha and sha256_file(path) != shard.sha256):
            raise PipelineError(f"{path}: size or sha256 differs from {folder / MANIFEST}; the shard is corrupted, "
                                "delete it and rerun")
    return manifest


def shard_record(path: Path, rows: int, tokens_per_row: int, **extra: Any) -> ShardRecord:
    """A manifest entry for a complete shard."""
    return ShardRecord(file=path.name, rows=rows, tokens=rows * tokens_per_row, bytes=path.stat().st_size,
                       sha256=sha256_file(path), **extra)


@dataclass(frozen=True, kw_only=True)
class CaptureRecord:
    """What the writer of one logit shard recorded right after renaming it into place."""

    file: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    mtime_ns: int
    target_bytes: int  # compressed bytes of the target columns
    stats: dict[str, Any]  # the footer's statistics (sums over trained positions, histograms)

    def shard(self) -> ShardRecord:
        return ShardRecord(file=self.file, rows=self.rows, tokens=self.tokens, bytes=self.bytes, sha256=self.sha256)


def record_key(meta: Any) -> str:
    """16 hex digits of the sha256 of a shard's metadata (canonical JSON): which settings a record is for."""
    return hashlib.sha256(json.dumps(to_json(meta), sort_keys=True).encode()).hexdigest()[:16]


def record_name(file: str, key: str) -> str:
    return f"{file}.{key}.json"


def record_file(name: str) -> str | None:
    """The shard a record's name is for (None for a name that is not a record's)."""
    stem, dot, ext = name.rpartition(".")
    shard, dot2, key = stem.rpartition(".")
    return shard if dot and dot2 and ext == "json" and len(key) == 16 and not name.startswith(".") else None


def write_record(folder: Path, key: str, record: CaptureRecord) -> None:
    write_json(folder / record_name(record.file, key), to_json(record))


def read_record(path: Path) -> CaptureRecord:
    return from_json(CaptureRecord, read_json(path, "a capture record"), path)
