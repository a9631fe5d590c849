"""`python -m stages.tokenize` as users run it: WORKERS and ranks give the same files, a killed run resumes
to the same files, the caps hold whatever the process count, and bad input is one line."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.corpus import CorpusSpec
from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.runtime import Runtime
from pipeline.tokenizer import Tokenizer
from pipeline.tokens import TokenizeConfig, build_token_shards
from schemas.manifest import read_manifest
from tests.conftest import CORPUS_TEXTS
from tests.stages.helpers import ENV, ROOT, same_files, stage, torchrun

SMALL = ("--seq-len", "16", "--val-fraction", "0.2", "--shard-windows", "9", "--vocab", "400", "--unit-bytes", "1500")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A folder of every local format: text files, JSON lines compressed with zstd, Parquet, CSV."""
    folder = tmp_path_factory.mktemp("mixed")
    for i, text in enumerate(CORPUS_TEXTS[:60]):
        (folder / f"doc{i:03d}.txt").write_text(text)
    rows = "".join(json.dumps({"text": t}) + "\n" for t in CORPUS_TEXTS[60:90])
    (folder / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    pq.write_table(pa.table({"text": CORPUS_TEXTS[90:110]}), folder / "table.parquet", row_group_size=4)
    (folder / "z.csv").write_text("text\n" + "".join(json.dumps(t) + "\n" for t in CORPUS_TEXTS[110:]))
    return folder


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    import datasets

    folder = tmp_path_factory.mktemp("hf") / "ds"
    datasets.Dataset.from_dict({"text": CORPUS_TEXTS, "n": list(range(len(CORPUS_TEXTS)))}).save_to_disk(str(folder))
    return folder


def tokens(work: Path, corpus: Path, *extra: str, launcher: list[str] | None = None) -> Path:
    stage("tokenize", "--work", work, "--corpus", corpus, *SMALL, *extra, launcher=launcher)
    return work


@pytest.mark.parametrize("caps", [(), ("--val-tokens", "100", "--corpus-tokens", "600"),
                                  ("--filters", "exact,near,pii", "--min-chars", "158")], ids=["all", "capped", "filtered"])
def test_two_workers_equal_one(mixed, tmp_path, caps):
    one = tokens(tmp_path / "one", mixed, *caps)
    two = tokens(tmp_path / "two", mixed, "--workers", "2", *caps)
    assert same_files(one, two) == []
    train = read_manifest(one / "tokens" / "train", "tokens")
    units = {s.file.split("-")[1] for s in train.shards}
    if not caps or caps[0] == "--filters":
        assert len(units) > 3  # several units did the work
    else:  # the first windows covering each cap, from the first units only
        val = read_manifest(one / "tokens" / "val", "tokens")
        assert train.tokens == 608 and val.tokens == 112
        used = units | {s.file.split("-")[1] for s in val.shards}
        records = sorted(p.stem for p in (one / "tokens" / "units").iterdir())
        assert records == [f"{i:06d}" for i in range(len(records))] and set(used) <= set(records)
        assert int(max(used)) + 1 == len(records) < 10  # the leading units that cover both caps, no more


def test_saved_dataset_two_workers_equal_one(saved_dataset, tmp_path):
    one = tokens(tmp_path / "one", saved_dataset)
    two = tokens(tmp_path / "two", saved_dataset, "--workers", "2")
    assert same_files(one, two) == []
    assert read_manifest(one / "tokens" / "train", "tokens").stats.units > 3


def test_two_ranks_equal_one(mixed, tmp_path):
    """torchrun: each rank trains the same tokenizer and tokenizes its units; rank 0 waits for the other's
    records on the file system and writes the manifests."""
    one = tokens(tmp_path / "one", mixed)
    two = tokens(tmp_path / "two", mixed, launcher=torchrun(2))
    assert same_files(one, two) == []


def test_killed_run_resumes_to_identical_files(tmp_path, tokenizer_file):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part{i}.txt").write_text("".join(CORPUS_TEXTS))
    args = ("--corpus", corpus, "--tokenizer", tokenizer_file, *SMALL, "--shard-windows", "2")
    reference = tmp_path / "ref"
    stage("tokenize", "--work", reference, *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stages.tokenize", "--work", str(out), *map(str, args)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "tokens" / "units").glob("0*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(out.rglob("manifest.json")), "the run finished before it was killed; the test proves nothing"
    done = {p.name: p.stat().st_mtime_ns for p in (out / "tokens" / "units").glob("0*.json")}
    stage("tokenize", "--work", out, *args)
    assert same_files(out, reference) == []
    assert not list(out.rglob(".*tmp*"))
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "tokens" / "units").glob("0*.json")}
    assert all(kept[name] == mtime for name, mtime in done.items())  # completed units were not redone


def test_rank0_waits_for_another_rank_through_files(mixed, tmp_path, tokenizer):
    """The rank protocol without torchrun: rank 1 starts late, in a thread; rank 0 polls for its records."""
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=9, unit_bytes=1500)
    build_token_shards(CorpusSpec(str(mixed)), tokenizer, tmp_path / "one", cfg)
    late = threading.Timer(1.0, build_token_shards, (CorpusSpec(str(mixed)), tokenizer, tmp_path / "two", cfg,
                                                     Runtime(rank=1, world=2)))
    late.start()
    build_token_shards(CorpusSpec(str(mixed)), tokenizer, tmp_path / "two", cfg, Runtime(rank=0, world=2))
    late.join()
    assert same_files(tmp_path / "one", tmp_path / "two") == []


