"""Corpus → windows → token shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import CorpusSpec, is_val, iter_documents
from pipeline.errors import PipelineError
from pipeline.tokenizer import BOS, EOS
from pipeline.tokens import TokenizeConfig, WindowStream, build_token_shards
from schemas.manifest import read_manifest
from schemas.tokens import validate_token_shard


def test_windows_overlap_by_one_and_wrap_documents():
    stream = WindowStream(seq_len=4)
    out = list(stream.push([10, 11, 12])) + list(stream.push([20, 21, 22, 23, 24]))
    flat = [BOS, 10, 11, 12, EOS, BOS, 20, 21, 22, 23, 24, EOS]
    assert [w.tolist() for w in out] == [flat[0:5], flat[4:9]]  # window i starts where i-1's labels end
    assert stream.buf == flat[8:]


def test_split_is_deterministic_by_document():
    ids = [f"doc{i}" for i in range(2000)]
    val = [d for d in ids if is_val(d, 0.1)]
    assert val == [d for d in ids if is_val(d, 0.1)]
    assert 150 < len(val) < 250


def test_shards_manifest_and_metadata(work, tokenizer):
    for split in ("train", "val"):
        manifest = read_manifest(work / "tokens" / split, "tokens", verify_sha=True)
        assert manifest.meta.tokenizer_fingerprint == tokenizer.fingerprint
        assert manifest.meta.vocab_size == tokenizer.vocab_size
        windows = []
        for shard in manifest.shards:
            path = work / "tokens" / split / shard.file
            assert validate_token_shard(path).seq_len == 16
            table = pq.read_table(path)
            windows += table.column("window").to_pylist()
            ids = np.array(table.column("input_ids").to_pylist())
            assert ids.shape[1] == 17 and ids.max() < tokenizer.vocab_size
        assert windows == list(range(manifest.rows))
    assert len(read_manifest(work / "tokens" / "train", "tokens").shards) > 1


def test_windows_chain_into_the_corpus_stream(work, tokenizer, corpus_dir):
    """Consecutive windows overlap by one token: the last id of window i is the first of window i+1."""
    table = pq.read_table(work / "tokens" / "train" / "train-00000.parquet")
    ids = table.column("input_ids").to_pylist()
    for a, b in zip(ids, ids[1:]):
        assert a[-1] == b[0]
    first_doc = next(t for d, t in iter_documents(CorpusSpec(str(corpus_dir))) if not is_val(d, 0.2))
    assert ids[0][:6] == [BOS] + tokenizer.encode(first_doc)[:5]


def test_jsonl_corpus_reads_text_column(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"content": "a b c"}\n{"content": "d e"}\n')
    docs = list(iter_documents(CorpusSpec(str(tmp_path / "data.jsonl"), text_column="content")))
    assert [t for _, t in docs] == ["a b c", "d e"]
    with pytest.raises(PipelineError, match="no column 'text'"):
        list(iter_documents(CorpusSpec(str(tmp_path / "data.jsonl"))))


def test_stdlib_corpus_excludes_tests():
    docs = iter_documents(CorpusSpec("stdlib"))
    names = [next(docs)[0] for _ in range(50)]
    assert all("test" not in n.split("/")[0] for n in names)
    assert names == sorted(names)


def test_empty_corpus_is_an_error_and_writes_no_manifest(tmp_path, tokenizer):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    with pytest.raises(PipelineError, match="no complete window"):
        build_token_shards(CorpusSpec(str(tmp_path / "corpus")), tokenizer, tmp_path / "tokens", TokenizeConfig(seq_len=16))
    assert not list((tmp_path / "tokens").rglob("manifest.json"))


def test_missing_corpus_path(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        list(iter_documents(CorpusSpec(str(tmp_path / "nope.txt"))))
