"""Token shards (`tokens/{train,val}/*.parquet`), version 1.

One row per window of SEQ_LEN+1 token ids; consecutive windows overlap by one token so position t of a
window predicts token t+1 of the same row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.common import check_kind, check_schema, fixed_lists, from_json, read_file_meta

TOKENS_VERSION = 1
TOKEN_COLUMNS = ("window", "input_ids")


@dataclass(frozen=True, kw_only=True)
class TokensMeta:
    """Every token shard's metadata (and its split manifest's `meta`)."""

    kind: str = "tokens"
    schema_version: int = TOKENS_VERSION
    seq_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    corpus: str
    split: str
    val_fraction: float | None = None
    corpus_tokens: int | None = None
    shard_windows: int | None = None


def token_schema(seq_len: int) -> pa.Schema:
    return pa.schema([
        pa.field("window", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len + 1), nullable=False),
    ])


def encode(windows: np.ndarray, input_ids: np.ndarray, schema: pa.Schema) -> pa.Table:
    """[n] window indices and [n, SEQ_LEN+1] ids → a table in the token schema."""
    return pa.table({"window": pa.array(windows.astype(np.int64)),
                     "input_ids": fixed_lists(input_ids.astype(np.int32), input_ids.shape[1])},
                    schema=schema.remove_metadata())


def validate_token_shard(path: str | Path) -> TokensMeta:
    schema, raw = read_file_meta(path)
    check_kind(path, raw, "tokens", (TOKENS_VERSION,))
    meta = from_json(TokensMeta, raw, path)
    check_schema(path, schema, token_schema(meta.seq_len))
    return meta
