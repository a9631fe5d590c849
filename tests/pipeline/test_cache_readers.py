"""Every common reader opens the cache: pyarrow, `datasets`, polars and DuckDB read every column of a cache
made with the default settings (issue 22 bug 6: DuckDB refused byte-stream-split float16 columns) and of the
compact preset, with the same values; byte-stream-split on float16 stays available as an opt-in that names
the reader it excludes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.capture import CACHE_PRESETS, CaptureConfig, capture
from pipeline.topk import TopKConfig
from schemas.manifest import read_manifest

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")


def _flat(values) -> np.ndarray:
    """Nested lists (or arrays) of numbers → one float64 array (order kept)."""
    out = []

    def walk(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            for x in v:
                walk(x)
        else:
            out.append(float(v))

    walk(values)
    return np.asarray(out)


@pytest.fixture(scope="module", params=["default", "compact"])
def cache(request, work, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"readers-{request.param}") / "logits"
    if request.param == "default":
        cfg = CaptureConfig(TopKConfig(samples=4, head_chunk=64), batch_size=8)  # default K and encoding
    else:
        preset = CACHE_PRESETS["compact"]
        cfg = CaptureConfig(TopKConfig(topk=preset["topk"], samples=preset["samples"], sampling=preset["sampling"],
                                       head_chunk=64), batch_size=8, id_coding=preset["id_coding"],
                            logprob_coding=preset["logprob_coding"])
    capture(work / "teacher", work / "tokens", out, cfg)
    return out


def _shard(cache):
    manifest = read_manifest(cache / "val", "logits")
    return cache / "val" / manifest.shards[0].file


def test_every_reader_reads_every_column(cache):
    path = _shard(cache)
    reference = pq.read_table(path)
    names = reference.column_names
    assert {"topk_logprobs", "label_logprob", "entropy", "sample_ids"} <= set(names) or "topk_ids" not in names
    ddb = duckdb.sql(f"select * from read_parquet('{path}')").fetchall()
    frame = pl.read_parquet(path)
    import datasets

    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache / ".hf"))
    assert len(ddb) == frame.height == ds.num_rows == reference.num_rows
    for i, name in enumerate(names):
        want = _flat(reference.column(name).to_pylist())
        assert np.array_equal(_flat([row[i] for row in ddb]), want), f"duckdb: {name}"
        assert np.array_equal(_flat(frame.get_column(name).to_list()), want), f"polars: {name}"
        assert np.array_equal(_flat(ds[:][name]), want), f"datasets: {name}"


def test_float16_split_is_opt_in_and_names_duckdb(work, tmp_path):
    """The opt-in writes float16 columns byte-stream-split (recorded in the metadata); DuckDB cannot read
    them, which its help says; pyarrow still reads the same values as the default cache."""
    assert "DuckDB" in CaptureConfig.__dataclass_fields__["float16_split"].metadata["help"]
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(samples=4, head_chunk=64), batch_size=8,
                                                                  float16_split=True))
    path = _shard(out)
    meta = read_manifest(out / "val", "logits").meta
    assert meta.float16_split is True
    encodings = {pq.ParquetFile(path).metadata.row_group(0).column(c).path_in_schema.split(".")[0]:
                 pq.ParquetFile(path).metadata.row_group(0).column(c).encodings
                 for c in range(pq.ParquetFile(path).metadata.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs"]
    with pytest.raises(duckdb.Error, match="BYTE_STREAM_SPLIT"):
        duckdb.sql(f"select topk_logprobs from read_parquet('{path}')").fetchall()
