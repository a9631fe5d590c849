"""Small file-system helpers: atomic writes and hashing, so a killed process never leaves a file that
looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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


TMP_PATTERN = re.compile(r"^\.(.+)\.tmp-\d+$")  # what `tmp_name` makes: .NAME.tmp-PID


def list_names(folder: Path) -> set[str]:
    """The names in `folder` (none when it does not exist): one directory listing, no stat per entry."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except FileNotFoundError:
        return set()


def stale_tmp(names: set[str]) -> list[str]:
    """The temporary names (`tmp_name`'s) among a folder's listing: what killed writers left behind."""
    return sorted(name for name in names if TMP_PATTERN.match(name))


def cached_sha256(cache: str | Path | list[Path]) -> Callable[[Path], str]:
    """`sha256_file` that remembers each file's digest in the JSON file `cache`, keyed by the file's resolved
    path, size and mtime_ns: a restart skips re-reading tens of GB of unchanged weights, and a file written
    since (new size or mtime) is hashed again. An unreadable cache counts as empty. (A rewrite that keeps both
    the size and the nanosecond mtime goes unnoticed; ordinary writes and copies change the mtime.)
    Several caches (a list): each is looked in, in order; a new digest goes to the first whose folder can be
    written (e.g. beside the teacher, else in the output folder)."""
    caches = [Path(c) for c in cache] if isinstance(cache, list) else [Path(cache)]

    def file_hash(path: Path) -> str:
        before = path.stat()
        key = str(path.resolve())
        for one in caches:
            entry = _hash_entries(one).get(key)
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) \
                    and (entry.get("size"), entry.get("mtime_ns")) == (before.st_size, before.st_mtime_ns):
                return entry["sha256"]
        digest = sha256_file(path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not changed while read
            for one in caches:
                try:
                    entries = _hash_entries(one)  # re-read: another process may have added its files meanwhile
                    entries[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": digest}
                    write_json(one, entries)
                    break
                except OSError:
                    continue  # a read-only folder (a shared teacher): the next place
        return digest

    return file_hash


def _hash_entries(cache: Path) -> dict[str, Any]:
    try:
        raw = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
