"""Corpus readers: the corpus is planned into work units fixed by the input alone, and each unit streams
its documents in bounded pieces, in a deterministic order, never holding a file whole.

Sources: `stdlib` (the running Python's standard-library sources, test suites excluded: the embedded
default); a local file or folder of `.txt`/`.md` (a file is one document, or with `text_docs` each
blank-line separated paragraph or each line), `.jsonl`/`.json` (one JSON
object per line, text in `text_column`), the same four compressed as `.gz` or `.zst` (e.g.
`data.jsonl.zst`), `.parquet` and `.csv` (a text column); a folder written by `Dataset.save_to_disk`; or a
Hugging Face dataset name (through `datasets`, from its cache or the network).

A unit (`Unit`) is a run of small files, or one slice of a large input: a byte range of ~`unit_bytes` of
an uncompressed text or JSON-lines file cut after a newline, a whole compressed file, a run of Parquet row
groups, or a contiguous shard of a dataset. Units depend on the input and `unit_bytes` only, so whatever
processes tokenize them, each unit's output is the same.

With `format` "chat" a document is a conversation: a JSON line, Parquet/CSV row or dataset row holding a
`messages` list of {role, content} (`messages_column`), or `prompt`/`response` (and optional `system`)
columns; it comes as one piece carrying its turns (pipeline/chat.py checks and normalises them, and an
error names the conversation's line or row). Plain `.txt`/`.md` files cannot hold conversations.

Document ids are stable: the file's path for a text file (with `@offset` for the byte ranges after the first
of a large one, or each paragraph/line's offset), `path@offset` for a JSON line (its byte offset in the
decompressed stream), `path#row` for Parquet/CSV rows and dataset rows. The split does not depend on them: it
is a hash of the document's content (`split_key`, `is_val`).
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import chat
from pipeline.errors import PipelineError
from pipeline.settings import setting
from schemas.tokens import FORMATS

PLAIN = (".txt", ".md")
LINES = (".jsonl", ".json")
TABLES = (".parquet", ".csv")
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
# Suffixes of data we cannot read: in a folder they are an error, not silently skipped.
UNREADABLE = {".bz2", ".xz", ".lz4", ".zip", ".tar", ".tgz", ".7z", ".arrow", ".feather", ".orc", ".avro"}
DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
BLOCK = 1 << 16  # bytes per read from a file
ZSTD_FEED = 1 << 14  # compressed bytes per decompress call: bounds the output of one call
TEXT_DOCS = ("file", "paragraph", "line")
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a paragraph ends at a line holding only whitespace
MAX_UNITS = 10**6  # shard names carry the unit index in 6 digits, so name order is unit order


@dataclass(frozen=True)
class CorpusSpec:
    source: str = setting("stdlib", "stdlib, a file or folder of .txt/.md/.jsonl/.json (optionally .gz/.zst), "
                          ".parquet/.csv, a save_to_disk folder, or a Hugging Face dataset name", flag="corpus")
    text_column: str = setting("text", "the text column of JSON lines, tables and datasets")
    dataset_split: str = setting("train", "the split of a Hugging Face dataset to read")
    format: str = setting("text", "text: documents; chat: conversations (a messages list of {role, content}, or "
                                  "prompt/response columns) in Gemma's chat template, only model turns trained; "
                                  "preference: prompt/chosen/rejected pairs for `make reward-model` "
                                  "(pipeline/preferences.py), written to WORK/preferences",
                          choices=(*FORMATS, "preference"))
    messages_column: str = setting("messages", "chat: the column holding each conversation's messages list")
    skip_bad_lines: int = setting(0, "1: skip malformed JSON lines and conversations (each named on stderr, "
                                     "counted as bad_lines in the train manifest's stats.filters) instead of stopping")
    text_docs: str = setting("file", "what a document is in a .txt/.md file: file (the whole file), paragraph "
                                     "(blank-line separated), line (one per non-blank line)", choices=TEXT_DOCS)

    @property
    def chat(self) -> bool:
        return self.format == "chat"

    def columns(self, names: list[str], where: str) -> list[str]:
        """The columns a table or dataset is read from: the text column, or a conversation's."""
        if not self.chat:
            if self.text_column not in names:
                raise PipelineError(f"{where}: no column {self.text_column!r} (columns: {sorted(names)}); pass "
                                    "--text-column")
            return [self.text_column]
        if self.messages_column in names:
            return [self.messages_column]
        if "prompt" in names and "response" in names:
            return ["prompt", "response"] + (["system"] if "system" in names else [])
        raise PipelineError(f"{where}: no {self.messages_column!r} column and no prompt/response columns (columns: "
                            f"{sorted(names)}); pass --messages-column")

    def describe(self) -> str:
        return self.source if self.source != "stdlib" else f"stdlib:{stdlib_root()}"


