"""Corpus → windows → token shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.corpus import CorpusSpec, is_val, iter_documents
from pipeline.errors import PipelineError
from pipeline.tokenizer import BOS, EOS, PAD
from pipeline.tokens import TokenizeConfig, WindowStream, build_token_shards
from schemas.manifest import read_manifest
from schemas.tokens import document_ids, label_mask, validate_token_shard


def test_windows_start_with_bos_and_documents_continue_after_a_fresh_bos():
    stream = WindowStream(seq_len=4)
    out = [*stream.push([10, 11, 12]), *stream.push([20, 21, 22, 23, 24, 25, 26]), *stream.push([30]),
           *stream.push([40, 41]), *stream.push([50]), *stream.flush()]
    assert [(w.tolist(), c) for w, c in out] == [
        ([BOS, 10, 11, 12, EOS], False),
        ([BOS, 20, 21, 22, 23], False),
        ([BOS, 23, 24, 25, 26], True),  # continues: a fresh <bos>, then the last token placed, repeated
        ([BOS, 26, EOS, BOS, 30], True),
        ([BOS, 30, EOS, BOS, 40], True),
        ([BOS, 40, 41, EOS, PAD], True),  # a document never starts in the last slot: padded instead
        ([BOS, 50, EOS, PAD, PAD], False),  # the partial last window, padded
    ]


def test_label_mask_and_documents():
    ids = np.array([[BOS, 23, 24, EOS, BOS, 30], [BOS, 40, 41, EOS, PAD, PAD]])
    mask = label_mask(ids, np.array([True, False]))
    # row 0: position 0 repeats the previous window's last label; position 3 predicts the next <bos>
    assert mask.tolist() == [[False, True, True, False, True], [True, True, True, False, False]]
    chat = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], dtype=np.uint8)
    assert label_mask(ids, np.array([False, False]), chat).tolist() == [[True, True, False, False, True],
                                                                         [False, True, True, False, False]]
    docs = document_ids(torch.tensor(ids[:, :-1]))
    assert docs.tolist() == [[1, 1, 1, 1, 2], [1, 1, 1, 1, 1]]


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


def test_windows_hold_the_corpus_documents_in_order(work, tokenizer, corpus_dir):
    """Every window starts with <bos>; with the repeated token of continued windows removed, the train
    windows are exactly the train documents as `<bos> doc <eos>`, in corpus order (pads aside)."""
    manifest = read_manifest(work / "tokens" / "train", "tokens")
    stream: list[int] = []
    for shard in manifest.shards:
        table = pq.read_table(work / "tokens" / "train" / shard.file)
        for ids, continued in zip(table.column("input_ids").to_pylist(), table.column("continued").to_pylist()):
            assert ids[0] == BOS
            stream += [x for x in (ids[2:] if continued else ids) if x != PAD]  # pads: only filler
    docs = [t for d, t in iter_documents(CorpusSpec(str(corpus_dir))) if not is_val(d, 0.2)]
    expected = [x for t in docs for x in [BOS, *tokenizer.encode(t), EOS]]
    assert stream == expected


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
    with pytest.raises(PipelineError, match="has no documents"):
        build_token_shards(CorpusSpec(str(tmp_path / "corpus")), tokenizer, tmp_path / "tokens", TokenizeConfig(seq_len=16))
    assert not list((tmp_path / "tokens").rglob("manifest.json"))


def test_missing_corpus_path(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        list(iter_documents(CorpusSpec(str(tmp_path / "nope.txt"))))
