"""Corpus → windows → token shards."""

from __future__ import annotations

import re

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
    ids = [f"document text {i}" for i in range(2000)]
    val = [d for d in ids if is_val(d, 0.1)]
    assert val == [d for d in ids if is_val(d, 0.1)]
    assert 150 < len(val) < 250


def test_a_document_in_pieces_packs_as_one():
    whole = WindowStream(seq_len=4)
    pieces = WindowStream(seq_len=4)
    doc = list(range(10, 23))
    expected = [*whole.push(doc), *whole.push([30]), *whole.flush()]
    got = [*pieces.push(doc[:3], True, False), *pieces.push(doc[3:7], False, False), *pieces.push([], False, False),
           *pieces.push(doc[7:], False, True), *pieces.push([30]), *pieces.flush()]
    assert [(w.tolist(), c) for w, c in got] == [(w.tolist(), c) for w, c in expected]


def test_a_stream_that_starts_or_ends_inside_a_document():
    """A later byte range of a large file begins mid-document: a continued window without a repeated token
    (position 0 does not train); a range that ends mid-document has no <eos>, and a window holding only
    <bos> and the repeated token trains nothing, so it is not written."""
    stream = WindowStream(seq_len=4)
    assert [(w.tolist(), c) for w, c in [*stream.push([30, 31, 32], start=False), *stream.flush()]] == [
        ([BOS, 30, 31, 32, EOS], True)]
    assert [(w.tolist(), c) for w, c in [*stream.push([10, 11, 12, 13], end=False), *stream.flush()]] == [
        ([BOS, 10, 11, 12, 13], False)]
    assert [(w.tolist(), c) for w, c in [*stream.push([10, 11], end=False), *stream.flush()]] == [
        ([BOS, 10, 11, PAD, PAD], False)]


def split_windows(folder):
    """(window, input_ids, continued) of a split's manifest shards, in manifest order."""
    manifest = read_manifest(folder, "tokens", verify_sha=True)
    tables = [pq.read_table(folder / s.file) for s in manifest.shards]
    return (np.concatenate([t.column("window").to_numpy() for t in tables]),
            np.concatenate([np.array(t.column("input_ids").to_pylist(), dtype=np.int64) for t in tables]),
            np.concatenate([t.column("continued").to_numpy(zero_copy_only=False) for t in tables]))


def unit_streams(folder) -> dict[int, list[int]]:
    """Each unit's tokens with the packing undone: the <bos> and repeated token of a continued window
    dropped (only the <bos> of a unit's first window, which repeats nothing), pads dropped."""
    windows, ids, continued = split_windows(folder)
    out: dict[int, list[int]] = {}
    for w, row, cont in zip(windows.tolist(), ids.tolist(), continued.tolist()):
        unit = w >> 32
        skip = 0 if not cont else (2 if unit in out else 1)
        out.setdefault(unit, []).extend(x for x in row[skip:] if x != PAD)
    return out


def test_shards_manifest_and_metadata(work, tokenizer):
    for split in ("train", "val"):
        manifest = read_manifest(work / "tokens" / split, "tokens", verify_sha=True)
        assert manifest.meta.tokenizer_fingerprint == tokenizer.fingerprint
        assert manifest.meta.vocab_size == tokenizer.vocab_size
        assert manifest.meta.val_tokens == 2_000_000 and manifest.stats.available_tokens == manifest.tokens
        for shard in manifest.shards:
            assert validate_token_shard(work / "tokens" / split / shard.file).seq_len == 16
        windows, ids, _ = split_windows(work / "tokens" / split)
        assert ids.shape[1] == 17 and ids.max() < tokenizer.vocab_size and (ids[:, 0] == BOS).all()
        assert windows.tolist() == list(range(manifest.rows))  # one unit (index 0): rows 0, 1, 2, …
    assert len(read_manifest(work / "tokens" / "train", "tokens").shards) > 1


def test_windows_hold_the_corpus_documents_in_order(work, tokenizer, corpus_dir):
    """Every window starts with <bos>; with the repeated token of continued windows removed, the train
    windows are exactly the train documents as `<bos> doc <eos>`, in corpus order (pads aside)."""
    texts = [(f.name, f.read_text()) for f in sorted(corpus_dir.iterdir())]
    expected = [x for name, t in texts if not is_val(t, 0.2) for x in [BOS, *tokenizer.encode(t), EOS]]
    assert unit_streams(work / "tokens" / "train") == {0: expected}


