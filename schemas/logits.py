"""Teacher logit shards (`logits/{train,val}/*.parquet`), version 2: the cache contract (version 1 caches,
whose windows were cut without `<bos>` or document masking, stay readable).

Per row (one window): the token shard's window columns (`window`, `input_ids` [T+1], `continued`, and for
chat data `loss_mask` [T]: see schemas/tokens.py); per position t < T (predicting input_ids[t+1]):
`topk_ids` [T][K] int32 most likely first, `topk_logprobs` [T][K] float16 log-probabilities at temperature 1
after the final soft-cap, `tail_mass` [T] float32 exact probability outside the top K (from the full float32
distribution); with samples, `sample_ids` / `sample_counts` [T][<=N]: N draws with replacement from the
distribution restricted to the ids outside the top K, as unique ids (ascending) and their counts.

Positions that do not train (`label_mask` false) hold zeros: stage one skips the head there.

This module is the one place that knows the columns: the writer encodes `Targets` with `encode`, the reader
decodes with `decode`, the trainer converts with `to_torch`, and each loss mode reads `MODE_COLUMNS[mode]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from schemas.common import check_kind, check_schema, fixed_lists, from_json, read_file_meta
from schemas.tokens import label_mask, window_columns

LOGITS_VERSION = 2
READABLE_VERSIONS = (1, 2)
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")
TAIL_COLUMNS = ("tail_mass",)
SAMPLE_COLUMNS = ("sample_ids", "sample_counts")
# `input_ids` (the student's inputs and the CE labels) and `label_mask` (derived: which positions train)
# come with every mode.
WINDOW = ("input_ids", "label_mask")
MODE_COLUMNS: dict[str, tuple[str, ...]] = {
    "ce": WINDOW,
    "renorm": (*WINDOW, *TOPK_COLUMNS),
    "tail": (*WINDOW, *TOPK_COLUMNS, *TAIL_COLUMNS),
    "sampled": (*WINDOW, *TOPK_COLUMNS, *TAIL_COLUMNS, *SAMPLE_COLUMNS),
}
EVAL_COLUMNS = MODE_COLUMNS["tail"]  # the evaluation's KL and agreement use the top-K and the tail bucket
# Columns computed from stored ones when read, and what they are computed from (where a file has them).
DERIVED = {"label_mask": ("input_ids", "continued", "loss_mask")}
# Tensor dtypes in stage two: ids index embeddings (int64); every weight is float32 (float16 on disk).
TORCH_DTYPES = {"input_ids": torch.long, "topk_ids": torch.long, "sample_ids": torch.long,
                "topk_logprobs": torch.float32, "tail_mass": torch.float32, "sample_counts": torch.float32,
                "label_mask": torch.bool}


@dataclass(frozen=True, kw_only=True)
class LogitsMeta:
    """The settings every shard of a cache shares (a split manifest's `meta`)."""

    kind: str = "logits"
    schema_version: int = LOGITS_VERSION
    seq_len: int
    vocab_size: int
    topk: int
    samples: int
    sample_seed: int
    tokenizer_fingerprint: str
    teacher_fingerprint: str
    split: str
    corpus: str = ""
    format: str = "text"


@dataclass(frozen=True, kw_only=True)
class LogitsShardMeta(LogitsMeta):
    """One shard's metadata: the shared settings plus the token shard it was made from."""

    source_shard: str
    source_sha256: str

    def shared(self) -> LogitsMeta:
        fields = {f.name for f in dataclasses.fields(LogitsMeta)}
        return LogitsMeta(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class Targets:
    """The cache's in-memory form for B windows of T positions (numpy, the dtypes on disk)."""

    topk_ids: np.ndarray  # [B, T, K] int32
    topk_logprobs: np.ndarray  # [B, T, K] float16
    tail_mass: np.ndarray  # [B, T] float32
    entropy: np.ndarray  # [B, T] float32, for cache statistics (not stored)
    sample_ids: np.ndarray | None = None  # [R] int32 values; per-position lists via sample_offsets
    sample_counts: np.ndarray | None = None  # [R] uint16
    sample_offsets: np.ndarray | None = None  # [B*T + 1] int32


def logits_schema(seq_len: int, topk: int, samples: int, chat: bool = False, version: int = LOGITS_VERSION) -> pa.Schema:
    from schemas.tokens import token_schema

    window = list(token_schema(seq_len, chat)) if version >= 2 else list(token_schema(seq_len))[:2]
    fields = window + [
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), topk), seq_len), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), topk), seq_len), nullable=False),
        pa.field("tail_mass", pa.list_(pa.float32(), seq_len), nullable=False),
    ]
    if samples > 0:
        fields += [
            pa.field("sample_ids", pa.list_(pa.list_(pa.int32()), seq_len), nullable=False),
            pa.field("sample_counts", pa.list_(pa.list_(pa.uint16()), seq_len), nullable=False),
        ]
    return pa.schema(fields)


