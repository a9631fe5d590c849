"""Streaming reader over token or logit shards: bounded memory, exact resumable order, background prefetch.

The order. Every shard is cut into regions of at most `region_windows` consecutive windows (2 by default)
that never cross a row group. An epoch is a seeded pseudo-random permutation of all regions of all shards
(a keyed Feistel bijection evaluated on demand: no per-region state, whatever the corpus size); consecutive
regions of it form a shuffle buffer of about `shuffle_tokens` tokens, whose rows are permuted with a seed of
(seed, epoch, buffer). So `shuffle_tokens` buys regions — 2^21 tokens are 256 regions from anywhere in the
cache at SEQ_LEN 4096 — and a global batch draws its windows from about as many places as it has windows,
whatever SEQ_LEN. A position in the stream, the cursor (epoch, offset), fully determines what comes next: a
resumed run sees exactly the rows an uninterrupted one would, with no shuffle state to save.

The split. Global batches of world × batch_size rows are taken in order; rank r gets the r-th slice, so N
processes see together exactly what one process with N times the batch sees. A rank reads only the row
groups that hold its own rows (Arrow, columnar; page checksums verified), keeps the row groups it read in a
cache of at most `shuffle_tokens` tokens (a region's other rows usually come in a later batch of the same
buffer), and decodes only its rows. Memory: that cache and the prefetched batches, whatever SEQ_LEN. Reading
costs a rank about the row groups its rows touch: with stage one's row groups of ≤ 8192 tokens (2 windows at
SEQ_LEN 4096) a rank of 8 reads ≈ a quarter of the cache an epoch; a cache written with larger row groups is
read in the same order, each rank then decompressing a whole group for the rows it needs.

The prefetch. A background thread builds the next `prefetch` batches into a bounded queue while the caller
trains (pyarrow releases the GIL while it reads and decompresses). `cursor` is the position after the last
batch handed out, never after one only prefetched, so it is what a checkpoint saves.

Selection (`select`, pipeline/select.py). Dropped windows are skipped where the order reaches them: when a
buffer is entered, every rank reads its rows' stored signals (a few bytes a position) and computes which are
kept, and a global batch takes the next `world × batch_size` kept rows; the cursor still counts rows of the
order, kept or not, so it stays exact. Dropped positions have their `label_mask` cleared as a batch is
decoded.

The mix (`Mix`: on-policy rounds, GKD's λ). Beside the fixed cache, a second order over the shards of one or
more rollout caches (one permutation over all of their regions, same seed): each micro-batch's global batch
of world × batch_size rows is its `counts[m]` next rows from the rollout order first, then the rest from the
fixed order (m: the micro-batch's place in its optimizer step), so every step holds exactly Σ counts rollout
windows, whatever the number of processes or the split into micro-batches, and N processes still see what one
process with N times the batch sees. Each order keeps its own position; the cursor holds both and the micro-
batch index, so a resumed run sees the same rows. Rows come marked (`ONPOLICY`, [rows] bool); a column one
source does not read (the fixed cache's top K under reverse-kl, the rollouts' behaviour log-probs) is zeros in
the other's rows. With every row from the rollouts (λ = 1) there is no fixed cache at all.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
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
FOOTERS = 64  # parsed Parquet footers kept per reader (a footer is read once per shard while it is in use)


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 16  # windows per process per micro-step
    shuffle_tokens: int = 1 << 21  # tokens permuted together (the shuffle buffer), and the row-group cache's size
    seed: int = 0
    prefetch: int = 8  # batches decoded ahead by the background thread (0: read in the caller's thread)
    region_windows: int = 2  # the shuffle unit: consecutive windows that stay together in the order


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    offset: int = 0  # rows of this epoch consumed by all ranks together
    # With a mix (`Mix`): the rollout order's own position, and the next micro-batch's index in its step
    # (0 at every step boundary, where checkpoints are taken). Absent from older checkpoints: 0.
    onpolicy_epoch: int = 0
    onpolicy_offset: int = 0
    micro: int = 0


ONPOLICY = "onpolicy"  # a mixed batch's extra array: [rows] bool, true for rows from the rollout caches


@dataclass(frozen=True)
class Mix:
    """Rollout caches drawn beside the fixed cache (see the module docstring): their train split folders,
    the columns their rows read, and the global rollout rows of each micro-batch of an optimizer step."""

    folders: tuple[Path, ...]
    columns: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.folders or not self.counts or min(self.counts) < 0:
            raise PipelineError("reader: a mix needs rollout folders and a non-negative count per micro-batch")


def open_split(folder: str | Path) -> Manifest:
    """The manifest of a logits or tokens split folder, whichever it is."""
    manifest = read_manifest(folder, ("logits", "tokens"))
    if not manifest.shards:
        raise PipelineError(f"{folder}: the manifest lists no shards")
    return manifest


# --- a permutation of [0, n) evaluated on demand -------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded pseudo-random bijection of [0, n): a 6-round Feistel network on the smallest even number of
    bits that holds n, cycle-walked back into range (each value needs under 4 rounds of it on average).
    `of(i)` is the value at positions `i`; nothing of size n is ever built."""

    ROUNDS = 6

    def __init__(self, n: int, key: list[int]) -> None:
        self.n = n
        bits = max(2, int(n - 1).bit_length() if n > 1 else 2)
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng(key).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _round_trip(self, v: np.ndarray) -> np.ndarray:
        left, right = v >> self.half, v & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def of(self, positions: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            v = self._round_trip(np.asarray(positions, dtype=np.uint64))
            out = v >= self.n
            while out.any():
                v[out] = self._round_trip(v[out])
                out = v >= self.n
        return v.astype(np.int64)


class _Identity:
    def of(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions, dtype=np.int64)


# --- the order and the reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Buffer:
    """One shuffle buffer: its regions (shard, first row, end row), where each begins in the buffer, and
    the permutation of its rows."""

    key: tuple[int, int]  # (epoch, buffer)
    shard: np.ndarray
    lo: np.ndarray
    starts: np.ndarray  # first buffer row of each region, and the total at the end
    perm: np.ndarray
    kept: np.ndarray | None = None  # with a window selection: the indices into `perm` of the kept rows, ascending

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in the shard) of buffer rows."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        return self.shard[which], self.lo[which] + rows - self.starts[which]