@dataclass(frozen=True)
class Part:
    """A slice of one input. `start`/`stop` are bytes (text, lines), row groups (parquet) or rows (dataset);
    `stop` None means to the end. `version` (size and mtime, or a dataset's fingerprint) makes a changed
    input a different part, so its unit is redone."""

    path: str  # relative to the corpus root; a dataset's name or folder
    kind: str  # text | lines | parquet | csv | dataset
    version: str
    start: int = 0
    stop: int | None = None
    weight: int = 0  # bytes, for grouping small inputs into one unit


@dataclass(frozen=True)
class Unit:
    index: int
    parts: tuple[Part, ...]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "parts": [vars(p) for p in self.parts]}


@dataclass(frozen=True)
class Piece:
    """A document, or a bounded piece of one: `first` starts the document, `last` ends it; `after_newline`:
    the document's text before this piece ends with a newline (so the piece can be encoded as if it
    followed one, see pipeline/tokens.py)."""

    doc_id: str
    text: str
    first: bool = True
    last: bool = True
    after_newline: bool = False
    turns: tuple[chat.Turn, ...] | None = None  # a conversation (format chat): its turns, and no text
    bad: str | None = None  # a malformed line skipped under `skip_bad_lines`: why (no document, only counted)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_key(piece: Piece) -> str:
    """What decides a document's split: its content, never where it lives (so moving, renaming or
    recompressing a corpus keeps its held-out set) — the text of the document's first piece (the whole text
    of a document shorter than a piece), or a conversation's turns. Identical documents share a split."""
    if piece.turns is not None:
        return json.dumps([list(t) for t in piece.turns], ensure_ascii=False)
    return piece.text


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of `split_key`: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


class Splitter:
    """Each piece's split: decided at a document's first piece (a new id, or `first`), kept for its others."""

    def __init__(self, val_fraction: float) -> None:
        self.val_fraction, self.doc_id, self.val = val_fraction, None, False

    def __call__(self, piece: Piece) -> str:
        if piece.doc_id != self.doc_id or piece.first:
            self.doc_id, self.val = piece.doc_id, is_val(split_key(piece), self.val_fraction)
        return "val" if self.val else "train"


def iter_documents(spec: CorpusSpec, unit_bytes: int = 64 << 20, piece_bytes: int = 64 << 10) -> Iterator[tuple[str, str]]:
    """(document id, text) in corpus order; a document longer than `piece_bytes` comes as consecutive pieces
    with the same id."""
    for _, doc_id, text in iter_split_documents(spec, unit_bytes, piece_bytes, 0.0):
        yield doc_id, text


def iter_split_documents(spec: CorpusSpec, unit_bytes: int, piece_bytes: int,
                         val_fraction: float) -> Iterator[tuple[str, str, str]]:
    """(split, document id, text) of every piece in corpus order."""
    for unit in plan_units(spec, unit_bytes):
        split = Splitter(val_fraction)
        for piece in read_unit(spec, unit, piece_bytes):
            if piece.bad is None:
                yield split(piece), piece.doc_id, piece.text


