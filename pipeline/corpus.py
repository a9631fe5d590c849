"""Corpus readers: each yields (document id, text) in a deterministic order and never holds the corpus.

Sources: `stdlib` (the running Python's standard-library sources, test suites excluded: the embedded
default), a local file or folder (.txt/.md one document per file; .jsonl/.json/.parquet/.csv with a text
column, read by `datasets`), or a Hugging Face dataset name (streamed; needs its cache or the network).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.settings import setting

PLAIN = (".txt", ".md")
TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusSpec:
    source: str = setting("stdlib", "stdlib, a file or folder of .txt/.md/.jsonl/.json/.parquet/.csv, or a Hugging Face "
                          "dataset name", flag="corpus")
    text_column: str = setting("text", "the text column of tabular files and datasets")
    dataset_split: str = setting("train", "the split of a Hugging Face dataset to read")

    def describe(self) -> str:
        return self.source if self.source != "stdlib" else f"stdlib:{stdlib_root()}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the document id: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def iter_documents(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    if spec.source == "stdlib":
        yield from _stdlib()
        return
    path = Path(spec.source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in PLAIN or p.suffix in TABULAR)
        if not files:
            raise PipelineError(f"{path}: no .txt/.md/.jsonl/.json/.parquet/.csv files; nothing to tokenize")
        for file in files:
            yield from _file(file, spec, str(file.relative_to(path)))
    elif path.is_file():
        yield from _file(path, spec, path.name)
    elif path.suffix or "/" in spec.source and path.parent.exists():
        raise PipelineError(f"{path}: no such file or folder; CORPUS takes stdlib, a path or a dataset name")
    else:
        yield from _hub(spec)


def _stdlib() -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if STDLIB_SKIP.isdisjoint(rel.parts) and not rel.name.startswith("test_"):
            yield str(rel), file.read_text(encoding="utf-8", errors="replace")


def _file(file: Path, spec: CorpusSpec, doc_id: str) -> Iterator[tuple[str, str]]:
    if file.suffix in PLAIN:
        yield doc_id, file.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    try:
        rows = datasets.load_dataset(TABULAR[file.suffix], data_files=str(file), split="train", streaming=True)
        yield from _rows(rows, spec, doc_id)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise PipelineError(f"{file}: cannot read as {TABULAR[file.suffix]} ({e})") from None


def _hub(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        rows = datasets.load_dataset(spec.source, split=spec.dataset_split, streaming=True)
    except Exception as e:  # datasets raises many types for "not cached and no network"
        raise PipelineError(
            f"dataset {spec.source!r} (split {spec.dataset_split!r}) could not be opened: {type(e).__name__}: {e}; "
            "it must be in the Hugging Face cache or reachable over the network"
        ) from None
    yield from _rows(rows, spec, spec.source)


def _rows(rows, spec: CorpusSpec, prefix: str) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    for i, row in enumerate(rows):
        if spec.text_column not in row:
            raise PipelineError(f"{prefix}: no column {spec.text_column!r} (columns: {sorted(row)}); pass --text-column")
        text = row[spec.text_column]
        if isinstance(text, str) and text:
            yield f"{prefix}#{i}", text
