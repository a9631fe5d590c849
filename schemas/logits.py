"""Teacher logit shards (`logits/{train,val}/*.parquet`), version 2: the cache contract (version 1 caches,
whose windows were cut without `<bos>` or document masking, stay readable; so do version 2 caches written
before the encodings and signals below, whose metadata lacks their fields).

Per row (one window): the token shard's window columns (`window`, `input_ids` [T+1], `continued`, and for
chat data `loss_mask` [T]: see schemas/tokens.py); per position t < T (predicting input_ids[t+1]), all of
softmax(logits / τ), the logits after the final soft-cap and τ the metadata's `temperature` (1 unless the
cache was captured with another; caches without the field are τ = 1):
- `topk_ids` [T][K] int32 and `topk_logprobs` [T][K]: the K most likely ids and their log-probabilities;
- `tail_mass` [T] float32: the exact probability outside the top K (from the full float32 distribution);
- with samples, `sample_ids` / `sample_counts` [T][<=N]: N draws with replacement from the distribution
  restricted to the ids outside the top K, as unique ids (ascending) and their counts (uint16), i.i.d. or
  stratified (metadata `sampling`; absent: i.i.d.), unbiased either way (pipeline/topk.py);
- with `signals`, `label_logprob` [T] float16, the teacher's log-probability of the realised next token, and
  `entropy` [T] float16, its entropy in nats: what data selection reads (pipeline/select.py).
K = 0 is pure sampling (RS-KD): no top-K columns, `tail_mass` 1, the N draws from the full distribution.
The metadata's `capture_dtype` is the teacher's dtype in stage one (absent in older caches).

A cache of rollouts (token shards from `make rollouts`: a model's own samples) carries the token shards'
`behaviour_logprob` [T] float16 unchanged (the sampling model's log-prob of each generated token, 0 elsewhere;
schemas/tokens.py), always has the signals, and its metadata's `rollouts` is the token shards' (which model
sampled, its round, the sampling settings); None otherwise.

Encodings, recorded in the metadata (absent: the older "probability" / "float16"):
- `id_coding` "probability": ids most likely first; "ascending": ids ascending within a position, their
  log-probs beside them; "delta": ascending, stored as the first id then the gaps between neighbours (the
  tail draws likewise), which compress better.
- `logprob_coding` "float16"; or "q8": uint8 codes c, log p = −c·`logprob_step` (codes clamp at 255), which
  `decode` rescales so that Σ exp(top-K) = 1 − tail_mass exactly: the tail is kept exact.
`decode` returns the same arrays whatever the encoding (ids int32, log-probs and signals float32); ids come
in the stored order (the losses do not care; the teacher's top-1 is the argmax of the log-probs).

Positions that do not train (`label_mask` false) hold zeros: stage one skips the head there.

This module is the one place that knows the columns: the writer encodes `Targets` with `encode` (and writes
with `write_options`), the reader decodes with `decode`, the trainer converts with `to_torch`, and each loss
mode reads `MODE_COLUMNS[mode]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import PipelineError
from schemas.common import check_kind, check_schema, fixed_lists, from_json, read_file_meta
from schemas.tokens import BEHAVIOUR, label_mask, window_columns

LOGITS_VERSION = 2
READABLE_VERSIONS = (1, 2)
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")
TAIL_COLUMNS = ("tail_mass",)
SAMPLE_COLUMNS = ("sample_ids", "sample_counts")
SIGNAL_COLUMNS = ("label_logprob", "entropy")
TARGET_COLUMNS = (*TOPK_COLUMNS, *TAIL_COLUMNS, *SAMPLE_COLUMNS)  # what a cache's bytes per token count
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
# Stored columns a column's decoding also reads: 8-bit log-probs are rescaled to 1 − tail mass.
ALSO_READ = {"topk_logprobs": ("tail_mass",)}
# Tensor dtypes in stage two: ids index embeddings (int64); every weight is float32.
TORCH_DTYPES = {"input_ids": torch.long, "topk_ids": torch.long, "sample_ids": torch.long,
                "topk_logprobs": torch.float32, "tail_mass": torch.float32, "sample_counts": torch.float32,
                "label_logprob": torch.float32, "entropy": torch.float32, "label_mask": torch.bool,
                BEHAVIOUR: torch.float32}
ID_CODINGS = ("probability", "ascending", "delta")
LOGPROB_CODINGS = ("float16", "q8")
Q8_MAX = 255


@dataclass(frozen=True)
class Encoding:
    """How a cache stores its targets (see the module docstring). The defaults are the older caches' ones."""

    id_coding: str = "probability"
    logprob_coding: str = "float16"
    logprob_step: float | None = None  # q8: nats per code
    signals: bool = False  # `label_logprob` and `entropy` columns
    # float16 columns written with Parquet's BYTE_STREAM_SPLIT (older caches did): smaller, but DuckDB cannot
    # read them (it splits FLOAT/DOUBLE/INT32/INT64 only), so caches from here on leave it off unless asked.
    float16_split: bool = True

    def __post_init__(self) -> None:
        if self.id_coding not in ID_CODINGS:
            raise PipelineError(f"--id-coding {self.id_coding!r}: use one of {', '.join(ID_CODINGS)}")
        if self.logprob_coding not in LOGPROB_CODINGS:
            raise PipelineError(f"--logprob-coding {self.logprob_coding!r}: use one of {', '.join(LOGPROB_CODINGS)}")
        if self.logprob_coding == "q8" and not (self.logprob_step and self.logprob_step > 0):
            raise PipelineError(f"--logprob-step {self.logprob_step}: 8-bit log-probs need a step > 0 (nats per code)")

    @property
    def ascending(self) -> bool:
        return self.id_coding != "probability"

    @classmethod
    def of(cls, meta: Any) -> Encoding:
        """A cache's encoding from its metadata (token shards and older caches: the defaults)."""
        return cls(getattr(meta, "id_coding", "probability"), getattr(meta, "logprob_coding", "float16"),
                   getattr(meta, "logprob_step", None), getattr(meta, "signals", False),
                   getattr(meta, "float16_split", True))


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
    temperature: float = 1.0  # τ of softmax(logits / τ) that the targets hold
    capture_dtype: str | None = None  # the teacher's weights and activations in stage one, e.g. "bfloat16"
    id_coding: str = "probability"  # the encoding (`Encoding`); older caches lack these fields
    logprob_coding: str = "float16"
    logprob_step: float | None = None
    signals: bool = False
    float16_split: bool = True  # float16 columns byte-stream-split (older caches); False: DuckDB reads them
    sampling: str = "iid"  # how the draws were made (pipeline/topk.py): iid or stratified
    rollouts: dict[str, Any] | None = None  # a cache of rollouts: the token shards' `rollouts` (schemas/tokens.py)

    @property
    def encoding(self) -> Encoding:
        return Encoding.of(self)


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
    """The cache's in-memory form for B windows of T positions (numpy), before encoding."""

    topk_ids: np.ndarray  # [B, T, K] int32, most likely first
    topk_logprobs: np.ndarray  # [B, T, K] float32 (or float16)
    tail_mass: np.ndarray  # [B, T] float32
    entropy: np.ndarray  # [B, T] float32 (stored as float16 with signals; always in the cache statistics)
    sample_ids: np.ndarray | None = None  # [R] int32 values; per-position lists via sample_offsets
    sample_counts: np.ndarray | None = None  # [R] uint16
    sample_offsets: np.ndarray | None = None  # [B*T + 1] int32
    label_logprob: np.ndarray | None = None  # [B, T] float32: log p of input_ids[:, t + 1]


