"""Streaming reader over token or logit shards with an exact, resumable order.

An epoch is the manifest's shards in a seeded random order, read as one stream of rows and cut into blocks
of `shuffle_rows`; each block is permuted with a seed of (seed, epoch, block). So memory is one block plus
one row group, and a position in the stream, the cursor (epoch, offset), fully determines what comes next:
a resumed run sees exactly the rows an uninterrupted one would, with no shuffle buffer to save.

Global batches of world × batch_size rows are taken in order; rank r gets the r-th slice, so N processes
see together exactly what one process with N times the batch sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.runtime import Runtime
from schemas.logits import DERIVED, decode, stored_columns
from schemas.manifest import Manifest, read_manifest


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 16  # windows per process per micro-step
    shuffle_rows: int = 4096  # rows permuted together (the bounded shuffle buffer)
    seed: int = 0


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


class ShardStream:
    """Infinite stream of row batches from one split folder."""

    def __init__(self, folder: str | Path, columns: tuple[str, ...], cfg: ReaderConfig, runtime: Runtime = Runtime(),
                 cursor: Cursor = Cursor(), shuffle: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = open_split(self.folder)
        self.meta = self.manifest.meta
        names = self._schema_names()
        missing = set(columns) - set(names) - set(DERIVED)
        if missing:
            raise PipelineError(f"{self.folder}: shards have no column(s) {sorted(missing)}; "
                                f"{'kd needs a teacher logit cache' if 'topk_ids' in missing else 'recreate the cache'}")
        self.columns, self.cfg, self.rank, self.world = columns, cfg, runtime.rank, runtime.world
        self.stored = stored_columns(columns, names)
        self.cursor = cursor
        self.shuffle = shuffle
        self.rows = [s.rows for s in self.manifest.shards]
        self.total = sum(self.rows)
        self._block: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    def _schema_names(self) -> list[str]:
        return pq.read_schema(self.folder / self.manifest.shards[0].file).names

    # --- the order -------------------------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))

    def _block_perm(self, epoch: int, block: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.cfg.seed, epoch, block, 1]).permutation(size)

    def _load_block(self, epoch: int, block: int) -> dict[str, np.ndarray]:
        """Rows [block·S, (block+1)·S) of the epoch's stream, permuted, as numpy arrays."""
        if self._block is not None and self._block[0] == (epoch, block):
            return self._block[1]
        start = block * self.cfg.shuffle_rows
        stop = min(start + self.cfg.shuffle_rows, self.total)
        tables, pos = [], 0
        for shard in self._shard_order(epoch):
            n = self.rows[shard]
            lo, hi = max(start, pos), min(stop, pos + n)
            if lo < hi:
                tables.append(self._read_rows(int(shard), lo - pos, hi - pos))
            pos += n
            if pos >= stop:
                break
        arrays = decode(pa.concat_tables(tables), self.columns, getattr(self.meta, "samples", 0))
        perm = self._block_perm(epoch, block, stop - start)
        arrays = {name: a[perm] for name, a in arrays.items()}
        self._block = ((epoch, block), arrays)
        return arrays

    def _read_rows(self, shard: int, lo: int, hi: int) -> pa.Table:
        """Reads only the row groups that cover rows [lo, hi) of one shard."""
        path = self.folder / self.manifest.shards[shard].file
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
        return table.slice(lo - (first or 0), hi - lo)

    # --- batches -----------------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, np.ndarray]:
        """This rank's slice of the next global batch; advances the cursor past the whole global batch."""
        b = self.cfg.batch_size
        want = range(self.rank * b, (self.rank + 1) * b)
        parts: list[dict[str, np.ndarray]] = []
        epoch, offset = self.cursor.epoch, self.cursor.offset
        taken = 0
        need = self.world * b
        while taken < need:
            if offset >= self.total:
                epoch, offset = epoch + 1, 0
            block = offset // self.cfg.shuffle_rows
            arrays = self._load_block(epoch, block)
            within = offset - block * self.cfg.shuffle_rows
            n = min(need - taken, len(next(iter(arrays.values()))) - within)
            lo, hi = max(want.start - taken, 0), min(want.stop - taken, n)
            if lo < hi:
                parts.append({k: v[within + lo : within + hi] for k, v in arrays.items()})
            taken += n
            offset += n
        self.cursor = Cursor(epoch, offset)
        return {k: np.concatenate([p[k] for p in parts]) for k in self.columns} if len(parts) > 1 else parts[0]

