"""The reader consumed the way the trainer consumes it (issue 22 item 5): each rank takes `grad_accum`
micro-batches back to back per optimizer step (pipeline/train.py `train_step` calls `next_batch` once per
micro-batch), with the prefetch thread running ahead — deeper or shallower than grad_accum — and a resume
from the cursor saved at a step boundary.

The reference is the stored windows themselves (numbered 0…N-1 and the number written into the ids), read
with plain pyarrow: over the steps of an epoch every window is trained exactly once across all ranks and
micro-batches; two ranks' slices of each global micro-batch are the one-process run's global batch; the
prefetch depth changes nothing; and a stream restarted from a saved cursor continues with exactly the
batches the uninterrupted stream gives (a prefetched-but-unconsumed batch is neither lost nor repeated)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.reader import ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from tests.pipeline.test_reader import token_split

SEQ, SHARDS, ROWS, GROUP = 8, 4, 24, 4
ACCUM, BATCH = 3, 2  # per rank: 3 micro-batches of 2 windows a step


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accum") / "train"
    folder.mkdir()
    return token_split(folder, SHARDS, ROWS, GROUP, SEQ)


def _stored(folder) -> dict[int, tuple[int, ...]]:
    tables = [pq.read_table(p, columns=["window", "input_ids"]) for p in sorted(folder.glob("*.parquet"))]
    return {w: tuple(ids) for t in tables for w, ids in zip(t["window"].to_pylist(), t["input_ids"].to_pylist())}


def _steps(stream: ShardStream, steps: int) -> list[list[np.ndarray]]:
    """What train_step takes: per step, grad_accum micro-batches, one next_batch each, back to back."""
    return [[stream.next_batch()["window"] for _ in range(ACCUM)] for _ in range(steps)]


def _cfg(batch: int, prefetch: int) -> ReaderConfig:
    return ReaderConfig(batch_size=batch, shuffle_tokens=3 * GROUP * SEQ, seed=5, prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [0, 2, 8])  # none, shallower than grad_accum, deeper
def test_back_to_back_micro_batches_cover_the_epoch_once_and_ranks_split_the_global_batch(split, prefetch):
    stored = _stored(split)
    total, world = len(stored), 2
    steps = total // (BATCH * world * ACCUM)  # whole steps in one epoch
    ranks = []
    for rank in range(world):
        with ShardStream(split, ("window", "input_ids"), _cfg(BATCH, prefetch), Runtime(rank=rank, world=world)) as s:
            ranks.append(_steps(s, steps))
    with ShardStream(split, ("window", "input_ids"), _cfg(BATCH * world, prefetch)) as s:
        one = _steps(s, steps)
    seen = []
    for step in range(steps):
        for micro in range(ACCUM):
            parts = [ranks[r][step][micro] for r in range(world)]
            assert all(len(p) == BATCH for p in parts)
            assert sorted(np.concatenate(parts).tolist()) == sorted(one[step][micro].tolist())
            seen += np.concatenate(parts).tolist()
    assert len(seen) == len(set(seen)) == steps * BATCH * world * ACCUM  # no window twice in an epoch
    assert set(seen) <= set(stored)
    if prefetch == 8:  # the prefetch depth changes nothing: the same order as reading in the caller's thread
        with ShardStream(split, ("window", "input_ids"), _cfg(BATCH * world, 0)) as s:
            assert [[m.tolist() for m in st] for st in _steps(s, steps)] == [[m.tolist() for m in st] for st in one]


def test_ids_are_the_stored_rows(split):
    stored = _stored(split)
    with ShardStream(split, ("window", "input_ids"), _cfg(BATCH, 4)) as s:
        for _ in range(ACCUM * 4):
            batch = s.next_batch()
            for w, ids in zip(batch["window"].tolist(), batch["input_ids"].tolist()):
                assert tuple(ids) == stored[w]


@pytest.mark.parametrize("prefetch", [2, 8])
def test_a_resume_from_a_step_boundary_continues_exactly(split, prefetch):
    """The cursor after k steps of grad_accum micro-batches, saved while the prefetch thread has read ahead,
    restarts a stream that gives the same next steps (across an epoch boundary too)."""
    total_steps, k = 12, 5  # 12 steps × 3 × 2 windows = 72 of 96: then into the next epoch
    with ShardStream(split, ("window", "input_ids"), _cfg(BATCH, prefetch)) as s:
        whole = _steps(s, total_steps + 6)
    with ShardStream(split, ("window", "input_ids"), _cfg(BATCH, prefetch)) as s:
        head = _steps(s, k)
        cursor = s.cursor  # what a checkpoint saves at the end of step k
    with ShardStream(split, ("window", "input_ids"), _cfg(BATCH, prefetch), cursor=cursor) as s:
        tail = _steps(s, total_steps + 6 - k)
    as_lists = lambda steps: [[m.tolist() for m in st] for st in steps]  # noqa: E731
    assert as_lists(head + tail) == as_lists(whole)