def logits_schema(seq_len: int, topk: int, samples: int, chat: bool = False, version: int = LOGITS_VERSION,
                  encoding: Encoding = Encoding(), behaviour: bool = False) -> pa.Schema:
    """`behaviour`: a cache of rollouts, whose window columns include `behaviour_logprob`."""
    from schemas.tokens import token_schema

    window = list(token_schema(seq_len, chat, behaviour)) if version >= 2 else list(token_schema(seq_len))[:2]
    logprob = pa.uint8() if encoding.logprob_coding == "q8" else pa.float16()
    fields = list(window)
    if topk > 0:  # pure sampling (K = 0) has no top-K columns: Arrow has no lists of size 0
        fields += [pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), topk), seq_len), nullable=False),
                   pa.field("topk_logprobs", pa.list_(pa.list_(logprob, topk), seq_len), nullable=False)]
    fields.append(pa.field("tail_mass", pa.list_(pa.float32(), seq_len), nullable=False))
    if encoding.signals:
        fields += [pa.field(name, pa.list_(pa.float16(), seq_len), nullable=False) for name in SIGNAL_COLUMNS]
    if samples > 0:
        fields += [
            pa.field("sample_ids", pa.list_(pa.list_(pa.int32()), seq_len), nullable=False),
            pa.field("sample_counts", pa.list_(pa.list_(pa.uint16()), seq_len), nullable=False),
        ]
    return pa.schema(fields)


