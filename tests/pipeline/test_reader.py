"""The streaming reader: every row once per epoch (checked against the rows read directly from the shards),
shuffle buffers of small regions from the whole split, a row-group cache within the token budget, global
batches drawn from ≥ 128 regions at the 2B recipe's shape, ranks that read only their rows' row groups,
exact resumption from a cursor despite the prefetch, ranks that together equal one process and decode
only their own rows, and a corrupted shard named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.reader as reader_module
from pipeline.capture import CaptureConfig, capture
from pipeline.errors import PipelineError
from pipeline.reader import Cursor, ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from pipeline.shards import ShardWriter
from pipeline.topk import TopKConfig
from schemas.common import with_meta
from schemas.logits import MODE_COLUMNS, SAMPLE_COLUMNS
from schemas.manifest import TokensStats, shard_record, write_manifest
from schemas.tokens import TokensMeta, encode, token_schema

KD_COLUMNS = MODE_COLUMNS["tail"]
SEQ = 8
SHARDS, ROWS, GROUP = 3, 20, 5  # 3 shards of 20 windows in row groups of 5: 12 chunks


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4, samples=5)))
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Token shards whose windows are numbered 0..59 (also written into the ids), in row groups of 5."""
    folder = tmp_path_factory.mktemp("split") / "train"
    folder.mkdir()
    return token_split(folder, SHARDS, ROWS, GROUP)


def direct_rows(folder):
    """The windows as stored, read with plain pyarrow: {window: input_ids}."""
    tables = [pq.read_table(p, columns=["window", "input_ids"]) for p in sorted(folder.glob("*.parquet"))]
    return {w: tuple(ids) for t in tables for w, ids in zip(t["window"].to_pylist(), t["input_ids"].to_pylist())}