def encode(targets: Targets, windows: np.ndarray, input_ids: np.ndarray, continued: np.ndarray, schema: pa.Schema,
           loss_mask: np.ndarray | None = None) -> pa.Table:
    """Arrow table in the logits schema for one batch of windows."""
    b, t, k = targets.topk_ids.shape
    columns = {
        **window_columns(windows, input_ids, continued, loss_mask),
        "topk_ids": fixed_lists(targets.topk_ids, t, k),
        "topk_logprobs": fixed_lists(targets.topk_logprobs, t, k),
        "tail_mass": fixed_lists(targets.tail_mass, t),
    }
    if targets.sample_offsets is not None:
        offsets = pa.array(targets.sample_offsets)
        for name, values in (("sample_ids", targets.sample_ids), ("sample_counts", targets.sample_counts)):
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.ListArray.from_arrays(offsets, pa.array(values)), t)
    return pa.table(columns, schema=schema.remove_metadata())


def stored_columns(columns: tuple[str, ...], available: list[str]) -> list[str]:
    """The stored columns to read for `columns` (derived ones replaced by their sources in the file)."""
    out: list[str] = []
    for name in columns:
        for source in DERIVED.get(name, (name,)):
            if source not in out and (source in available or name not in DERIVED):
                out.append(source)
    return out


def decode(table: pa.Table, columns: tuple[str, ...], samples: int = 0) -> dict[str, np.ndarray]:
    """Columns → dense numpy arrays ([rows, T(, K)] in their stored dtypes); the variable-length tail draws
    are padded with zeros (id 0, count 0) to at least `samples` entries; `label_mask` is derived."""
    out = {name: _dense(table.column(name), max(1, samples)) for name in columns if name not in DERIVED}
    if "label_mask" in columns:
        stored = {n: _dense(table.column(n), 1) for n in ("continued", "loss_mask") if n in table.column_names}
        ids = out["input_ids"] if "input_ids" in out else _dense(table.column("input_ids"), 1)
        out["label_mask"] = label_mask(ids, stored.get("continued"), stored.get("loss_mask"))
    return out


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(a).to(device=device, dtype=TORCH_DTYPES[name]) for name, a in batch.items()}


def validate_logits_shard(path: str | Path) -> LogitsShardMeta:
    schema, raw = read_file_meta(path)
    check_kind(path, raw, "logits", READABLE_VERSIONS)
    meta = from_json(LogitsShardMeta, raw, path)
    expected = logits_schema(meta.seq_len, meta.topk, meta.samples, meta.format == "chat", meta.schema_version)
    check_schema(path, schema, expected)
    return meta


def _dense(column: pa.ChunkedArray, pad_to: int) -> np.ndarray:
    arr = column.combine_chunks()
    shape = [len(arr)]
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    if pa.types.is_list(arr.type):
        offsets = arr.offsets.to_numpy()
        offsets = offsets - offsets[0]  # a sliced array's offsets do not start at 0
        values = arr.flatten().to_numpy()
        lengths = np.diff(offsets)
        width = max(pad_to, int(lengths.max()) if len(lengths) else 1)
        out = np.zeros((len(lengths), width), dtype=values.dtype)
        row = np.repeat(np.arange(len(lengths)), lengths)
        col = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
        out[row, col] = values
        return out.reshape(*shape, width)
    return arr.to_numpy(zero_copy_only=False).reshape(shape)
