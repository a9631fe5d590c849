"""Streaming reader over token or logit shards: bounded memory, exact resumable order, background prefetch.

The order. Every shard is cut into chunks the size of its row groups (the first row group's row count; the
writer uses fixed-size groups). An epoch is a seeded permutation of all chunks of all shards; consecutive
chunks of that permutation form a shuffle buffer of about `shuffle_tokens` tokens, whose rows are permuted
with a seed of (seed, epoch, buffer). So a buffer mixes row groups from anywhere in the cache, memory is one
buffer (plus the prefetched batches) whatever SEQ_LEN is, and a position in the stream, the cursor
(epoch, offset), fully determines what comes next: a resumed run sees exactly the rows an uninterrupted one
would, with no shuffle state to save.

The split. Global batches of world × batch_size rows are taken in order; rank r gets the r-th slice. Every
rank reads the buffer's row groups (Arrow, still columnar) but takes and decodes only its own rows, so N
processes see together exactly what one process with N times the batch sees.

The prefetch. A background thread builds the next `prefetch` batches into a bounded queue while the caller
trains (pyarrow releases the GIL while it reads and decompresses). `cursor` is the position after the last
batch handed out, never after one only prefetched, so it is what a checkpoint saves.

Selection (`select`, pipeline/select.py). Dropped windows are skipped where the order reaches them: when a
buffer is read, every rank computes which of its rows are kept (from the rows' own stored signals), and a
global batch takes the next `world × batch_size` kept rows; the cursor still counts rows of the order, kept
or not, so it stays exact. Dropped positions have their `label_mask` cleared as a batch is decoded.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.runtime import Runtime
from pipeline.select import Thresholds
from schemas.logits import decode, missing_columns, stored_columns
from schemas.manifest import Manifest, read_manifest

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 16  # windows per process per micro-step
    shuffle_tokens: int = 1 << 21  # tokens permuted together (the shuffle buffer); memory follows it, not SEQ_LEN
    seed: int = 0
    prefetch: int = 8  # batches decoded ahead by the background thread (0: read in the caller's thread)


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    offset: int = 0  # rows of this epoch consumed by all ranks together


def open_split(folder: str | Path) -> Manifest:
    """The manifest of a logits or tokens split folder, whichever it is."""
    manifest = read_manifest(folder, ("logits", "tokens"))
    if not manifest.shards:
        raise PipelineError(f"{folder}: the manifest lists no shards")
    return manifest


@dataclass(frozen=True)
class _Buffer:
    """One shuffle buffer: its chunks' rows (Arrow, as read) and their permutation."""

    key: tuple[int, int]  # (epoch, buffer)
    tables: list[pa.Table]  # one per chunk
    starts: np.ndarray  # first row of each table, and the total at the end
    perm: np.ndarray
    kept: np.ndarray | None = None  # with a window selection: the indices into `perm` of the kept rows, ascending

    def take(self, rows: np.ndarray) -> pa.Table:
        """Rows by buffer index, in that order. Taken table by table: a take across the chunks of one
        concatenated table would first copy the whole buffer into one."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        parts, order = [], []
        for t in np.unique(which):
            picked = np.flatnonzero(which == t)
            parts.append(self.tables[t].take(pa.array(rows[picked] - self.starts[t])))
            order.append(picked)
        small = pa.concat_tables(parts).combine_chunks()  # this rank's few rows only
        return small.take(pa.array(np.argsort(np.concatenate(order))))


class _Order:
    """Which rows come at a cursor, and reading them: everything the producer thread needs (it holds no
    reference to the stream, so an abandoned stream is collected and its thread stops)."""

    def __init__(self, folder: Path, manifest: Manifest, columns: tuple[str, ...], stored: list[str],
                 cfg: ReaderConfig, runtime: Runtime, shuffle: bool, select: Thresholds | None = None) -> None:
        self.folder, self.columns, self.stored, self.cfg, self.shuffle = folder, columns, stored, cfg, shuffle
        self.meta, self.select = manifest.meta, select
        # What decoding reads: the columns asked for, plus the selection's signal and label mask.
        self.decoded = columns + tuple(c for c in (select_columns(select)) if c not in columns)
        self.files = [folder / s.file for s in manifest.shards]
        rows = np.array([s.rows for s in manifest.shards], dtype=np.int64)
        self.total = int(rows.sum())
        group = self._group_rows()
        starts = [np.arange(0, n, group, dtype=np.int64) for n in rows]
        self.chunk_shard = np.repeat(np.arange(len(rows)), [len(s) for s in starts])
        self.chunk_start = np.concatenate(starts)
        self.chunk_stop = np.minimum(self.chunk_start + group, rows[self.chunk_shard])
        self.per_buffer = max(1, cfg.shuffle_tokens // (group * manifest.meta.seq_len))
        self.first, self.last = runtime.rank * cfg.batch_size, (runtime.rank + 1) * cfg.batch_size
        self.need = runtime.world * cfg.batch_size
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, chunk order, buffer end rows)
        self._buffer: _Buffer | None = None

    def _group_rows(self) -> int:
        path = self.files[0]
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None
        return max(1, meta.row_group(0).num_rows) if meta.num_row_groups else 1

    # --- the order -------------------------------------------------------------------------------------

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's chunk order and the row at which each of its buffers ends."""
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.chunk_start)
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            ends = np.cumsum(self.chunk_stop[order] - self.chunk_start[order])
            buffer_ends = ends[self.per_buffer - 1 :: self.per_buffer]
            if len(buffer_ends) == 0 or buffer_ends[-1] != ends[-1]:
                buffer_ends = np.append(buffer_ends, ends[-1])
            self._epoch = (epoch, order, buffer_ends)
        return self._epoch[1], self._epoch[2]

    def _buffer_at(self, epoch: int, offset: int) -> tuple[_Buffer, int, int]:
        """The buffer holding row `offset` of the epoch, and its first and end rows in the epoch."""
        order, ends = self._layout(epoch)
        index = int(np.searchsorted(ends, offset, side="right"))
        start, end = (int(ends[index - 1]) if index else 0), int(ends[index])
        if self._buffer is None or self._buffer.key != (epoch, index):
            self._buffer = None  # release the previous buffer before reading the next: one in memory at a time
            chunks = order[index * self.per_buffer : (index + 1) * self.per_buffer]
            tables = [self._read_rows(int(self.chunk_shard[c]), int(self.chunk_start[c]), int(self.chunk_stop[c]))
                      for c in chunks]
            size = end - start
            perm = (np.random.default_rng([self.cfg.seed, epoch, index, 1]).permutation(size) if self.shuffle
                    else np.arange(size))
            kept = self._kept_windows(tables, perm)
            self._buffer = _Buffer((epoch, index), tables, np.cumsum([0] + [t.num_rows for t in tables]), perm, kept)
        return self._buffer, start, end

    def _kept_windows(self, tables: list[pa.Table], perm: np.ndarray) -> np.ndarray | None:
        """With a window selection: which positions of `perm` hold kept rows (from the buffer's own rows)."""
        if self.select is None or self.select.selection.unit != "windows":
            return None
        column = self.select.selection.column
        arrays = [decode(t, ("label_mask", column), self.meta) for t in tables]
        keep = self.select.keep_windows(np.concatenate([a[column] for a in arrays]),
                                        np.concatenate([a["label_mask"] for a in arrays]))
        return np.flatnonzero(keep[perm])

    def _decode(self, table: pa.Table) -> Batch:
        out = decode(table, self.decoded, self.meta)
        if self.select is not None and self.select.selection.unit == "positions":
            out["label_mask"] = self.select.keep_positions(out[self.select.selection.column], out["label_mask"])
        # Arrow-backed arrays are read-only; the caller (torch) gets its own writable copy.
        return {k: np.require(out[k], requirements="W") for k in self.columns}

    def _read_rows(self, shard: int, lo: int, hi: int) -> pa.Table:
        """Reads only the row groups that cover rows [lo, hi) of one shard."""
        path = self.files[shard]
        try:
            f = pq.ParquetFile(path, page_checksum_verification=True)
            groups, first, at = [], None, 0
            for g in range(f.num_row_groups):
                n = f.metadata.row_group(g).num_rows
                if at < hi and at + n > lo:
                    groups.append(g)
                    first = at if first is None else first
                at += n
            table = f.read_row_groups(groups, columns=self.stored)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None
        if at < hi:
            raise PipelineError(f"{path}: {at} rows, its manifest says more; the shard is corrupted, delete it and "
                                "rerun its stage")
        return table.slice(lo - (first or 0), hi - lo)

    # --- batches -----------------------------------------------------------------------------------------

    def batch_at(self, cursor: Cursor) -> tuple[Batch, Cursor]:
        """This rank's rows of the global batch at `cursor`, decoded, and the cursor after the whole batch."""
        epoch, offset, taken, empty = cursor.epoch, cursor.offset, 0, 0
        parts: list[Batch] = []
        while taken < self.need:
            if offset >= self.total:
                epoch, offset = epoch + 1, 0
            buffer, start, end = self._buffer_at(epoch, offset)
            picked, offset = self._pick(buffer, offset - start, end - start, self.need - taken)
            offset += start
            n = len(picked)
            empty = empty + 1 if n == 0 else 0
            if empty > len(self._layout(epoch)[1]):  # a whole epoch of buffers without a kept row
                raise PipelineError(f"{self.folder}: --select {self.select.selection.spec!r} keeps no window of this "
                                    "split; widen the range")
            lo, hi = max(self.first - taken, 0), min(self.last - taken, n)
            if lo < hi:  # this rank's rows in this stretch: take them from the buffer, decode only those
                parts.append(self._decode(buffer.take(buffer.perm[picked[lo:hi]])))
            taken += n
        if len(parts) == 1:
            return parts[0], Cursor(epoch, offset)
        return {k: np.concatenate([p[k] for p in parts]) for k in self.columns}, Cursor(epoch, offset)

    @staticmethod
    def _pick(buffer: _Buffer, at: int, size: int, want: int) -> tuple[np.ndarray, int]:
        """Up to `want` rows of the buffer from its position `at` (indices into its permutation), and the
        position after the last one taken (the buffer's end if it ran out): every row, or the kept ones."""
        if buffer.kept is None:
            n = min(want, size - at)
            return np.arange(at, at + n), at + n
        kept = buffer.kept[np.searchsorted(buffer.kept, at):][:want]
        return kept, (int(kept[-1]) + 1 if len(kept) == want else size)