def test_units_and_their_window_indices(tmp_path, tokenizer, corpus_dir):
    """Small units: each unit's windows are numbered unit << 32 | row and hold that unit's documents."""
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=7, unit_bytes=2000)
    build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "t", cfg)
    files = sorted(corpus_dir.iterdir())
    sizes = [f.stat().st_size for f in files]
    groups, group, weight = [], [], 0  # the grouping rule, written out: consecutive files up to 2000 bytes
    for f, size in zip(files, sizes):
        if group and weight + size > 2000:
            groups.append(group)
            group, weight = [], 0
        group.append(f)
        weight += size
    groups.append(group)
    assert len(groups) > 3
    streams = unit_streams(tmp_path / "t" / "train")
    for unit, group in enumerate(groups):
        expected = [x for f in group if not is_val(f.read_text(), 0.2)
                    for x in [BOS, *tokenizer.encode(f.read_text()), EOS]]
        assert streams.get(unit, []) == expected
    windows, _, _ = split_windows(tmp_path / "t" / "train")
    for unit in streams:
        rows = windows[windows >> 32 == unit] & 0xFFFFFFFF
        assert rows.tolist() == list(range(len(rows)))


def test_a_large_text_file_is_cut_into_units_at_newlines(tmp_path, tokenizer):
    """One .txt document of ~9 units, read in small pieces: each unit is a byte range cut after a newline;
    the document continues across pieces and ranges (no <bos>/<eos> inside, <eos> only at the file's end),
    and the ranges' tokens, in order, are exactly the whole file's encoding (no dummy-prefix space at a cut)."""
    rng = np.random.default_rng(0)
    words = ["def", "class", "return", "value", "self", "x", "y", "Thing", "(x, y):", "'''Adds'''", "7"]
    text = "".join(" " * int(rng.integers(0, 3)) + " ".join(rng.choice(words, size=rng.integers(1, 12))) + "\n"
                   for _ in range(400))
    (tmp_path / "big.txt").write_text(text)
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.5, unit_bytes=1000, piece_bytes=150)
    build_token_shards(CorpusSpec(str(tmp_path / "big.txt")), tokenizer, tmp_path / "t", cfg)
    # cut after a newline that a non-space character follows (a tokenizer may merge a run of whitespace)
    good = [m.start() + 1 for m in re.finditer(r"\n(?=\S)", text)]
    cuts = sorted({0, len(text), *(next(c for c in good if c > t) for t in range(1000, len(text), 1000))})
    ranges = list(zip(cuts, cuts[1:]))
    assert len(ranges) >= 8
    streams = {s: unit_streams(tmp_path / "t" / s) for s in ("train", "val")}
    assert {u for s in streams.values() for u in s} == set(range(len(ranges)))
    body = []
    for unit, (a, b) in enumerate(ranges):
        [ids] = [streams[s][unit] for s in streams if unit in streams[s]]  # a range lies in one split
        assert (ids[0] == BOS) == (a == 0) and BOS not in ids[1:]
        assert (ids[-1] == EOS) == (b == len(text)) and EOS not in ids[:-1]
        body += [x for x in ids if x not in (BOS, EOS)]
    assert body == tokenizer.encode(text)


def test_val_cap_keeps_the_first_val_windows(tmp_path, tokenizer, corpus_dir):
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.3, shard_windows=5, unit_bytes=1500, val_tokens=0)
    build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "all", cfg)
    _, all_ids, all_cont = split_windows(tmp_path / "all" / "val")
    rows = [s.rows for s in read_manifest(tmp_path / "all" / "val", "tokens").shards]
    k = next(i for i, r in enumerate(rows) if r >= 2 and i > 0)
    keep = sum(rows[:k]) + 1  # a cap that ends inside shard k
    capped = TokenizeConfig(**{**vars(cfg), "val_tokens": keep * 16 - 5})
    manifests = build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "cap", capped)
    _, ids, cont = split_windows(tmp_path / "cap" / "val")
    assert len(ids) == keep  # the first windows that cover the cap
    assert (ids == all_ids[:keep]).all() and (cont == all_cont[:keep]).all()
    val = manifests["val"]
    assert val.meta.val_tokens == keep * 16 - 5 and val.tokens == keep * 16
    assert val.stats.available_tokens == len(all_ids) * 16  # each unit's val is below the cap here
    assert [s.rows for s in val.shards] == rows[:k] + [1] and val.shards[-1].file.endswith("-cap.parquet")
    assert read_manifest(tmp_path / "cap" / "train", "tokens").rows == read_manifest(tmp_path / "all" / "train", "tokens").rows


