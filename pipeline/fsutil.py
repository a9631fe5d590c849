"""Small file-system helpers: atomic writes and hashing, so a killed process never leaves a file that
looks complete."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tmp_name(path: Path) -> Path:
    """The temporary name a file or folder is written under before its final rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise_missing(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        from pipeline.errors import PipelineError

        raise PipelineError(f"{path}: not valid JSON ({e}); {what} is corrupted, recreate it") from None


def raise_missing(path: Path, what: str) -> None:
    from pipeline.errors import PipelineError

    raise PipelineError(f"{path}: no such file; {what}")


def clean_stale_tmp(folder: Path) -> None:
    """Removes temporary files that a killed run left behind (never a completed file)."""
    for stale in folder.glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def clean_stale_tmp_of(path: Path) -> None:
    """Removes the temporary files a killed writer of `path` left behind, and only those: with several ranks
    each cleans the files it owns, never another rank's work in progress."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        stale.unlink(missing_ok=True)


def cached_sha256(cache: str | Path) -> Callable[[Path], str]:
    """`sha256_file` that remembers each file's digest in the JSON file `cache`, keyed by the file's resolved
    path, size and mtime_ns: a restart skips re-reading tens of GB of unchanged weights, and a file written
    since (new size or mtime) is hashed again. An unreadable cache counts as empty. (A rewrite that keeps both
    the size and the nanosecond mtime goes unnoticed; ordinary writes and copies change the mtime.)"""
    cache = Path(cache)

    def file_hash(path: Path) -> str:
        before = path.stat()
        key = str(path.resolve())
        entry = _hash_entries(cache).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) \
                and (entry.get("size"), entry.get("mtime_ns")) == (before.st_size, before.st_mtime_ns):
            return entry["sha256"]
        digest = sha256_file(path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not changed while read
            entries = _hash_entries(cache)  # re-read: another rank may have added its files meanwhile
            entries[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": digest}
            write_json(cache, entries)
        return digest

    return file_hash


def _hash_entries(cache: Path) -> dict[str, Any]:
    try:
        raw = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