def stream_windows(stream, batches):
    got = [stream.next_batch() for _ in range(batches)]
    return np.concatenate([b["window"] for b in got]), np.concatenate([b["input_ids"] for b in got])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_each_epoch_holds_every_stored_row_exactly_once(split, prefetch):
    stored = direct_rows(split)
    cfg = ReaderConfig(batch_size=7, shuffle_tokens=2 * GROUP * SEQ, seed=3, prefetch=prefetch)
    with ShardStream(split, ("window", "input_ids"), cfg) as stream:
        total = stream.total
        windows, ids = stream_windows(stream, -(-2 * total // 7))  # two epochs and a bit; batches cross epochs
    assert total == len(stored) == SHARDS * ROWS
    for epoch in (windows[:total], windows[total : 2 * total]):
        assert sorted(epoch.tolist()) == sorted(stored)  # every row once
    assert not np.array_equal(windows[:total], windows[total : 2 * total])  # another order in the next epoch
    assert all(tuple(row) == stored[w] for w, row in zip(windows.tolist(), ids))  # each row's own ids


def region(w):
    """The reader's shuffle unit of window w in the `split` fixture: 2 windows, never across a row group."""
    return w // GROUP, (w % GROUP) // 2


def test_buffers_mix_small_regions_from_the_whole_split_within_their_budget(split):
    cfg = ReaderConfig(batch_size=8, shuffle_tokens=4 * 2 * SEQ, seed=0, prefetch=0)  # 4 regions of 2 windows a buffer
    stream = ShardStream(split, ("window",), cfg)
    first = [int(w) for _ in range(4) for w in stream.next_batch()["window"]]
    assert stream._order._cached_rows <= max(4 * 2, GROUP)  # the row groups kept: the buffer's tokens at most
    assert {w // ROWS for w in first} == set(range(SHARDS))  # already drawn from every shard
    order = stream._order
    at = 0
    for index in range(3):  # the first buffers: at most 4 regions each, of at most 2 consecutive windows
        size = int(order._layout(0)[1][index]) - at
        buffer = first[at : at + size]
        assert size <= 8 and len({region(w) for w in buffer}) <= 4 and len({region(w) for w in buffer}) >= size / 2
        at += size
    in_order = ShardStream(split, ("window",), ReaderConfig(batch_size=10, prefetch=0), shuffle=False)
    assert [int(w) for _ in range(3) for w in in_order.next_batch()["window"]] == list(range(30))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4099])
def test_the_order_of_regions_is_a_seeded_permutation(n):
    got = reader_module.Permutation(n, [0, 1]).of(np.arange(n))
    assert sorted(got.tolist()) == list(range(n))  # every region once
    again = reader_module.Permutation(n, [0, 1]).of(np.arange(n))
    other = reader_module.Permutation(n, [0, 2]).of(np.arange(n))
    assert np.array_equal(got, again)
    if n >= 17:
        assert not np.array_equal(got, np.arange(n)) and not np.array_equal(got, other)


def token_split(folder, shards, rows, group, seq=SEQ):
    """Token shards whose windows are numbered (also in their ids), in row groups of `group` rows."""
    meta = TokensMeta(seq_len=seq, vocab_size=100000, tokenizer_fingerprint="x", corpus="synthetic", split="train")
    schema = token_schema(seq)
    records = []
    for s in range(shards):
        windows = np.arange(s * rows, (s + 1) * rows)
        ids = np.full((rows, seq + 1), 7, dtype=np.int32)
        ids[:, 0], ids[:, 1] = 2, windows + 10
        path = folder / f"train-{s:05d}.parquet"
        with ShardWriter(path, with_meta(schema, meta), group) as w:
            w.write(encode(windows, ids, np.zeros(rows, bool), schema))
        records.append(shard_record(path, rows, seq, max_id=int(ids.max())))
    write_manifest(folder, meta, records, TokensStats(max_id=100000))
    return folder


@pytest.mark.parametrize(("group", "shards"), [(2, 16), (32, 64)])
def test_a_global_batch_draws_its_windows_from_about_as_many_regions(tmp_path, group, shards):
    """The 2B recipe's shape in miniature: 256 windows a global batch, a 2^21-token buffer at SEQ_LEN 4096
    (512 windows), row groups as stage one writes them at that length (2 windows) or as it wrote them
    before (32): a global batch comes from ≥ 128 distinct row groups (contiguous stretches of the corpus)
    and ≥ 128 distinct 2-window regions either way."""
    seq = 4
    split = token_split(tmp_path / "train", shards=shards, rows=256, group=group, seq=seq)
    stream = ShardStream(split, ("window",), ReaderConfig(batch_size=32, shuffle_tokens=512 * seq, seed=5, prefetch=0),
                         Runtime(rank=0, world=8))
    cursor = Cursor()
    for _ in range(16):  # 16 global batches
        shard, row, cursor = stream._order.regions_of(cursor, 256)
        groups = set(zip(shard.tolist(), (row // group).tolist()))
        regions = set(zip(shard.tolist(), (row // 2).tolist()))
        assert len(groups) >= 128 and len(regions) >= 128, (len(groups), len(regions))


def test_a_rank_reads_only_the_row_groups_of_its_rows(tmp_path):
    """Rank 0 of 4 reads about the row groups its own rows touch over an epoch, not the whole split."""
    split = token_split(tmp_path / "train", shards=4, rows=64, group=2)
    stream = ShardStream(split, ("window",), ReaderConfig(batch_size=4, shuffle_tokens=64 * SEQ, seed=1, prefetch=0),
                         Runtime(rank=0, world=4))
    mine = [int(w) for _ in range(256 // 16) for w in stream.next_batch()["window"]]
    assert len(mine) == 64 and stream.cursor == Cursor(0, 256)
    touched = {w // 2 for w in mine}
    assert stream._order.groups_read == len(touched) < 128  # each group its rows touch read once; 128 in all


def test_resume_from_cursor_sees_the_same_rows_despite_the_prefetch(cache):
    cfg = ReaderConfig(batch_size=5, shuffle_tokens=16 * 7, seed=1, prefetch=4)
    columns = MODE_COLUMNS["sampled"]
    a = ShardStream(cache / "train", columns, cfg)
    for _ in range(9):
        a.next_batch()
    cursor = a.cursor  # the thread has read ahead by now; the cursor is still that of the 9th batch
    assert cursor.offset == 9 * 5
    expected = [a.next_batch() for _ in range(a.total // 5 + 10)]  # runs past the end of the epoch
    a.close()
    b = ShardStream(cache / "train", columns, cfg, cursor=Cursor(cursor.epoch, cursor.offset))
    for want in expected:
        got = b.next_batch()
        for name in columns:
            assert np.array_equal(got[name], want[name]), name
    assert b.cursor.epoch >= 1
    b.close()


def test_ranks_together_equal_one_process_and_decode_only_their_rows(cache, monkeypatch):
    decoded = []
    real = reader_module.decode
    monkeypatch.setattr(reader_module, "decode", lambda table, *a: decoded.append(table.num_rows) or real(table, *a))
    one = ShardStream(cache / "train", ("input_ids",), ReaderConfig(6, 16 * 40, 2, prefetch=0))
    ranks = [ShardStream(cache / "train", ("input_ids",), ReaderConfig(3, 16 * 40, 2, prefetch=0),
                         Runtime(rank=r, world=2)) for r in range(2)]
    for _ in range(30):  # past the end of the epoch
        whole = one.next_batch()["input_ids"]
        parts = []
        for r in ranks:
            decoded.clear()
            parts.append(r.next_batch()["input_ids"])
            assert sum(decoded) == 3  # this rank converted its own 3 rows of the global batch, no more
        assert np.array_equal(whole, np.concatenate(parts))
    one = ShardStream(cache / "train", ("input_ids",), ReaderConfig(6, 16 * 40, 2, prefetch=0))
    threaded = [ShardStream(cache / "train", ("input_ids",), ReaderConfig(3, 16 * 40, 2), Runtime(rank=r, world=2))
                for r in range(2)]
    for _ in range(30):
        assert np.array_equal(one.next_batch()["input_ids"], np.concatenate([r.next_batch()["input_ids"] for r in threaded]))
    for r in threaded:
        r.close()


def test_samples_padded_to_n(cache):
    batch = ShardStream(cache / "train", SAMPLE_COLUMNS + ("label_mask",), ReaderConfig(4)).next_batch()
    assert batch["sample_ids"].shape == (4, 16, 5)
    counts = batch["sample_counts"].sum(-1)
    assert (counts[batch["label_mask"]] == 5).all() and (counts[~batch["label_mask"]] == 0).all()


def test_kd_columns_missing_from_token_shards(work):
    with pytest.raises(PipelineError, match="kd needs a teacher logit cache"):
        ShardStream(work / "tokens" / "train", KD_COLUMNS, ReaderConfig())


def test_corrupted_shard_names_the_file(cache, tmp_path):
    shutil.copytree(cache, tmp_path / "c")
    name = json.loads((cache / "train" / "manifest.json").read_text())["shards"][0]["file"]
    victim = tmp_path / "c" / "train" / name
    group = pq.read_metadata(victim).row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.startswith("topk_ids"))
    at = chunk.data_page_offset + chunk.total_compressed_size // 2  # inside the compressed top-K ids
    data = bytearray(victim.read_bytes())
    data[at : at + 16] = bytes(16)
    victim.write_bytes(bytes(data))
    stream = ShardStream(tmp_path / "c" / "train", KD_COLUMNS, ReaderConfig(batch_size=500, shuffle_tokens=16 * 1000),
                         shuffle=False)
    with pytest.raises(PipelineError, match=f"{name}: cannot read"):
        stream.next_batch()  # raised in the prefetch thread, re-raised here
    with pytest.raises(PipelineError, match=name):
        stream.next_batch()  # and again, not a hang