class _Order:
    """Which rows come at a cursor, and reading them: everything the producer thread needs (it holds no
    reference to the stream, so an abandoned stream is collected and its thread stops)."""

    def __init__(self, folder: Path, manifest: Manifest, columns: tuple[str, ...], stored: list[str],
                 cfg: ReaderConfig, runtime: Runtime, shuffle: bool, select: Thresholds | None = None,
                 more: tuple[tuple[Path, Manifest], ...] = ()) -> None:
        """`more`: further split folders (the same encoding) whose shards join this order after the first's."""
        self.folder, self.columns, self.stored, self.cfg, self.shuffle = folder, columns, stored, cfg, shuffle
        self.meta, self.select = manifest.meta, select
        # What decoding reads: the columns asked for, plus the selection's signal and label mask.
        self.decoded = columns + tuple(c for c in (select_columns(select)) if c not in columns)
        parts = ((folder, manifest), *more)
        self.files = [f / s.file for f, m in parts for s in m.shards]
        self.rows = np.array([s.rows for _, m in parts for s in m.shards], dtype=np.int64)
        self.total = int(self.rows.sum())
        self._footers: OrderedDict[int, tuple[pq.FileMetaData, np.ndarray]] = OrderedDict()
        self.group = self._group_rows()
        # Regions: per row group ceil(group / unit) of them; a shard's last group may be shorter.
        self.unit = max(1, min(cfg.region_windows, self.group))
        self.per_group = -(-self.group // self.unit)
        full, rest = self.rows // self.group, self.rows % self.group
        self.region_ends = np.cumsum(full * self.per_group + -(-rest // self.unit))  # O(shards)
        self.regions = int(self.region_ends[-1])
        self.per_buffer = max(1, cfg.shuffle_tokens // (self.unit * manifest.meta.seq_len))
        self.first, self.last = runtime.rank * cfg.batch_size, (runtime.rank + 1) * cfg.batch_size
        self.need = runtime.world * cfg.batch_size
        self._epoch: tuple[int, Permutation | _Identity, np.ndarray] | None = None  # (epoch, order, buffer end rows)
        self._buffer: _Buffer | None = None
        # Row groups read, by (shard, group): at most `shuffle_tokens` tokens of them (and at least one group).
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cached_rows = 0
        self._budget = max(cfg.shuffle_tokens // manifest.meta.seq_len, self.group)
        self.groups_read = 0  # row groups read from disk (the benchmark reports them)
        self._empty: Batch | None = None  # `empty()`, built once

    def _group_rows(self) -> int:
        meta = self._footer(0)[0]
        return max(1, meta.row_group(0).num_rows) if meta.num_row_groups else 1

    def _read_footer(self, shard: int) -> pq.FileMetaData:
        path = self.files[shard]
        try:
            return pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None

    def _footer(self, shard: int) -> tuple[pq.FileMetaData, np.ndarray]:
        """A shard's parsed footer and the first row of each of its row groups (and the total), kept for the
        last FOOTERS shards used."""
        if shard in self._footers:
            self._footers.move_to_end(shard)
            return self._footers[shard]
        meta = self._read_footer(shard)
        firsts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        if firsts[-1] < self.rows[shard]:
            raise PipelineError(f"{self.files[shard]}: {firsts[-1]} rows, its manifest says {self.rows[shard]}; the "
                                "shard is corrupted, delete it and rerun its stage")
        self._footers[shard] = (meta, firsts)
        if len(self._footers) > FOOTERS:
            self._footers.popitem(last=False)
        return meta, firsts

    # --- the order -------------------------------------------------------------------------------------

    def _regions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, first row, end row) of regions by index: arithmetic on the per-shard region counts."""
        shard = np.searchsorted(self.region_ends, ids, side="right")
        j = ids - np.concatenate([[0], self.region_ends])[shard]
        lo = (j // self.per_group) * self.group + (j % self.per_group) * self.unit
        group_end = (j // self.per_group + 1) * self.group
        hi = np.minimum(np.minimum(lo + self.unit, group_end), self.rows[shard])
        return shard, lo, hi

    def _layout(self, epoch: int) -> tuple[Permutation | _Identity, np.ndarray]:
        """The epoch's region order and the row at which each of its buffers ends (computed in blocks:
        memory O(buffers), not O(regions))."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = Permutation(self.regions, [self.cfg.seed, epoch]) if self.shuffle else _Identity()
            ends, done, block = [], 0, self.per_buffer * max(1, (1 << 20) // self.per_buffer)
            for at in range(0, self.regions, block):
                ids = order.of(np.arange(at, min(at + block, self.regions)))
                _, lo, hi = self._regions(ids)
                sizes = np.add.reduceat(hi - lo, np.arange(0, len(ids), self.per_buffer))
                ends.append(done + np.cumsum(sizes))
                done = int(ends[-1][-1])
            self._epoch = (epoch, order, np.concatenate(ends))
        return self._epoch[1], self._epoch[2]

    def _buffer_at(self, epoch: int, offset: int) -> tuple[_Buffer, int, int]:
        """The buffer holding row `offset` of the epoch, and its first and end rows in the epoch."""
        order, ends = self._layout(epoch)
        index = int(np.searchsorted(ends, offset, side="right"))
        start, end = (int(ends[index - 1]) if index else 0), int(ends[index])
        if self._buffer is None or self._buffer.key != (epoch, index):
            ids = order.of(np.arange(index * self.per_buffer, min((index + 1) * self.per_buffer, self.regions)))
            shard, lo, hi = self._regions(ids)
            size = end - start
            perm = (np.random.default_rng([self.cfg.seed, epoch, index, 1]).permutation(size) if self.shuffle
                    else np.arange(size))
            buffer = _Buffer((epoch, index), shard, lo, np.concatenate([[0], np.cumsum(hi - lo)]), perm)
            self._buffer = _Buffer(buffer.key, shard, lo, buffer.starts, perm, self._kept_windows(buffer))
        return self._buffer, start, end

    def _kept_windows(self, buffer: _Buffer) -> np.ndarray | None:
        """With a window selection: which positions of `perm` hold kept rows (from the buffer's own rows'
        signals, read for every row of the buffer: a few bytes a position)."""
        if self.select is None or self.select.selection.unit != "windows":
            return None
        column = self.select.selection.column
        shard, row = buffer.rows(np.arange(buffer.starts[-1]))
        arrays = decode(self._take(shard, row, stored_columns(("label_mask", column), self.stored), cache=False),
                        ("label_mask", column), self.meta)
        keep = self.select.keep_windows(arrays[column], arrays["label_mask"])
        return np.flatnonzero(keep[buffer.perm])

    # --- reading -----------------------------------------------------------------------------------------

    def _take(self, shard: np.ndarray, row: np.ndarray, columns: list[str], cache: bool = True) -> pa.Table:
        """Rows (shard, row in the shard), in that order, reading each row group they touch once."""
        group = np.empty_like(row)
        first = np.empty_like(row)
        for s in np.unique(shard):  # per shard, vectorised over its rows
            mine = shard == s
            firsts = self._footer(int(s))[1]
            group[mine] = np.searchsorted(firsts, row[mine], side="right") - 1
            first[mine] = firsts[group[mine]]
        keys, inverse = np.unique(shard * (1 << 32) + group, return_inverse=True)
        by_group = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[by_group], np.arange(len(keys) + 1))
        parts = []
        for i, key in enumerate(keys):
            picked = by_group[bounds[i]:bounds[i + 1]]
            s, g = int(key >> 32), int(key & 0xFFFFFFFF)
            table = self._group(s, g, columns) if cache else self._read_groups(s, [g], columns)
            parts.append(table.take(pa.array(row[picked] - first[picked])))
        small = pa.concat_tables(parts).combine_chunks()  # these rows only
        return small.take(pa.array(np.argsort(by_group)))

    def _group(self, shard: int, group: int, columns: list[str]) -> pa.Table:
        """One row group's columns, from the cache or read (and cached, the least recently used dropped)."""
        key = (shard, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        table = self._read_groups(shard, [group], columns)
        self._groups[key] = table
        self._cached_rows += table.num_rows
        while self._cached_rows > self._budget and len(self._groups) > 1:
            self._cached_rows -= self._groups.popitem(last=False)[1].num_rows
        return table

    def _read_groups(self, shard: int, groups: list[int], columns: list[str]) -> pa.Table:
        path = self.files[shard]
        meta, _ = self._footer(shard)
        try:
            f = pq.ParquetFile(path, metadata=meta, page_checksum_verification=True)
            table = f.read_row_groups(groups, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None
        self.groups_read += len(groups)
        return table

    def _decode(self, table: pa.Table) -> Batch:
        out = decode(table, self.decoded, self.meta)
        if self.select is not None and self.select.selection.unit == "positions":
            out["label_mask"] = self.select.keep_positions(out[self.select.selection.column], out["label_mask"])
        # Arrow-backed arrays are read-only; the caller (torch) gets its own writable copy.
        return {k: np.require(out[k], requirements="W") for k in self.columns}

    # --- batches -----------------------------------------------------------------------------------------

    def batch_at(self, cursor: Cursor) -> tuple[Batch, Cursor]:
        """This rank's rows of the global batch at `cursor`, decoded, and the cursor after the whole batch."""
        batch, epoch, offset = self.rows_at(cursor.epoch, cursor.offset, self.need, self.first, self.last)
        return batch, Cursor(epoch, offset)

    def empty(self) -> Batch:
        """The decoded columns with no rows (their trailing shapes and dtypes): built from the first shard's
        schema once, and a new dict each call, as the caller may change the batch it gets."""
        if self._empty is None:
            self._empty = self._decode(pq.read_schema(self.files[0]).empty_table().select(self.stored))
        return dict(self._empty)

    def rows_at(self, epoch: int, offset: int, need: int, first: int, last: int) -> tuple[Batch, int, int]:
        """Rows [first, last) of the next `need` rows of the order from (epoch, offset), decoded (kept rows
        only, under a selection), and the position after all `need`."""
        taken, empty = 0, 0
        parts: list[Batch] = []
        while taken < need:
            if offset >= self.total:
                epoch, offset = epoch + 1, 0
            buffer, start, end = self._buffer_at(epoch, offset)
            picked, offset = self._pick(buffer, offset - start, end - start, need - taken)
            offset += start
            n = len(picked)
            empty = empty + 1 if n == 0 else 0
            if empty > len(self._layout(epoch)[1]):  # a whole epoch of buffers without a kept row
                raise PipelineError(f"{self.folder}: --select {self.select.selection.spec!r} keeps no window of this "
                                    "split; widen the range")
            lo, hi = max(first - taken, 0), min(last - taken, n)
            if lo < hi:  # this rank's rows in this stretch: read their row groups, decode only those rows
                shard, row = buffer.rows(buffer.perm[picked[lo:hi]])
                parts.append(self._decode(self._take(shard, row, self.stored)))
            taken += n
        if not parts:
            return self.empty(), epoch, offset
        if len(parts) == 1:
            return parts[0], epoch, offset
        return {k: np.concatenate([p[k] for p in parts]) for k in self.columns}, epoch, offset

    def regions_of(self, cursor: Cursor, rows: int) -> tuple[np.ndarray, np.ndarray, Cursor]:
        """(shard, row) of the next `rows` rows of the order from `cursor` (all ranks' rows, selection aside),
        without reading them: what the benchmark counts regions and row groups of."""
        epoch, offset, shards, lows = cursor.epoch, cursor.offset, [], []
        while rows > 0:
            if offset >= self.total:
                epoch, offset = epoch + 1, 0
            buffer, start, end = self._buffer_at(epoch, offset)
            n = min(rows, end - offset)
            shard, row = buffer.rows(buffer.perm[np.arange(offset - start, offset - start + n)])
            shards.append(shard)
            lows.append(row)
            offset, rows = offset + n, rows - n
        return np.concatenate(shards), np.concatenate(lows), Cursor(epoch, offset)

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


class _Mix:
    """A mix's batches: this rank's rows of each micro-batch's global batch, the rollout order's `counts[m]`
    rows first, then the fixed order's (None: every row from the rollouts)."""

    def __init__(self, fixed: _Order | None, onpolicy: _Order, counts: tuple[int, ...], runtime: Runtime,
                 batch_size: int) -> None:
        self.fixed, self.onpolicy, self.counts = fixed, onpolicy, counts
        self.need = runtime.world * batch_size
        self.first, self.last = runtime.rank * batch_size, (runtime.rank + 1) * batch_size
        if max(counts) > self.need or (fixed is None and min(counts) < self.need):
            raise PipelineError(f"reader: {max(counts)} rollout rows in a micro-batch of {self.need}"
                                + ("" if fixed is not None else ", and no fixed cache for the rest"))
        self.columns = onpolicy.columns + tuple(c for c in (fixed.columns if fixed else ()) if c not in onpolicy.columns)

    def batch_at(self, cursor: Cursor) -> tuple[Batch, Cursor]:
        micro = cursor.micro % len(self.counts)
        count = self.counts[micro]
        on, on_epoch, on_offset = self.onpolicy.rows_at(cursor.onpolicy_epoch, cursor.onpolicy_offset, count,
                                                        min(self.first, count), min(self.last, count))
        parts = [on]
        epoch, offset = cursor.epoch, cursor.offset
        if self.fixed is not None and count < self.need:
            off, epoch, offset = self.fixed.rows_at(epoch, offset, self.need - count, max(self.first - count, 0),
                                                    max(self.last - count, 0))
            parts.append(off)
        elif self.fixed is not None:
            parts.append(self.fixed.empty())
        if len(parts) == 1:
            batch = {k: on[k] for k in self.onpolicy.columns}
        else:
            shapes = {**self.fixed.empty(), **self.onpolicy.empty()}  # type: ignore[union-attr]
            batch = {}
            for k in self.columns:
                cols = [p[k] if k in p else np.zeros((_rows(p), *shapes[k].shape[1:]), dtype=shapes[k].dtype)
                        for p in parts]
                batch[k] = np.concatenate(cols)
        batch[ONPOLICY] = np.concatenate([np.ones(_rows(on), dtype=bool),
                                          np.zeros(sum(_rows(p) for p in parts[1:]), dtype=bool)])
        return batch, Cursor(epoch, offset, on_epoch, on_offset, (micro + 1) % len(self.counts))


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _produce(order: _Order | _Mix, cursor: Cursor, out: queue.Queue[Any], stop: threading.Event) -> None:
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

    def __init__(self, folder: str | Path | None, columns: tuple[str, ...], cfg: ReaderConfig,
                 runtime: Runtime = Runtime(), cursor: Cursor = Cursor(), shuffle: bool = True,
                 select: Thresholds | None = None, mix: Mix | None = None) -> None:
        """`mix`: rollout caches drawn beside `folder` (see the module docstring); `folder` None: every row
        from them (the mix's counts must fill every micro-batch)."""
        self._stop = threading.Event()  # first: __del__ needs it even when the checks below raise
        self._thread: threading.Thread | None = None
        only_mix = folder is None
        if folder is None:
            if mix is None:
                raise PipelineError("reader: no split folder to read")
            folder, columns, select = mix.folders[0], mix.columns, None
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
        self._source: _Order | _Mix = self._order
        if mix is not None:
            onpolicy = self._mix_order(mix, cfg, runtime, shuffle)
            fixed = None if only_mix else self._order
            self._source = _Mix(fixed, onpolicy, mix.counts, runtime, cfg.batch_size)
        self._queue: queue.Queue[Any] | None = None
        self._error: Exception | None = None

    @staticmethod
    def _mix_order(mix: Mix, cfg: ReaderConfig, runtime: Runtime, shuffle: bool) -> _Order:
        """One order over every shard of the mix's rollout folders."""
        parts = [(Path(f), open_split(f)) for f in mix.folders]
        names = ShardStream._names(parts[0][0] / parts[0][1].shards[0].file)
        missing = missing_columns(mix.columns, names, parts[0][1].meta)
        if missing:
            raise PipelineError(f"{parts[0][0]}: shards have no column(s) {sorted(missing)}; recreate the cache")
        return _Order(parts[0][0], parts[0][1], mix.columns, stored_columns(mix.columns, names), cfg, runtime,
                      shuffle, more=tuple(parts[1:]))

    @staticmethod
    def _names(path: Path) -> list[str]:
        try:
            return pq.read_schema(path).names
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: cannot read ({e}); the shard is corrupted, delete it and rerun its stage") from None

    def _schema_names(self) -> list[str]:
        return self._names(self.folder / self.manifest.shards[0].file)

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the cursor past the whole global batch."""
        if self._error is not None:
            raise self._error
        if self.cfg.prefetch == 0:
            batch, self.cursor = self._source.batch_at(self.cursor)
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.cfg.prefetch)
            self._thread = threading.Thread(target=_produce, args=(self._source, self.cursor, self._queue, self._stop),
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
