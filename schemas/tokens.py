"""Token shards (`tokens/{train,val}/*.parquet`), version 1.

One row per window of SEQ_LEN+1 token ids; consecutive windows overlap by one token so position t of a
window predicts token t+1 of the same row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import PipelineError
from schemas.common import check_schema, read_file_meta, require

TOKENS_VERSION = 1
TOKEN_META_KEYS = ("kind", "schema_version", "seq_len", "vocab_size", "tokenizer_fingerprint", "corpus", "split")


def token_schema(seq_len: int) -> pa.Schema:
    return pa.schema([
        pa.field("window", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len + 1), nullable=False),
    ])


def validate_token_shard(path: str | Path) -> dict[str, Any]:
    schema, meta = read_file_meta(path)
    require(meta, TOKEN_META_KEYS, path)
    if meta["kind"] != "tokens" or meta["schema_version"] != TOKENS_VERSION:
        raise PipelineError(f"{path}: a {meta['kind']} shard v{meta['schema_version']}, expected tokens v{TOKENS_VERSION}")
    check_schema(path, schema, token_schema(meta["seq_len"]))
    return meta
