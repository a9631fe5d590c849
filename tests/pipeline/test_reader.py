"""The streaming reader: every row once per epoch, exact resumption from a cursor, ranks that together
equal one process."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.capture import CaptureConfig, capture
from pipeline.errors import PipelineError
from pipeline.reader import Cursor, ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from pipeline.topk import TopKConfig
from schemas.logits import MODE_COLUMNS, SAMPLE_COLUMNS

KD_COLUMNS = MODE_COLUMNS["tail"]


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4, samples=5)))
    return out


def windows(stream: ShardStream, batches: int) -> list[int]:
    return [int(w[0]) * 1 for _ in range(batches) for w in stream.next_batch()["input_ids"][:, :1]]


def test_each_epoch_is_a_permutation_of_all_rows(work):
    stream = ShardStream(work / "tokens" / "train", ("input_ids",), ReaderConfig(batch_size=1, shuffle_rows=16, seed=3))
    total = stream.total
    ids = np.concatenate([stream.next_batch()["input_ids"] for _ in range(2 * total)])
    first, second = ids[:total], ids[total:]
    key = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
    assert key(first) == key(second)  # the same rows, each once
    assert not np.array_equal(first, second)  # in another order
    in_order = ShardStream(work / "tokens" / "train", ("input_ids",), ReaderConfig(1), shuffle=False)
    assert not np.array_equal(first, np.concatenate([in_order.next_batch()["input_ids"] for _ in range(total)]))


def test_resume_from_cursor_sees_the_same_rows(cache):
    cfg = ReaderConfig(batch_size=5, shuffle_rows=7, seed=1)
    columns = MODE_COLUMNS["sampled"]
    a = ShardStream(cache / "train", columns, cfg)
    for _ in range(9):
        a.next_batch()
    cursor = a.cursor
    expected = [a.next_batch() for _ in range(a.total // 5 + 10)]  # runs past the end of the epoch
    b = ShardStream(cache / "train", columns, cfg, cursor=Cursor(cursor.epoch, cursor.offset))
    for want in expected:
        got = b.next_batch()
        for name in columns:
            assert np.array_equal(got[name], want[name]), name
    assert b.cursor.epoch >= 1


def test_ranks_together_equal_one_process(cache):
    cfg = ReaderConfig(batch_size=3, shuffle_rows=8, seed=2)
    one = ShardStream(cache / "train", ("input_ids",), ReaderConfig(6, 8, 2))
    ranks = [ShardStream(cache / "train", ("input_ids",), cfg, Runtime(rank=r, world=2)) for r in range(2)]
    for _ in range(20):
        whole = one.next_batch()["input_ids"]
        parts = np.concatenate([r.next_batch()["input_ids"] for r in ranks])
        assert np.array_equal(whole, parts)


def test_samples_padded_to_n(cache):
    batch = ShardStream(cache / "train", SAMPLE_COLUMNS + ("label_mask",), ReaderConfig(4)).next_batch()
    assert batch["sample_ids"].shape == (4, 16, 5)
    counts = batch["sample_counts"].sum(-1)
    assert (counts[batch["label_mask"]] == 5).all() and (counts[~batch["label_mask"]] == 0).all()


def test_kd_columns_missing_from_token_shards(work):
    with pytest.raises(PipelineError, match="kd needs a teacher logit cache"):
        ShardStream(work / "tokens" / "train", KD_COLUMNS, ReaderConfig())


def test_corrupted_shard_names_the_file(cache, tmp_path):
    import shutil

    shutil.copytree(cache, tmp_path / "c")
    victim = tmp_path / "c" / "train" / "train-00000.parquet"
    import pyarrow.parquet as pq

    group = pq.read_metadata(victim).row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.startswith("topk_ids"))
    at = chunk.data_page_offset + chunk.total_compressed_size // 2  # inside the compressed top-K ids
    data = bytearray(victim.read_bytes())
    data[at : at + 16] = bytes(16)
    victim.write_bytes(bytes(data))
    stream = ShardStream(tmp_path / "c" / "train", KD_COLUMNS, ReaderConfig(batch_size=500, shuffle_rows=1000), shuffle=False)
    with pytest.raises(PipelineError, match="train-00000.parquet: cannot read"):
        stream.next_batch()
