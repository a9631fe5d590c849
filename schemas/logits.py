"""Teacher logit shards (`logits/{train,val}/*.parquet`), version 1: the cache contract.

Per row (one window): `window`, `input_ids` [T+1]; per position t < T (predicting input_ids[t+1]):
`topk_ids` [T][K] int32 most likely first, `topk_logprobs` [T][K] float16 log-probabilities at temperature 1
after the final soft-cap, `tail_mass` [T] float32 exact probability outside the top K (from the full float32
distribution); with samples, `sample_ids` / `sample_counts` [T][<=N]: N draws with replacement from the
distribution restricted to the ids outside the top K, as unique ids (ascending) and their counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import PipelineError
from schemas.common import check_schema, read_file_meta, require

LOGITS_VERSION = 1
LOGITS_META_KEYS = (
    "kind", "schema_version", "seq_len", "vocab_size", "topk", "samples", "tokenizer_fingerprint",
    "teacher_fingerprint", "source_shard", "source_sha256", "split", "sample_seed",
)


def logits_schema(seq_len: int, topk: int, samples: int) -> pa.Schema:
    fields = [
        pa.field("window", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len + 1), nullable=False),
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


def validate_logits_shard(path: str | Path) -> dict[str, Any]:
    schema, meta = read_file_meta(path)
    require(meta, LOGITS_META_KEYS, path)
    if meta["kind"] != "logits" or meta["schema_version"] != LOGITS_VERSION:
        raise PipelineError(f"{path}: a {meta['kind']} shard v{meta['schema_version']}, expected logits v{LOGITS_VERSION}")
    check_schema(path, schema, logits_schema(meta["seq_len"], meta["topk"], meta["samples"]))
    return meta