def row_bytes(seq_len: int, topk: int, samples: int) -> int:
    """A row's uncompressed size as stage one counts it when it sizes its row groups
    (`pipeline.shards.rows_per_group`, which also caps a group at 8192 tokens of windows: 2 at SEQ_LEN 4096,
    so that the reader's 2-window regions decode about the windows they train on): per position K ids and
    log-probs (6 bytes each), the tail mass and the two signals (8), the draws (6 each); the window's ids."""
    return seq_len * (topk * 6 + 8 + samples * 6) + (seq_len + 1) * 4


def schema_of(meta: LogitsMeta) -> pa.Schema:
    return logits_schema(meta.seq_len, meta.topk, meta.samples, meta.format == "chat", meta.schema_version,
                         meta.encoding, meta.rollouts is not None)


# Leaf types that Parquet's BYTE_STREAM_SPLIT takes (stored as FLOAT, INT32, INT64 or FIXED_LEN_BYTE_ARRAY).
SPLITTABLE = (pa.float16(), pa.float32(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16())


def write_options(schema: pa.Schema, level: int = 3, float16_split: bool = False) -> dict[str, Any]:
    """Parquet options of a logit shard (benchmarks/storage.py measures each choice): zstd, no dictionary,
    byte-stream-split for every number column, ids and counts included (their high bytes are mostly zero and
    compress apart: −30% on ids at a 256k vocabulary), delta ids left to zstd (Parquet's DELTA_BINARY_PACKED
    came out larger). float16 columns (stored as FIXED_LEN_BYTE_ARRAY) only with `float16_split`: DuckDB
    refuses byte-stream-split on them ("only supported for FLOAT, DOUBLE, INT32 or INT64"), so a default cache
    stays readable by pyarrow, datasets, polars and DuckDB alike (the saving it gives up: README, Storage).
    Options name leaf columns by their full path (`topk_ids.list.element.list.element`): pyarrow silently
    ignores a top-level name for a nested column."""
    from pipeline.shards import parquet_options

    split = [leaf_path(f) for f in schema if _leaf(f.type) in SPLITTABLE
             and (float16_split or _leaf(f.type) != pa.float16())]
    return {**parquet_options(schema, level), "use_byte_stream_split": split or False}


def _leaf(t: pa.DataType) -> pa.DataType:
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


def leaf_path(field: pa.Field) -> str:
    path, t = field.name, field.type
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        path, t = path + ".list.element", t.value_type
    return path


# --- encoding ----------------------------------------------------------------------------------------------


def quantise(logprobs: np.ndarray, step: float) -> np.ndarray:
    """log p → uint8 code round(−log p / step), clamped to 0..255."""
    return np.clip(np.rint(-logprobs.astype(np.float32) / step), 0, Q8_MAX).astype(np.uint8)


def encode(targets: Targets, windows: np.ndarray, input_ids: np.ndarray, continued: np.ndarray, schema: pa.Schema,
           loss_mask: np.ndarray | None = None, encoding: Encoding = Encoding(),
           behaviour_logprob: np.ndarray | None = None) -> pa.Table:
    """Arrow table in the logits schema for one batch of windows (`behaviour_logprob`: a cache of rollouts,
    the token shards' column, float16 values passed through unchanged)."""
    b, t = targets.tail_mass.shape
    k = targets.topk_ids.shape[-1]
    columns = window_columns(windows, input_ids, continued, loss_mask, behaviour_logprob)
    if k:
        ids, lp = targets.topk_ids, targets.topk_logprobs
        if encoding.ascending:
            order = np.argsort(ids, axis=-1, kind="stable")
            ids, lp = np.take_along_axis(ids, order, -1), np.take_along_axis(lp, order, -1)
        if encoding.id_coding == "delta":
            ids = np.concatenate([ids[..., :1], np.diff(ids, axis=-1)], axis=-1)
        lp = quantise(lp, encoding.logprob_step) if encoding.logprob_coding == "q8" else lp.astype(np.float16)
        columns["topk_ids"] = fixed_lists(ids.astype(np.int32), t, k)
        columns["topk_logprobs"] = fixed_lists(lp, t, k)
    columns["tail_mass"] = fixed_lists(targets.tail_mass.astype(np.float32), t)
    if encoding.signals:
        assert targets.label_logprob is not None, "signals need the label log-probs"
        columns["label_logprob"] = fixed_lists(targets.label_logprob.astype(np.float16), t)
        columns["entropy"] = fixed_lists(targets.entropy.astype(np.float16), t)
    if targets.sample_offsets is not None:
        offsets = targets.sample_offsets
        ids = targets.sample_ids.astype(np.int32)
        if encoding.id_coding == "delta":
            ids = _segment_diff(ids, offsets)
        for name, values in (("sample_ids", ids), ("sample_counts", targets.sample_counts)):
            lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            columns[name] = pa.FixedSizeListArray.from_arrays(lists, t)
    return pa.table(columns, schema=schema.remove_metadata())


def _segment_diff(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per list (values[offsets[i]:offsets[i+1]]): the first value, then the differences."""
    out = values.copy()
    out[1:] -= values[:-1]
    starts = offsets[:-1][np.diff(offsets) > 0]
    out[starts] = values[starts]
    return out


# --- decoding ----------------------------------------------------------------------------------------------


def stored_columns(columns: tuple[str, ...], available: list[str]) -> list[str]:
    """The stored columns to read for `columns`: derived ones replaced by their sources, plus what a
    column's decoding needs; only those the file has (a K = 0 cache has no top-K columns)."""
    out: list[str] = []
    for name in columns:
        for source in DERIVED.get(name, (name,)) + ALSO_READ.get(name, ()):
            if source not in out and source in available:
                out.append(source)
    return out


def missing_columns(columns: tuple[str, ...], available: list[str], meta: Any) -> list[str]:
    """Requested columns a cache can neither read nor derive (top-K columns of a K = 0 cache are empty)."""
    empty = TOPK_COLUMNS if getattr(meta, "topk", None) == 0 else ()
    return sorted(set(columns) - set(available) - set(DERIVED) - set(empty))


def decode(table: pa.Table, columns: tuple[str, ...], meta: Any = None) -> dict[str, np.ndarray]:
    """Columns → dense numpy arrays [rows, T(, K)]: ids int32 and counts uint16 as stored, log-probs and
    signals float32 whatever their encoding (`meta`: the cache's metadata, typed or the JSON dict of a shard's
    `distill` key; None or token shards: plain columns); the variable-length tail draws are padded with zeros (id 0, count 0) to at least N entries;
    `label_mask` is derived."""
    if isinstance(meta, dict):  # the JSON of a shard's `distill` key, as plain pyarrow users read it
        meta = from_json(LogitsShardMeta if "source_shard" in meta else LogitsMeta, meta, "decode(meta=…)")
    enc, samples = Encoding.of(meta), getattr(meta, "samples", 0)
    out: dict[str, np.ndarray] = {}
    for name in columns:
        if name in DERIVED:
            continue
        if name not in table.column_names:
            if name in TOPK_COLUMNS and getattr(meta, "topk", None) == 0:
                out[name] = np.zeros((table.num_rows, meta.seq_len, 0),
                                     dtype=np.int32 if name == "topk_ids" else np.float32)
                continue
            raise PipelineError(f"the cache has no column {name!r} (columns: {', '.join(table.column_names)})")
        out[name] = _decode_column(table, name, enc, max(1, samples))
    if "label_mask" in columns:
        stored = {n: _dense(table.column(n), 1) for n in ("continued", "loss_mask") if n in table.column_names}
        ids = out["input_ids"] if "input_ids" in out else _dense(table.column("input_ids"), 1)
        out["label_mask"] = label_mask(ids, stored.get("continued"), stored.get("loss_mask"))
    return out


def _decode_column(table: pa.Table, name: str, enc: Encoding, pad_to: int) -> np.ndarray:
    column = table.column(name)
    if name == "sample_ids" and enc.id_coding == "delta":
        return _dense(column, pad_to, segment_sum=True)
    values = _dense(column, pad_to)
    if name == "topk_ids" and enc.id_coding == "delta":
        return np.cumsum(values, axis=-1, dtype=np.int64).astype(np.int32)
    if name == "topk_logprobs" and enc.logprob_coding == "q8":
        return dequantise(values, _dense(table.column("tail_mass"), 1), enc.logprob_step)
    if values.dtype == np.float16:
        return values.astype(np.float32)
    return values


def dequantise(codes: np.ndarray, tail: np.ndarray, step: float) -> np.ndarray:
    """uint8 codes [.., K] → log-probs rescaled so that Σ exp = 1 − tail mass (float32). Positions whose
    codes are all 0 with no tail hold zeros (positions that do not train; a trained one with K ≥ 2 cannot)."""
    lp = codes.astype(np.float64) * -step
    if codes.shape[-1] == 0:
        return lp.astype(np.float32)
    # In float64, so the result does not depend on the order the ids are stored in.
    top = lp.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(lp - top).sum(-1))
    target = np.log(np.maximum(1.0 - tail.astype(np.float64), 1e-30))
    empty = ~(codes != 0).any(-1) & (tail == 0)
    return (lp + np.where(empty, 0.0, target - lse)[..., None]).astype(np.float32)


def stored_logprobs(logprobs: np.ndarray, tail: np.ndarray, encoding: Encoding) -> np.ndarray:
    """Log-probs as a cache with `encoding` reads them back (float32): what `verify` compares a re-run with."""
    if encoding.logprob_coding == "q8":
        return dequantise(quantise(logprobs, encoding.logprob_step), tail, encoding.logprob_step)
    return logprobs.astype(np.float16).astype(np.float32)


def logprob_rounding(logprobs: np.ndarray, encoding: Encoding) -> np.ndarray:
    """How far a stored log-prob may be from the exact one (nats): float16 keeps 2^-11 of its size (× 2
    margin); 8-bit codes half a step, and the rescaling to the exact tail up to another half."""
    if encoding.logprob_coding == "q8":
        return np.full(logprobs.shape, encoding.logprob_step, dtype=np.float32)
    return (2.0**-10 * np.abs(logprobs)).astype(np.float32)


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(a).to(device=device, dtype=TORCH_DTYPES[name]) for name, a in batch.items()}


