"""Preference shards (`REWARD_MODEL/data/{train,val}/*.parquet` + `manifest.json`), version 1: what
`make reward-model` reads (pipeline/preferences.py writes them from a preference JSONL or Parquet file).

One row per pair. Both sequences are the whole conversation in Gemma's chat template (pipeline/chat.py),
`<bos>` first: the prompt's turns, then the reply as a model turn ending `<end_of_turn>\\n`, tokenized whole
with the reward model's tokenizer; the reward is read at the last token.

Columns: `pair` int64 (the row's index in the source file, counting every row, bad ones too),
`chosen_ids` list<int32> and `rejected_ids` list<int32> (variable length, at most `max_tokens` each; the
names TRL's RewardTrainer reads as a tokenized dataset), `prompt_tokens` int32 (how many leading tokens the
two sequences share: the prompt and the model turn's header, as far as the tokenizer cuts them alike).

A split's `manifest.json` (written last: its presence means the split is complete) holds `meta` (every
shard's metadata below), the shards (file, rows, bytes, sha256) and `counts`: what the build read, kept and
dropped (the same counts in both splits' manifests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json
from schemas.common import check_kind, check_schema, from_json, read_file_meta

PREFERENCES_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class PreferencesMeta:
    """Every preference shard's metadata (and its split manifest's `meta`)."""

    kind: str = "preferences"
    schema_version: int = PREFERENCES_VERSION
    split: str
    source: str  # the preference file, as given
    source_version: str  # its size and mtime: a changed file is rebuilt
    tokenizer_fingerprint: str
    vocab_size: int
    val_fraction: float
    max_tokens: int
    filters: dict[str, Any] | None = None  # pipeline/filters.py `Filters.describe` (None: no filter)
    split_by: str = "prompt+chosen"  # a hash of the prompt's turns and the chosen reply decides the split


@dataclass(frozen=True, kw_only=True)
class PreferenceShard:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class PreferencesManifest:
    meta: PreferencesMeta
    shards: list[PreferenceShard]
    counts: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def preference_schema() -> pa.Schema:
    return pa.schema([
        pa.field("pair", pa.int64(), nullable=False),
        pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
    ])


def validate_preference_shard(path: str | Path) -> PreferencesMeta:
    schema, raw = read_file_meta(path)
    check_kind(path, raw, "preferences", (PREFERENCES_VERSION,))
    meta = from_json(PreferencesMeta, raw, path)
    check_schema(path, schema, preference_schema())
    return meta


def read_preferences_manifest(folder: str | Path) -> PreferencesManifest:
    """A split folder's manifest; a missing or foreign one fails with its name."""
    path = Path(folder) / MANIFEST
    raw = read_json(path, "the preference split is incomplete (its manifest is written last); rerun the stage")
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a JSON object; delete the folder and rerun")
    meta = from_json(PreferencesMeta, raw.get("meta"), path)
    shards = [from_json(PreferenceShard, s, path) for s in raw.get("shards", [])]
    counts = raw.get("counts")
    if not isinstance(counts, dict):
        raise PipelineError(f"{path}: lacks counts; delete the folder and rerun")
    return PreferencesManifest(meta=meta, shards=shards, counts=counts)