# ---------------------------------------------------------------- planning


def plan_units(spec: CorpusSpec, unit_bytes: int) -> list[Unit]:
    """The corpus as work units, from file sizes, a few seeks and metadata only (no full read)."""
    if unit_bytes < 1:
        raise PipelineError(f"--unit-bytes {unit_bytes}: must be positive")
    parts = _parts(spec, unit_bytes)
    units, group, weight = [], [], 0
    for part in parts:
        if group and weight + part.weight > unit_bytes:
            units.append(Unit(len(units), tuple(group)))
            group, weight = [], 0
        group.append(part)
        weight += part.weight
    if group:
        units.append(Unit(len(units), tuple(group)))
    if len(units) >= MAX_UNITS:
        raise PipelineError(f"{spec.describe()}: {len(units)} work units; raise --unit-bytes (now {unit_bytes})")
    return units


def corpus_root(spec: CorpusSpec) -> Path:
    if spec.source == "stdlib":
        return stdlib_root()
    path = Path(spec.source)
    return path.parent if path.is_file() else path


def _parts(spec: CorpusSpec, unit_bytes: int) -> list[Part]:
    if spec.source == "stdlib":
        root = stdlib_root()
        files = [f for f in stdlib_files(root) if f.stat().st_size]  # empty __init__.py files: not documents
        return [p for f in files for p in _file_parts(f, f.relative_to(root).as_posix(), unit_bytes, "text",
                                                       spec.text_docs)]
    path = Path(spec.source)
    if path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS):
        return _dataset_parts(spec, unit_bytes)
    if path.is_dir():
        return [p for f in _folder_files(path)
                for p in _file_parts(f, f.relative_to(path).as_posix(), unit_bytes, text_docs=spec.text_docs)]
    if path.is_file():
        return _file_parts(path, path.name, unit_bytes, text_docs=spec.text_docs)
    if path.suffix or "/" in spec.source and path.parent.exists():
        raise PipelineError(f"{path}: no such file or folder; CORPUS takes stdlib, a path or a dataset name")
    return _dataset_parts(spec, unit_bytes)


