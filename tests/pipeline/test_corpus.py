"""Corpus planning and streaming readers: units fixed by the input, bounded pieces, every format, and one
clear line for each kind of bad input."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.corpus import CorpusSpec, plan_units, read_unit
from pipeline.errors import PipelineError

ROWS = [{"text": f"row {i}: " + "word " * (i % 7), "id": i} for i in range(40)]


def docs(spec: CorpusSpec, unit_bytes: int = 1 << 20, piece_bytes: int = 1 << 20) -> list:
    return [p for u in plan_units(spec, unit_bytes) for p in read_unit(spec, u, piece_bytes)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_text_file_streams_in_bounded_pieces_cut_at_newlines(tmp_path):
    text = "".join(f"line {i} " + "é" * (i % 5) + "\n" for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    pieces = docs(CorpusSpec(str(tmp_path / "a.txt")), piece_bytes=64)
    assert "".join(p.text for p in pieces) == text
    assert all(p.doc_id == "a.txt" for p in pieces)
    assert [(p.first, p.last) for p in pieces] == [(True, False)] + [(False, False)] * (len(pieces) - 2) + [(False, True)]
    assert all(len(p.text.encode()) <= 64 and p.text.endswith("\n") for p in pieces)


def test_a_line_longer_than_a_piece_is_cut_without_breaking_characters(tmp_path):
    text = "ü" * 1000 + "\nend\n"
    (tmp_path / "a.md").write_text(text)
    pieces = docs(CorpusSpec(str(tmp_path / "a.md")), piece_bytes=101)
    assert "".join(p.text for p in pieces) == text and len(pieces) > 10


def test_large_files_are_cut_into_units_after_newlines(tmp_path):
    lines = [f"{i:04d} " + "x" * (i % 13) + "\n" for i in range(600)]
    (tmp_path / "big.txt").write_text("".join(lines))
    (tmp_path / "rows.jsonl").write_text(jsonl(ROWS * 10))
    (tmp_path / "small1.txt").write_text("a\n")
    (tmp_path / "small2.txt").write_text("b\n")
    units = plan_units(CorpusSpec(str(tmp_path)), 1000)
    big = [p for u in units for p in u.parts if p.path == "big.txt"]
    data = (tmp_path / "big.txt").read_bytes()
    assert big[0].start == 0 and big[-1].stop is None and len(big) >= 5
    for k, (a, b) in enumerate(zip(big, big[1:]), 1):
        assert a.stop == b.start == data.index(b"\n", k * 1000) + 1  # contiguous, cut after the first newline past k KB
    # consecutive parts share a unit up to 1000 bytes: the small files, and the tail of rows.jsonl before them
    assert [p.path for p in units[-1].parts] == ["rows.jsonl", "small1.txt", "small2.txt"]
    assert all(len(u.parts) == 1 or sum(p.weight for p in u.parts) <= 1000 for u in units)
    assert [u.index for u in units] == list(range(len(units)))
    rows = [p for u in units for p in read_unit(CorpusSpec(str(tmp_path)), u) if p.doc_id.startswith("rows")]
    assert [p.text for p in rows] == [r["text"] for r in ROWS * 10]  # every line once, none split across units
    offsets = [0]
    for r in ROWS * 10:
        offsets.append(offsets[-1] + len(json.dumps(r)) + 1)
    assert [p.doc_id for p in rows] == [f"rows.jsonl@{o}" for o in offsets[:-1]]


def test_a_json_line_longer_than_a_block_is_never_split(tmp_path):
    rows = ROWS[:3] + [{"text": "long " * 40_000}] + ROWS[3:]  # 200 KB: past several unit multiples and 64 KB reads
    (tmp_path / "d.jsonl").write_text(jsonl(rows))
    assert [p.text for p in docs(CorpusSpec(str(tmp_path / "d.jsonl")), unit_bytes=1000, piece_bytes=64)] == [
        r["text"] for r in rows]


def test_plan_depends_on_the_input_only(tmp_path):
    (tmp_path / "a.txt").write_text("x\n" * 5000)
    spec = CorpusSpec(str(tmp_path))
    before = plan_units(spec, 777)
    assert plan_units(spec, 777) == before and len(before) == 13
    (tmp_path / "a.txt").write_text("y\n" * 5000)  # same size, another mtime: other parts, so its units are redone
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    after = plan_units(spec, 777)
    assert [(p.start, p.stop) for u in after for p in u.parts] == [(p.start, p.stop) for u in before for p in u.parts]
    assert all(a.parts[0].version != b.parts[0].version for a, b in zip(after, before))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_and_txt_read_like_plain(tmp_path, suffix):
    raw_lines, raw_text = jsonl(ROWS).encode(), ("".join(r["text"] + "\n" for r in ROWS)).encode()
    pack = gzip.compress if suffix == ".gz" else zstandard.ZstdCompressor().compress
    (tmp_path / f"d.jsonl{suffix}").write_bytes(pack(raw_lines[:500]) + pack(raw_lines[500:]))  # two members/frames
    (tmp_path / f"t.txt{suffix}").write_bytes(pack(raw_text))
    lines = docs(CorpusSpec(str(tmp_path / f"d.jsonl{suffix}")), unit_bytes=100, piece_bytes=64)
    assert [p.text for p in lines] == [r["text"] for r in ROWS]
    text = docs(CorpusSpec(str(tmp_path / f"t.txt{suffix}")), unit_bytes=100, piece_bytes=64)
    assert "".join(p.text for p in text) == raw_text.decode() and len(text) > 5
    assert len(plan_units(CorpusSpec(str(tmp_path)), 100)) == 2  # a compressed file is one unit, whatever its size


def test_parquet_units_are_runs_of_row_groups(tmp_path):
    table = pa.table({"text": [r["text"] for r in ROWS], "id": [r["id"] for r in ROWS]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=6)
    spec = CorpusSpec(str(tmp_path / "d.parquet"))
    units = plan_units(spec, 200)
    assert len(units) > 2 and all(u.parts[0].kind == "parquet" for u in units)
    pieces = [p for u in units for p in read_unit(spec, u)]
    assert [(p.doc_id, p.text) for p in pieces] == [(f"d.parquet#{i}", r["text"]) for i, r in enumerate(ROWS)]


def test_csv_rows(tmp_path):
    (tmp_path / "d.csv").write_text('id,body\n1,"first, with comma"\n2,"multi\nline"\n3,\n')
    assert [(p.doc_id, p.text) for p in docs(CorpusSpec(str(tmp_path / "d.csv"), text_column="body"))] == [
        ("d.csv#0", "first, with comma"), ("d.csv#1", "multi\nline")]


def test_saved_dataset_is_read_in_contiguous_shards(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in ROWS], "id": [r["id"] for r in ROWS]})
    ds.save_to_disk(str(tmp_path / "ds"))
    spec = CorpusSpec(str(tmp_path / "ds"))
    units = plan_units(spec, 300)
    assert len(units) > 2
    for unit in units:  # each unit is the shard `Dataset.shard(n, k, contiguous=True)` holds
        shard = ds.shard(num_shards=len(units), index=unit.index, contiguous=True)
        assert [p.text for p in read_unit(spec, unit)] == shard["text"]
    assert [p.doc_id for u in units for p in read_unit(spec, u)] == [f"{tmp_path / 'ds'}#{i}" for i in range(len(ROWS))]
    datasets.DatasetDict({"train": ds, "other": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert len(docs(CorpusSpec(str(tmp_path / "dd"), dataset_split="other"))) == 3
    with pytest.raises(PipelineError, match=r"no split 'test' \(splits: \['other', 'train'\]\)"):
        plan_units(CorpusSpec(str(tmp_path / "dd"), dataset_split="test"), 300)
    with pytest.raises(PipelineError, match="no column 'body'"):
        plan_units(CorpusSpec(str(tmp_path / "ds"), text_column="body"), 300)


# ------------------------------------------------------------- bad input: one line naming what and where


def bad(path, match, **spec):
    with pytest.raises(PipelineError, match=match) as e:
        unit_bytes = spec.pop("unit_bytes", 1 << 20)
        docs(CorpusSpec(str(path), **spec), unit_bytes=unit_bytes)
    assert "\n" not in str(e.value)


def test_unknown_suffix(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    bad(tmp_path / "data.xml", r"data.xml: unknown suffix .xml; readable: .txt .md .jsonl")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "ok.txt").write_text("fine\n")
    (tmp_path / "f" / "more.jsonl.bz2").write_bytes(b"BZh")
    bad(tmp_path / "f", r"more.jsonl.bz2: unknown suffix .jsonl.bz2")


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    bad(tmp_path / "e.jsonl", r"e.jsonl: empty file \(0 bytes\)")
    (tmp_path / "z.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    bad(tmp_path / "z.txt.zst", r"z.txt.zst: decompresses to nothing")


def test_corrupt_or_truncated_zst(tmp_path):
    packed = zstandard.ZstdCompressor().compress(jsonl(ROWS * 50).encode())
    (tmp_path / "t.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    bad(tmp_path / "t.jsonl.zst", r"t.jsonl.zst: truncated zstd stream")
    (tmp_path / "c.jsonl.zst").write_bytes(b"this is not zstd at all")
    bad(tmp_path / "c.jsonl.zst", r"c.jsonl.zst: corrupt zstd stream after 0 bytes")


def test_corrupt_or_truncated_gz(tmp_path):
    packed = gzip.compress(jsonl(ROWS * 50).encode())
    (tmp_path / "t.txt.gz").write_bytes(packed[: len(packed) // 2])
    bad(tmp_path / "t.txt.gz", r"t.txt.gz: corrupt or truncated gzip stream after \d+ bytes")
    (tmp_path / "c.jsonl.gz").write_bytes(b"plain text, not gzip")
    bad(tmp_path / "c.jsonl.gz", r"c.jsonl.gz: corrupt or truncated gzip stream after 0 bytes")


def test_json_line_without_the_text_column_names_its_line(tmp_path):
    rows = ROWS[:30] + [{"body": "no text here"}] + ROWS[30:]
    (tmp_path / "d.jsonl").write_text(jsonl(rows[:10]) + "\n" + jsonl(rows[10:]))  # a blank line counts as a line
    bad(tmp_path / "d.jsonl", r"d.jsonl:32: no column 'text' \(keys: \['body'\]\); pass --text-column")
    # also when the line is in a later byte-range unit: the line number counts from the file's start
    bad(tmp_path / "d.jsonl", r"d.jsonl:32: no column 'text'", unit_bytes=300)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress((tmp_path / "d.jsonl").read_bytes()))
    bad(tmp_path / "d.jsonl.gz", r"d.jsonl.gz:32: no column 'text'")


def test_invalid_json_names_its_line(tmp_path):
    (tmp_path / "d.json").write_text(jsonl(ROWS[:5]) + '{"text": "unterminated\n' + jsonl(ROWS[5:]))
    bad(tmp_path / "d.json", r"d.json:6: invalid JSON \(column 10: Unterminated string starting at\)")
    (tmp_path / "l.jsonl").write_text('{"text": "a"}\n["a", "list"]\n')
    bad(tmp_path / "l.jsonl", r"l.jsonl:2: a JSON list, expected one object per line")
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n')
    bad(tmp_path / "n.jsonl", r"n.jsonl:1: column 'text' is a int, expected a string")


def test_parquet_and_csv_without_the_column_or_corrupt(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    bad(tmp_path / "d.parquet", r"d.parquet: no column 'text' \(columns: \['body'\]\)")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 broken")
    bad(tmp_path / "x.parquet", r"x.parquet: not a readable Parquet file")
    (tmp_path / "d.csv").write_text("id,body\n1,a\n")
    bad(tmp_path / "d.csv", r"d.csv: no column 'text' in the CSV header")
    (tmp_path / "r.csv").write_text("id,text\n1,a\n2,b,c,d\n")
    bad(tmp_path / "r.csv", r"r.csv: not a readable CSV file \(CSV parse error: Expected 2 columns, got 4")