def select_columns(select: Thresholds | None) -> tuple[str, ...]:
    """What a selection reads besides the batch's own columns."""
    return () if select is None else ("label_mask", select.selection.column)


def _produce(order: _Order, cursor: Cursor, out: queue.Queue[Any], stop: threading.Event) -> None:
    """The prefetch thread: batches (or the error that stopped it) into the bounded queue until stopped."""
    try:
        while not stop.is_set():
            item = order.batch_at(cursor)
            cursor = item[1]
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except Exception as e:  # any failure belongs to the consumer: it re-raises it at its next batch
        out.put(e)


class ShardStream:
    """Infinite stream of row batches from one split folder."""

    def __init__(self, folder: str | Path, columns: tuple[str, ...], cfg: ReaderConfig, runtime: Runtime = Runtime(),
                 cursor: Cursor = Cursor(), shuffle: bool = True, select: Thresholds | None = None) -> None:
        self._stop = threading.Event()  # first: __del__ needs it even when the checks below raise
        self._thread: threading.Thread | None = None
        self.folder = Path(folder)
        self.manifest = open_split(self.folder)
        self.meta = self.manifest.meta
        names = self._schema_names()
        missing = missing_columns(columns + select_columns(select), names, self.meta)
        if missing:
            raise PipelineError(f"{self.folder}: shards have no column(s) {sorted(missing)}; "
                                f"{'kd needs a teacher logit cache' if 'topk_ids' in missing else 'recreate the cache'}")
        if cfg.batch_size < 1 or cfg.shuffle_tokens < 1 or cfg.prefetch < 0:
            raise PipelineError(f"reader: batch size {cfg.batch_size} and shuffle tokens {cfg.shuffle_tokens} must be "
                                f"positive, prefetch {cfg.prefetch} not negative")
        self.columns, self.cfg, self.rank, self.world = columns, cfg, runtime.rank, runtime.world
        self.cursor = cursor
        read = columns + select_columns(select)
        self._order = _Order(self.folder, self.manifest, columns, stored_columns(read, names), cfg, runtime, shuffle,
                             select)
        self.total = self._order.total
        self._queue: queue.Queue[Any] | None = None
        self._error: Exception | None = None

    def _schema_names(self) -> list[str]:
        path = self.folder / self.manifest.shards[0].file
        try:
            return pq.read_schema(path).names
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the cursor past the whole global batch."""
        if self._error is not None:
            raise self._error
        if self.cfg.prefetch == 0:
            batch, self.cursor = self._order.batch_at(self.cursor)
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.cfg.prefetch)
            self._thread = threading.Thread(target=_produce, args=(self._order, self.cursor, self._queue, self._stop),
                                             name=f"reader:{self.folder.name}", daemon=True)
            self._thread.start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, Exception):
            self._error = item
            raise item
        batch, self.cursor = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (it ends within a tenth of a second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