def stdlib_files(root: Path) -> list[Path]:
    """The .py files outside test suites and site-packages (pruned while walking: site-packages is large)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files)


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not f.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            file_kind(f)
            files.append(f)
        except PipelineError:
            if UNREADABLE & set(f.suffixes) or set(COMPRESSED) & set(f.suffixes):
                raise
    if not files:
        raise PipelineError(f"{folder}: no .txt/.md/.jsonl/.json (.gz/.zst), .parquet or .csv files; nothing to tokenize")
    return files


def file_kind(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from the suffixes, e.g. `a.jsonl.zst` → ("lines", "zstd")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSED.get(suffixes[-1]) if suffixes else None
    base = (suffixes[-2] if len(suffixes) > 1 else "") if compression else (suffixes[-1] if suffixes else "")
    if base in PLAIN:
        return "text", compression
    if base in LINES:
        return "lines", compression
    if base in TABLES and compression is None:
        return base[1:], None
    raise PipelineError(
        f"{path}: unknown suffix {''.join(path.suffixes) or '(none)'}; readable: .txt .md .jsonl .json (each "
        "optionally .gz or .zst), .parquet, .csv"
    )


def _file_parts(path: Path, rel: str, unit_bytes: int, kind: str | None = None, text_docs: str = "file") -> list[Part]:
    compression = None
    if kind is None:
        kind, compression = file_kind(path)
    stat = path.stat()
    if stat.st_size == 0:
        raise PipelineError(f"{path}: empty file (0 bytes); remove it or replace it with the complete file")
    version = f"{stat.st_size}:{stat.st_mtime_ns}"
    if kind == "parquet":
        return _parquet_parts(path, rel, version, unit_bytes)
    if kind in ("text", "lines") and compression is None and stat.st_size > unit_bytes:
        if kind == "text" and text_docs == "paragraph":
            cuts = _paragraph_cut_points(path, stat.st_size, unit_bytes)
        else:
            cuts = _cut_points(path, stat.st_size, unit_bytes, whole_lines=kind == "lines" or text_docs == "line")
        return [Part(rel, kind, version, a, b if b < stat.st_size else None, b - a) for a, b in zip(cuts, cuts[1:])]
    return [Part(rel, kind, version, weight=stat.st_size)]


def _cut_points(path: Path, size: int, unit_bytes: int, whole_lines: bool) -> list[int]:
    """Offsets 0 < … < size, each just after the first newline at or past a multiple of unit_bytes. A text
    file without a newline in the next block is cut at the multiple itself (on a UTF-8 character
    boundary); a JSON-lines file is read on to its next newline, since a line cannot be split."""
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(unit_bytes, size, unit_bytes):
            if target <= cuts[-1]:
                continue  # a long line ran past this multiple
            cut, at = None, target
            f.seek(target)
            if not whole_lines:  # text: after a newline that a non-whitespace character follows (`text_cut`)
                m = _TEXT_CUT.search(f.read(BLOCK + 1))
                if m and cuts[-1] < target + m.start() + 1 < size:
                    cuts.append(target + m.start() + 1)
                    continue
                f.seek(target)
            while cut is None and (block := f.read(BLOCK)):
                nl = block.find(b"\n")
                if nl >= 0:
                    cut = at + nl + 1
                elif not whole_lines:
                    cut = _char_boundary(f, target)
                at += len(block)
            if cut is not None and cuts[-1] < cut < size:
                cuts.append(cut)
    return cuts + [size]


def _paragraph_cut_points(path: Path, size: int, unit_bytes: int) -> list[int]:
    """Like `_cut_points`, each cut just after the first blank line at or past a multiple of unit_bytes, so
    every unit starts with a whole paragraph (a file without one further on is not cut there)."""
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(unit_bytes, size, unit_bytes):
            if target <= cuts[-1]:
                continue
            at = max(0, target - 1)  # a blank line may begin with the newline just before the multiple
            f.seek(at)
            buf, cut = b"", None
            while cut is None and (block := f.read(BLOCK)):
                buf += block
                m = _BLANK_LINE.search(buf)
                if m:
                    cut = at + m.end()
                else:
                    keep = max(0, buf.rfind(b"\n"))  # a blank line may straddle the next block
                    at, buf = at + keep, buf[keep:]
            if cut is not None and cuts[-1] < cut < size:
                cuts.append(cut)
    return cuts + [size]


def _char_boundary(f: Any, offset: int) -> int:
    """The nearest offset ≤ `offset` that does not fall inside a UTF-8 character."""
    start = max(0, offset - 3)
    f.seek(start)
    head = f.read(offset - start + 1)
    for i in range(offset - start, -1, -1):
        if i >= len(head) or head[i] & 0xC0 != 0x80:  # not a continuation byte
            return start + i
    return offset


def _parquet_parts(path: Path, rel: str, version: str, unit_bytes: int) -> list[Part]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: not a readable Parquet file ({e}); re-download or rewrite it") from None
    parts, start, weight = [], 0, 0
    for g in range(meta.num_row_groups):
        size = meta.row_group(g).total_byte_size
        if g > start and weight + size > unit_bytes:
            parts.append(Part(rel, "parquet", version, start, g, weight))
            start, weight = g, 0
        weight += size
    parts.append(Part(rel, "parquet", version, start, meta.num_row_groups, max(weight, 1)))
    return parts


def _dataset_parts(spec: CorpusSpec, unit_bytes: int) -> list[Part]:
    ds = open_dataset(spec)
    spec.columns(ds.column_names, f"dataset {spec.source!r}")
    rows = ds.num_rows
    nbytes = sum(Path(f["filename"]).stat().st_size for f in ds.cache_files) or ds.data.nbytes
    shards = max(1, min(rows, -(-nbytes // unit_bytes)))
    version = f"{ds._fingerprint}:{rows}"
    return [Part(spec.source, "dataset", version, a, b, max(1, nbytes * (b - a) // max(1, rows)))
            for a, b in _contiguous_shards(rows, shards)]


def _contiguous_shards(rows: int, shards: int) -> list[tuple[int, int]]:
    """Row ranges of `datasets.Dataset.shard(shards, k, contiguous=True)`, k = 0…shards-1."""
    div, mod = divmod(rows, shards)
    starts = [div * k + min(k, mod) for k in range(shards + 1)]
    return list(zip(starts, starts[1:]))


@functools.lru_cache(maxsize=4)
def open_dataset(spec: CorpusSpec) -> Any:
    """A local `save_to_disk` folder or a Hugging Face dataset (memory-mapped Arrow: nothing is held)."""
    import datasets

    path = Path(spec.source)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise PipelineError(f"{path}: not a readable save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.dataset_split not in ds:
                raise PipelineError(f"{path}: no split {spec.dataset_split!r} (splits: {sorted(ds)}); pass --dataset-split")
            ds = ds[spec.dataset_split]
        return ds
    try:
        return datasets.load_dataset(spec.source, split=spec.dataset_split)
    except Exception as e:  # datasets raises many types for "not cached and no network"
        raise PipelineError(
            f"dataset {spec.source!r} (split {spec.dataset_split!r}) could not be opened: {type(e).__name__}: {e}; "
            "it must be in the Hugging Face cache or reachable over the network"
        ) from None


# ---------------------------------------------------------------- reading


def read_unit(spec: CorpusSpec, unit: Unit, piece_bytes: int = 64 << 10) -> Iterator[Piece]:
    root = corpus_root(spec)
    for part in unit.parts:
        if part.kind == "text" and spec.chat:
            raise PipelineError(f"{root / part.path}: plain text holds no conversations; FORMAT=chat reads JSON lines, "
                                "Parquet, CSV or a dataset with a messages list or prompt/response columns")
        if part.kind == "text" and spec.text_docs != "file":
            yield from _text_docs(root / part.path, part, piece_bytes, spec.text_docs == "line")
        elif part.kind == "text":
            yield from _text(root / part.path, part, piece_bytes)
        elif part.kind == "lines":
            yield from _lines(root / part.path, part, spec, piece_bytes)
        elif part.kind == "parquet":
            yield from _parquet(root / part.path, part, spec)
        elif part.kind == "csv":
            yield from _csv(root / part.path, part, spec)
        else:
            yield from _dataset(spec, part)


def _text(path: Path, part: Part, piece_bytes: int) -> Iterator[Piece]:
    """One document, in pieces of about `piece_bytes` cut after a newline where there is one."""
    doc_id = part.path if part.start == 0 else f"{part.path}@{part.start}"
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    held, first, newline = None, part.start == 0, part.start > 0 and _byte_before(path, part.start) == b"\n"
    for chunk in _chunks(_blocks(path, part), piece_bytes, whole_lines=False):
        text = decoder.decode(chunk)
        if held is not None:
            yield Piece(doc_id, held, first, False, newline)
            first, newline = False, held.endswith("\n")
        held = text
    held = (held or "") + decoder.decode(b"", final=True)
    if held:
        yield Piece(doc_id, held, first, part.stop is None, newline)


class _DocPieces:
    """One document of a text file read as paragraphs or lines: its bytes gathered and handed on in pieces of
    about `piece_bytes` (cut after a newline where there is one), decoded incrementally (a cut inside a
    character is not a replacement character)."""

    def __init__(self, doc_id: str, piece_bytes: int) -> None:
        self.doc_id, self.piece_bytes = doc_id, piece_bytes
        self.buf = bytearray()
        self.first, self.after_newline = True, False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, data: bytes) -> Iterator[Piece]:
        self.buf += data
        while len(self.buf) > self.piece_bytes:
            cut = text_cut(self.buf, self.piece_bytes) or self.piece_bytes
            yield from self._piece(bytes(self.buf[:cut]), last=False)
            del self.buf[:cut]

    def end(self) -> Iterator[Piece]:
        """The last piece, without the document's final line break."""
        data = bytes(self.buf)
        data = data[:-1] if data.endswith(b"\n") else data
        data = data[:-1] if data.endswith(b"\r") else data
        yield from self._piece(data, last=True)

    def _piece(self, data: bytes, last: bool) -> Iterator[Piece]:
        text = self.decoder.decode(data, final=last)
        if text or (last and not self.first):
            yield Piece(self.doc_id, text, self.first, last, self.after_newline)
            self.first, self.after_newline = False, text.endswith("\n")


