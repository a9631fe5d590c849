"""Parquet shard writing: temporary name, fixed-size row groups, zstd, rename on success.

Row groups hold a fixed number of rows (never "whatever one batch was"), so the bytes of a shard do not
depend on batch size, rank count or restarts. (Stage one runs its writers on a background thread:
pipeline/capture.py `Background`.) The writer hashes the bytes as it writes them (Parquet is written front
to back, never seeking), so the sha256 of a shard costs no second read: `ShardWriter.sha256`.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fsutil import tmp_name

ROW_GROUP_BYTES = 64 << 20  # 64 MB row groups stream well and bound the reader's memory
GROUP_TOKENS = 8192  # a row group of windows holds at most this many tokens (and at least one window)


def rows_per_group(row_bytes: int, seq_len: int | None = None) -> int:
    """Rows of a row group: 64 MB of them, and with `seq_len` at most `GROUP_TOKENS` tokens of windows (at
    least one window). The reader shuffles regions of 2 windows and decodes whole row groups: a 64 MB group
    of 128-token windows is ~1k windows decoded for 2 trained (the demo teacher ran 6x slower that way)."""
    rows = max(1, ROW_GROUP_BYTES // max(1, row_bytes))
    return rows if seq_len is None else min(rows, max(1, GROUP_TOKENS // seq_len))


def parquet_options(schema: pa.Schema, level: int = 3) -> dict[str, Any]:
    """zstd everywhere; byte-stream-split for float columns (their bytes compress better apart); no
    dictionaries (token ids are near-random) and no statistics (min/max of list leaves are useless)."""
    floats = [name for name in schema.names if _leaf(schema.field(name).type) in (pa.float16(), pa.float32())]
    return dict(
        compression="zstd", compression_level=level, use_dictionary=False, write_statistics=False,
        use_byte_stream_split=floats or False,
        write_page_checksum=True,  # readers verify pages, so a flipped byte fails loudly instead of training on it
    )


def _leaf(t: pa.DataType) -> pa.DataType:
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return t


class _HashingSink(io.RawIOBase):
    """A write-only file that passes every byte to `file` and to a sha256."""

    def __init__(self, file: io.BufferedWriter) -> None:
        super().__init__()
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:  # the Parquet writer closes its sink; the file is the ShardWriter's to close
        self.flush()
        super().close()


class ShardWriter:
    """Writes one shard; the final name appears only when every row is on disk. After a clean exit `sha256`
    and `bytes` describe the file as written."""

    def __init__(self, path: str | Path, schema: pa.Schema, rows_per_group: int, level: int = 3,
                 options: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.schema = schema
        self.group = rows_per_group
        self.tmp = tmp_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # `options`: a caller's own Parquet options (the logit cache's: schemas.logits.write_options).
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in _finish / __exit__)
        self.sink = _HashingSink(self.file)
        try:
            self.writer = pq.ParquetWriter(pa.PythonFile(self.sink, mode="w"), schema,
                                           **(options or parquet_options(schema, level)))
        except BaseException:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self.sha256: str | None = None
        self.bytes: int | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.footer: dict[bytes, bytes] = {}  # extra key-value metadata, written when the shard closes

    def __enter__(self) -> ShardWriter:
        return self

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.pending.append(table.cast(self.schema) if table.schema != self.schema else table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.group:
            merged = pa.concat_tables(self.pending)
            full = (merged.num_rows // self.group) * self.group
            self.writer.write_table(merged.slice(0, full), row_group_size=self.group)
            rest = merged.slice(full)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _finish(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.group)
        if self.footer:
            self.writer.add_key_value_metadata(self.footer)
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.sha256, self.bytes = self.sink.digest.hexdigest(), self.sink.size
        os.replace(self.tmp, self.path)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._finish()
            return
        try:
            self.writer.close()
        finally:
            self.file.close()
            self.tmp.unlink(missing_ok=True)