def test_corpus_tokens_keeps_the_first_train_windows(tmp_path, tokenizer, corpus_dir):
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=5, unit_bytes=1500)
    build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "all", cfg)
    _, all_ids, _ = split_windows(tmp_path / "all" / "train")
    short = TokenizeConfig(**{**vars(cfg), "corpus_tokens": 300})
    manifests = build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "short", short)
    _, ids, _ = split_windows(tmp_path / "short" / "train")
    assert len(ids) == 19 and (ids == all_ids[:19]).all()  # ceil(300 / 16)
    assert 0 < manifests["val"].tokens <= 16 * 6  # the val fraction's share: 300 * 0.2 / 0.8 = 75 tokens → 5 windows
    units = {p.name for p in (tmp_path / "short" / "units").iterdir()}
    assert len(units) < len(list((tmp_path / "all" / "units").iterdir()))  # units past the caps: not kept


def test_rerun_is_a_no_op_and_a_changed_corpus_rebuilds(tmp_path, tokenizer, corpus_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(corpus_dir.iterdir())[:30]:
        (corpus / f.name).write_text(f.read_text())
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, unit_bytes=1500)
    build_token_shards(CorpusSpec(str(corpus)), tokenizer, tmp_path / "t", cfg)
    build_token_shards(CorpusSpec(str(corpus)), tokenizer, tmp_path / "t", cfg)
    assert "nothing to do" in capsys.readouterr().out
    (corpus / "doc000.txt").write_text("def changed():\n    return 1\n")
    build_token_shards(CorpusSpec(str(corpus)), tokenizer, tmp_path / "t", cfg)
    streams = unit_streams(tmp_path / "t" / "train") | unit_streams(tmp_path / "t" / "val")
    assert streams[0][: len(tokenizer.encode("def changed():")) + 1] == [BOS, *tokenizer.encode("def changed():")]


def test_stdlib_corpus_excludes_tests():
    docs = iter_documents(CorpusSpec("stdlib"))
    names = [next(docs)[0] for _ in range(50)]
    assert all("test" not in n.split("/")[0] for n in names)
    assert names == sorted(names)


def test_empty_file_is_an_error_and_writes_no_manifest(tmp_path, tokenizer):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    with pytest.raises(PipelineError, match="empty.txt: empty file"):
        build_token_shards(CorpusSpec(str(tmp_path / "corpus")), tokenizer, tmp_path / "tokens", TokenizeConfig(seq_len=16))
    assert not list(tmp_path.rglob("manifest.json"))


def test_a_corpus_without_documents(tmp_path, tokenizer):
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n{"text": null}\n')
    with pytest.raises(PipelineError, match="has no documents"):
        build_token_shards(CorpusSpec(str(tmp_path / "blank.jsonl")), tokenizer, tmp_path / "tokens",
                           TokenizeConfig(seq_len=16))
    assert not list(tmp_path.rglob("manifest.json"))


def test_missing_corpus_path(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        list(iter_documents(CorpusSpec(str(tmp_path / "nope.txt"))))


def test_a_worker_gets_its_own_units_not_the_plan(tmp_path, tokenizer, corpus_dir, monkeypatch):
    from pipeline import tokens
    from pipeline.corpus import plan_units
    from pipeline.runtime import Runtime

    seen = []
    monkeypatch.setattr(tokens, "_work", seen.append)
    spec = CorpusSpec(str(corpus_dir))
    build_token_shards(spec, tokenizer, tmp_path / "t", TokenizeConfig(seq_len=16, unit_bytes=1500),
                       Runtime(rank=1, world=2))
    plan = plan_units(spec, 1500)
    [job] = seen
    assert job.plan == () and job.mine == tuple(u for u in plan if u.index % 2 == 1) and job.units == len(plan)


def test_a_worker_tokenizes_no_unit_past_the_caps(tmp_path, tokenizer, corpus_dir, monkeypatch):
    """It reads the records of the units before its own (checked against the plan's digests, as it holds no
    plan) and skips a unit once they cover both caps."""
    from pipeline import tokens

    calls, real = [], tokens._tokenize_unit

    def counted(job, unit, *args):
        calls.append(unit.index)
        real(job, unit, *args)

    monkeypatch.setattr(tokens, "_tokenize_unit", counted)
    cfg = TokenizeConfig(seq_len=16, unit_bytes=1500, corpus_tokens=300, val_tokens=40)
    build_token_shards(CorpusSpec(str(corpus_dir)), tokenizer, tmp_path / "t", cfg)
    kept = sorted(int(p.stem) for p in (tmp_path / "t" / "units").glob("0*.json"))
    assert calls == kept == list(range(len(kept))) and len(kept) < len(tokens.plan_units(CorpusSpec(str(corpus_dir)),
                                                                                              1500))