def _text_docs(path: Path, part: Part, piece_bytes: int, per_line: bool) -> Iterator[Piece]:
    """Documents of a text file: blank-line separated paragraphs, or non-blank lines (`per_line`), each with id
    `path@offset` (its first byte). A unit starts at a document's start (cut after a blank line / a newline).
    Memory: one piece of the current document, whatever its length or the file's."""
    offset, doc, midline = part.start, None, False
    line = bytearray()  # the current line so far (a line longer than a piece goes on to the document at once)
    for chunk in _chunks(_blocks(path, part), piece_bytes, whole_lines=False):
        pos = 0
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            end = len(chunk) if nl < 0 else nl + 1
            line += chunk[pos:end]
            pos = end
            if nl < 0 and len(line) < piece_bytes:
                continue  # the line goes on in the next chunk
            start, offset = offset, offset + len(line)
            if nl >= 0 and not midline and not line.strip():  # a blank line ends a paragraph (and is no document)
                if doc is not None:
                    yield from doc.end()
                doc = None
            else:
                if doc is None:
                    doc = _DocPieces(f"{part.path}@{start}", piece_bytes)
                yield from doc.add(bytes(line))
                if per_line and nl >= 0:
                    yield from doc.end()
                    doc = None
            line.clear()
            midline = nl < 0
    if line:
        if doc is None and line.strip():
            doc = _DocPieces(f"{part.path}@{offset}", piece_bytes)
        if doc is not None:
            yield from doc.add(bytes(line))
    if doc is not None:
        yield from doc.end()