def validate_logits_shard(path: str | Path) -> LogitsShardMeta:
    schema, raw = read_file_meta(path)
    check_kind(path, raw, "logits", READABLE_VERSIONS)
    meta = from_json(LogitsShardMeta, raw, path)
    try:
        meta.encoding  # noqa: B018 (validates the recorded encoding)
    except PipelineError as e:
        raise PipelineError(f"{path}: unknown encoding in its metadata ({e}); written by a newer version of this "
                            "pipeline") from None
    check_schema(path, schema, schema_of(meta))
    return meta


def _dense(column: pa.ChunkedArray, pad_to: int, segment_sum: bool = False) -> np.ndarray:
    """A column as a dense array; `segment_sum`: the variable-length lists hold a first value then
    differences (delta coding), summed back per list."""
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
        if segment_sum and len(values):
            total = np.cumsum(values, dtype=np.int64)
            before = np.concatenate([[0], total])[offsets[:-1]]  # the running sum before each list
            values = (total - np.repeat(before, lengths)).astype(values.dtype)
        width = max(pad_to, int(lengths.max()) if len(lengths) else 1)
        out = np.zeros((len(lengths), width), dtype=values.dtype)
        row = np.repeat(np.arange(len(lengths)), lengths)
        col = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
        out[row, col] = values
        return out.reshape(*shape, width)
    return arr.to_numpy(zero_copy_only=False).reshape(shape)