def test_filter_decisions_wait_for_every_rank(mixed, tmp_path, tokenizer):
    """With dropping filters: rank 0 waits for rank 1's sketches before deciding, rank 1 waits for the
    decisions before tokenizing; the files are those of one process."""
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=9, unit_bytes=1500)
    flt = FilterConfig(filters="exact,near", min_chars=158)
    build_token_shards(CorpusSpec(str(mixed)), tokenizer, tmp_path / "one", cfg, filters=flt)
    late = threading.Timer(1.0, build_token_shards, (CorpusSpec(str(mixed)), tokenizer, tmp_path / "two", cfg,
                                                     Runtime(rank=1, world=2), flt))
    late.start()
    build_token_shards(CorpusSpec(str(mixed)), tokenizer, tmp_path / "two", cfg, Runtime(rank=0, world=2), flt)
    late.join()
    assert same_files(tmp_path / "one", tmp_path / "two") == []
    assert read_manifest(tmp_path / "one" / "train", "tokens").stats.filters["length"] > 0


def test_changed_filters_redo_the_units_and_a_rerun_does_nothing(mixed, tmp_path, tokenizer, capsys):
    cfg = TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=9, unit_bytes=1500)
    spec, out = CorpusSpec(str(mixed)), tmp_path / "t"
    first = build_token_shards(spec, tokenizer, out, cfg, filters=FilterConfig(min_chars=155))
    build_token_shards(spec, tokenizer, out, cfg, filters=FilterConfig(min_chars=155))
    assert "nothing to do" in capsys.readouterr().out
    second = build_token_shards(spec, tokenizer, out, cfg, filters=FilterConfig(min_chars=160))
    fresh = build_token_shards(spec, tokenizer, tmp_path / "fresh", cfg, filters=FilterConfig(min_chars=160))
    assert second["train"].stats.filters["length"] > first["train"].stats.filters["length"]
    assert [s.sha256 for s in second["train"].shards] == [s.sha256 for s in fresh["train"].shards]


def test_rank0_reports_a_failed_rank(mixed, tmp_path, tokenizer):
    out = tmp_path / "t"

    def fail() -> None:
        (out / "units").mkdir(parents=True, exist_ok=True)
        (out / "units" / "failed-rank1.json").write_text(json.dumps({"rank": 1, "error": "x.jsonl:3: invalid JSON"}))

    threading.Timer(1.0, fail).start()
    with pytest.raises(PipelineError, match=r"rank 1 failed: x.jsonl:3: invalid JSON"):
        build_token_shards(CorpusSpec(str(mixed)), tokenizer, out, TokenizeConfig(seq_len=16, unit_bytes=1500),
                           Runtime(rank=0, world=2))
    assert not list(out.rglob("manifest.json"))


def planted(folder: Path, kind: str) -> tuple[Path, str]:
    """A corpus folder with one bad file, and the message expected."""
    folder.mkdir()
    (folder / "good.txt").write_text(CORPUS_TEXTS[0])
    rows = "".join(json.dumps({"text": t}) + "\n" for t in CORPUS_TEXTS[:5])
    if kind == "suffix":
        (folder / "data.jsonl.xz").write_bytes(b"\xfd7zXZ")
        return folder, r"data.jsonl.xz: unknown suffix .jsonl.xz"
    if kind == "zst":
        packed = zstandard.ZstdCompressor().compress(rows.encode() * 40)
        (folder / "data.jsonl.zst").write_bytes(packed[:-9])
        return folder, r"data.jsonl.zst: truncated zstd stream"
    if kind == "gz":
        (folder / "data.txt.gz").write_bytes(gzip.compress(rows.encode())[:-12])
        return folder, r"data.txt.gz: corrupt or truncated gzip stream"
    if kind == "empty":
        (folder / "data.jsonl").write_text("")
        return folder, r"data.jsonl: empty file \(0 bytes\)"
    if kind == "column":
        (folder / "data.jsonl").write_text(rows + '{"content": "no text"}\n')
        return folder, r"data.jsonl:6: no column 'text' \(keys: \['content'\]\); pass --text-column"
    (folder / "data.jsonl").write_text(rows[:-30] + "\n" + rows)
    return folder, r"data.jsonl:5: invalid JSON \(column \d+: Unterminated string"


@pytest.mark.parametrize("kind", ["suffix", "zst", "gz", "empty", "column", "json"])
def test_bad_input_is_one_line_nonzero_exit_and_no_manifest(tmp_path, tokenizer_file, kind):
    corpus, message = planted(tmp_path / "corpus", kind)
    result = stage("tokenize", "--work", tmp_path / "w", "--corpus", corpus, "--tokenizer", tokenizer_file, *SMALL,
                   check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("tokenize[")]  # progress
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not list((tmp_path / "w").rglob("manifest.json"))


def test_tokenizer_trained_from_the_corpus_is_saved(mixed, tmp_path):
    work = tokens(tmp_path / "w", mixed)
    saved = Tokenizer.load(work / "tokenizer" / "tokenizer.model")
    assert read_manifest(work / "tokens" / "val", "tokens").meta.tokenizer_fingerprint == saved.fingerprint
    assert (work / "tokens" / "tokenizer.model").read_bytes() == saved.proto