def _byte_before(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset - 1)
        return f.read(1)


def _lines(path: Path, part: Part, spec: CorpusSpec, piece_bytes: int) -> Iterator[Piece]:
    """One document (or conversation) per JSON line; blank lines are skipped, a null text too."""
    offset, line = part.start, 0
    for chunk in _chunks(_blocks(path, part), piece_bytes, whole_lines=True):
        for raw in chunk.split(b"\n")[: -1 if chunk.endswith(b"\n") else None]:
            line += 1
            at = offset
            offset += len(raw) + 1
            if not raw.strip():
                continue
            where = functools.partial(_where, path, part, line)
            try:
                if spec.chat:
                    yield Piece(f"{part.path}@{at}", "", turns=chat.from_row(_json_row(raw, where),
                                                                               spec.messages_column, where))
                    continue
                text = _json_text(raw, spec.text_column, where)
            except PipelineError as e:
                if not spec.skip_bad_lines:
                    raise PipelineError(f"{e} (or skip such lines with SKIP_BAD_LINES=1)") from None
                yield Piece(f"{part.path}@{at}", "", bad=str(e))
                continue
            if text:
                yield Piece(f"{part.path}@{at}", text)


def _json_row(raw: bytes, where: Any) -> dict[str, Any]:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = f"column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise PipelineError(f"{where()}: invalid JSON ({reason}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise PipelineError(f"{where()}: a JSON {type(row).__name__}, expected one object per line")
    return row


def _json_text(raw: bytes, column: str, where: Any) -> str | None:
    row = _json_row(raw, where)
    if column not in row:
        raise PipelineError(f"{where()}: no column {column!r} (keys: {sorted(row)}); pass --text-column")
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise PipelineError(f"{where()}: column {column!r} is a {type(text).__name__}, expected a string")
    return text


def _where(path: Path, part: Part, line: int) -> str:
    """`file:line`, counting the lines before a byte range only now, when an error needs it."""
    before = 0
    if part.start:
        with open(path, "rb") as f:
            left = part.start
            while left > 0 and (block := f.read(min(BLOCK << 4, left))):
                before += block.count(b"\n")
                left -= len(block)
    return f"{path}:{before + line}"


def _blocks(path: Path, part: Part) -> Iterator[bytes]:
    """The part's bytes, decompressed, in blocks; a corrupt or truncated stream is an error naming the file."""
    compression = COMPRESSED.get(path.suffix.lower())
    try:
        with open(path, "rb") as f:
            if compression == "gzip":
                yield from _gzip_blocks(path, f)
            elif compression == "zstd":
                yield from _zstd_blocks(path, f)
            else:
                f.seek(part.start)
                left = (part.stop if part.stop is not None else path.stat().st_size) - part.start
                while left > 0 and (block := f.read(min(BLOCK, left))):
                    left -= len(block)
                    yield block
    except FileNotFoundError:
        raise PipelineError(f"{path}: disappeared while reading; restore it and rerun") from None


def _gzip_blocks(path: Path, f: Any) -> Iterator[bytes]:
    got = 0
    try:
        with gzip.GzipFile(fileobj=f) as g:
            while block := g.read(BLOCK):
                got += len(block)
                yield block
    except (OSError, EOFError, zlib.error) as e:
        raise PipelineError(f"{path}: corrupt or truncated gzip stream after {got} bytes ({e}); "
                            "re-download or recompress it") from None
    if got == 0:
        raise PipelineError(f"{path}: decompresses to nothing; remove it or replace it with the complete file")


def _zstd_blocks(path: Path, f: Any) -> Iterator[bytes]:
    """Frame by frame, so a truncated last frame is noticed (zstandard's stream reader ends silently)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, fed, got = dctx.decompressobj(), False, 0
    try:
        while data := f.read(ZSTD_FEED):
            while data:
                out = obj.decompress(data)
                fed = True
                if out:
                    got += len(out)
                    yield out
                if obj.eof:  # a frame ended; what follows may be another frame
                    data, obj, fed = obj.unused_data, dctx.decompressobj(), False
                else:
                    data = b""
    except zstandard.ZstdError as e:
        raise PipelineError(f"{path}: corrupt zstd stream after {got} bytes ({e}); re-download or recompress it") from None
    if fed:
        raise PipelineError(f"{path}: truncated zstd stream (the last frame ends early, after {got} bytes); "
                            "re-download or recompress it")
    if got == 0:
        raise PipelineError(f"{path}: decompresses to nothing; remove it or replace it with the complete file")


_TEXT_CUT = re.compile(rb"\n(?=[^ \t\r\n\f\v])")  # a newline before a character that is not whitespace


def text_cut(buf: bytes | bytearray, size: int) -> int:
    """Where to cut text of which `size` bytes are wanted: just after the last newline before `size` that a
    non-whitespace character follows — never inside a run of whitespace, which a tokenizer may merge into one
    piece (`\\n\\n`, or `▁▁` under SentencePiece's normaliser); else the first such newline within 2 × size;
    else after the last newline; 0: none."""
    nl = buf.rfind(b"\n", 0, size)
    while nl >= 0 and (nl + 1 == len(buf) or buf[nl + 1] in b" \t\r\n\f\v"):
        nl = buf.rfind(b"\n", 0, nl)
    if nl >= 0:
        return nl + 1
    m = _TEXT_CUT.search(buf, max(0, size - 1), 2 * size)  # past `size`, at the end of a whitespace run
    return m.start() + 1 if m else buf.rfind(b"\n", 0, size) + 1


def _chunks(blocks: Iterator[bytes], size: int, whole_lines: bool) -> Iterator[bytes]:
    """Blocks regrouped into chunks of at most `size` bytes that end just after a newline (text: one that a
    non-whitespace character follows, `text_cut`). A line longer than `size` is cut at `size` (text), or
    kept whole in its own chunk (`whole_lines`: a JSON line)."""
    buf = bytearray()
    for block in blocks:
        buf += block
        while len(buf) >= size:
            cut = buf.rfind(b"\n", 0, size) + 1 if whole_lines else text_cut(buf, size)
            if cut == 0:
                cut = buf.find(b"\n") + 1 if whole_lines else size
                if cut == 0:
                    break  # a long JSON line: read on to its end
            yield bytes(buf[:cut])
            del buf[:cut]
    if buf:
        yield bytes(buf)


def _parquet(path: Path, part: Part, spec: CorpusSpec) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        columns = spec.columns(f.schema_arrow.names, str(path))
        row = sum(f.metadata.row_group(g).num_rows for g in range(part.start))
        for batch in f.iter_batches(batch_size=1024, row_groups=range(part.start, part.stop), columns=columns):
            yield from _batch_pieces(path, part.path, batch, row, spec)
            row += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: not a readable Parquet file ({e}); re-download or rewrite it") from None


def _csv(path: Path, part: Part, spec: CorpusSpec) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        columns = [spec.text_column]
        if spec.chat:
            with pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16)) as head:
                columns = spec.columns(head.schema.names, str(path))
        convert = pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22), convert_options=convert)
        row = 0
        for batch in reader:
            yield from _batch_pieces(path, part.path, batch, row, spec)
            row += batch.num_rows
    except pa.ArrowKeyError:
        raise PipelineError(f"{path}: no column {spec.text_column!r} in the CSV header; pass --text-column") from None
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: not a readable CSV file ({e})") from None


def _batch_pieces(path: Path, rel: str, batch: Any, row: int, spec: CorpusSpec) -> Iterator[Piece]:
    """A record batch's documents: its text column, or its conversations."""
    if not spec.chat:
        yield from _column_pieces(path, rel, batch.column(0), row)
        return
    for i, values in enumerate(batch.to_pylist()):
        where = functools.partial(str, f"{path} row {row + i}")
        yield Piece(f"{rel}#{row + i}", "", turns=chat.from_row(values, spec.messages_column, where))


def _column_pieces(path: Path, rel: str, values: Any, row: int) -> Iterator[Piece]:
    import pyarrow as pa

    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise PipelineError(f"{path}: the text column is {values.type}, expected strings; pass --text-column")
    for i, text in enumerate(values.to_pylist()):
        if text:
            yield Piece(f"{rel}#{row + i}", text)


def _dataset(spec: CorpusSpec, part: Part) -> Iterator[Piece]:
    """The rows of one contiguous shard (what `Dataset.shard(n, k, contiguous=True)` holds)."""
    ds = open_dataset(spec)
    ds = ds.select_columns(spec.columns(ds.column_names, f"dataset {spec.source!r}"))
    row = part.start
    for batch in ds.select(range(part.start, part.stop)).iter(batch_size=1024):
        if spec.chat:
            names = list(batch)
            for values in zip(*batch.values()):
                where = functools.partial(str, f"dataset {spec.source!r} row {row}")
                yield Piece(f"{part.path}#{row}", "", turns=chat.from_row(dict(zip(names, values)),
                                                                          spec.messages_column, where))
                row += 1
            continue
        for text in batch[spec.text_column]:
            if isinstance(text, str) and text:
                yield Piece(f"{part.path}#{row}", text)
            row += 1
