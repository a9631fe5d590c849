"""The split is a function of a document's content (issue 22 bug 8); a text file can hold many documents
(`text_docs`: paragraph, line; bug 11); the capped val split is spread over the whole unit plan and never
leaks into train (issue 20 item 4)."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.corpus import CorpusSpec, is_val, plan_units, read_unit
from pipeline.tokenizer import BOS, EOS, PAD
from pipeline.tokens import TokenizeConfig, build_token_shards, spread_order
from schemas.manifest import read_manifest

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + f" {i}." for i in range(n)]


def _documents(folder) -> dict[str, list[list[int]]]:
    """Each split's documents as token lists: windows unpacked at `<bos>`, a continued window's `<bos>` and
    repeated token dropped and the rest added to the document before it."""
    out = {}
    for split in ("train", "val"):
        docs: list[list[int]] = []
        for shard in read_manifest(folder / split, "tokens").shards:
            table = pq.read_table(folder / split / shard.file)
            for row, cont in zip(table.column("input_ids").to_pylist(), table.column("continued").to_pylist()):
                row = [x for x in row if x != PAD]
                starts = [i for i, x in enumerate(row) if x == BOS]
                for k, a in enumerate(starts):
                    ids = row[a + 1 : starts[k + 1] if k + 1 < len(starts) else len(row)]
                    if k == 0 and cont:
                        docs[-1] += ids[1:]
                    else:
                        docs.append(ids)
        out[split] = [d[:-1] if d and d[-1] == EOS else d for d in docs]
    return out


def test_the_split_does_not_depend_on_where_a_document_lives(tmp_path, tokenizer):
    """The same documents as .jsonl, as .jsonl.zst under another name, and as .jsonl.gz in a folder give the
    same val documents (the path-based split gave 45 val windows for one and 61 for another)."""
    docs = _docs(300)
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "renamed.jsonl.gz").write_bytes(gzip.compress(raw))
    cfg = TokenizeConfig(seq_len=64, val_fraction=0.2, val_tokens=0)
    got = []
    for name in ("a.jsonl", "b.jsonl.zst", "folder"):
        build_token_shards(CorpusSpec(str(tmp_path / name)), tokenizer, tmp_path / f"t-{name}", cfg)
        got.append(_documents(tmp_path / f"t-{name}"))
    assert got[0] == got[1] == got[2]
    expected_val = [tokenizer.encode(d) for d in docs if is_val(d, 0.2)]  # the content's hash, independently
    assert got[0]["val"] == expected_val and 30 < len(expected_val) < 90


def _paragraph_file(path, docs: list[str], crlf: bool = False) -> str:
    sep = ["\n\n", "\n \n", "\n\n\n", "\n\t\n"]
    text = "".join(d.replace(". ", ".\n", 1) + sep[i % 4] for i, d in enumerate(docs))
    path.write_bytes(text.encode())
    return text


@pytest.mark.parametrize("unit_bytes", [1 << 20, 3000])
def test_paragraphs_of_one_text_file_are_documents(tmp_path, tokenizer, unit_bytes):
    """TEXT_DOCS=paragraph: a single large text file of blank-line separated documents splits into documents,
    train and val (with `file` it is one document and the val split gets no window); with small units every
    cut falls on a blank line, so no paragraph is split."""
    docs = _docs(400, seed=1)
    _paragraph_file(tmp_path / "dump.txt", docs)
    paragraphs = [d.replace(". ", ".\n", 1) for d in docs]
    spec = CorpusSpec(str(tmp_path / "dump.txt"), text_docs="paragraph")
    units = plan_units(spec, unit_bytes)
    assert (len(units) > 5) == (unit_bytes == 3000)
    pieces = [p for u in units for p in read_unit(spec, u, 1000)]
    assert all(p.first and p.last for p in pieces)  # short paragraphs: one piece each
    assert [p.text for p in pieces] == paragraphs
    build_token_shards(spec, tokenizer, tmp_path / "t", TokenizeConfig(seq_len=64, val_fraction=0.2, unit_bytes=unit_bytes))
    got = _documents(tmp_path / "t")
    for split in ("train", "val"):
        want = [tokenizer.encode(p) for p in paragraphs if is_val(p, 0.2) == (split == "val")]
        assert sorted(got[split]) == sorted(want) and want
    assert read_manifest(tmp_path / "t" / "train", "tokens").meta.text_docs == "paragraph"


def test_a_long_paragraph_comes_in_pieces_and_lines_are_documents(tmp_path, tokenizer):
    long = "\n".join(" ".join(WORDS) for _ in range(40))  # ~4.6 kB, one paragraph of many lines
    text = "first paragraph\n\n" + long + "\n\n\nlast one é\n"
    (tmp_path / "t.txt").write_text(text)
    spec = CorpusSpec(str(tmp_path / "t.txt"), text_docs="paragraph")
    [unit] = plan_units(spec, 1 << 20)
    pieces = list(read_unit(spec, unit, 500))
    docs, current = [], ""
    for p in pieces:
        current = p.text if p.first else current + p.text
        if p.last:
            docs.append(current)
    assert docs == ["first paragraph", long, "last one é"]
    assert len({p.doc_id for p in pieces}) == 3 and len(pieces) > 8
    lines = CorpusSpec(str(tmp_path / "t.txt"), text_docs="line")
    [unit] = plan_units(lines, 1 << 20)
    assert [p.text for p in read_unit(lines, unit, 500)] == [x for x in text.split("\n") if x.strip()]


def test_spread_order_prefixes_cover_the_range():
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    order = spread_order(100)
    assert sorted(order) == list(range(100))
    for k in (4, 10, 25):  # the first k are spread: no gap between neighbours much above 100 / k
        picks = sorted(order[:k])
        assert max(np.diff([0, *picks, 100])) <= 2 * 100 / k + 1


def test_capped_val_spans_every_folder_and_never_leaks_into_train(tmp_path, tokenizer):
    """A corpus of four folders in many units: VAL_TOKENS caps val with whole units drawn across the plan, so
    each folder is there (the first units alone held only `arxiv/`); val documents beyond the cap are in
    neither split."""
    folders = ("arxiv", "books", "code", "web")
    texts = {}
    for f, folder in enumerate(folders):
        (tmp_path / "c" / folder).mkdir(parents=True)
        for i, doc in enumerate(_docs(120, seed=10 + f)):
            text = f"{folder} {doc}"
            (tmp_path / "c" / folder / f"{i:03d}.txt").write_text(text)
            texts[text] = folder
    cfg = TokenizeConfig(seq_len=32, val_fraction=0.3, unit_bytes=2000, val_tokens=3000)
    spec = CorpusSpec(str(tmp_path / "c"))
    assert len(plan_units(spec, cfg.unit_bytes)) > 30
    build_token_shards(spec, tokenizer, tmp_path / "t", cfg)
    val = read_manifest(tmp_path / "t" / "val", "tokens")
    assert 3000 <= val.tokens < 3000 + 32 * 2
    got = _documents(tmp_path / "t")
    by_ids = {tuple(tokenizer.encode(t)): t for t in texts}
    val_folders = {texts[by_ids[tuple(d)]] for d in got["val"] if tuple(d) in by_ids}
    assert val_folders == set(folders)
    train_texts = [by_ids[tuple(d)] for d in got["train"] if tuple(d) in by_ids]
    assert train_texts and not any(is_val(t, 0.3) for t in train_texts)  # no val document in train
    assert len(got["train"]) == sum(not is_val(t, 0.3) for t in texts)  # every train document, once
    # the same whatever the order units are finished in: a second run from scratch with 2 workers
    cfg2 = TokenizeConfig(seq_len=32, val_fraction=0.3, unit_bytes=2000, val_tokens=3000, workers=2)
    build_token_shards(spec, tokenizer, tmp_path / "t2", cfg2)
    for split in ("train", "val"):
        files = sorted(p.name for p in (tmp_path / "t" / split).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "t2" / split).iterdir())
        for name in files:
            assert (tmp_path / "t" / split / name).read_bytes() == (tmp_path / "t2" / split / name).read_bytes()
    shutil.rmtree(tmp_path / "t2")
