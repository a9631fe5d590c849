"""Tokenize stage: tokens/s per worker against sentencepiece's own batch encode, 1 vs 2 workers, and peak
memory on a single-file corpus of ≥ 1 GB.

`run` (what `make bench` calls; `python -m benchmarks.run --only tokenize`):
- the stdlib sources written out as .txt files (3 copies, ~2k documents): our stage end to end (read in
  pieces, encode in sentencepiece batches, pack with numpy, write shards, records and manifests) with
  WORKERS=1 and 2, against `sp.encode(list_of_texts)` over the same texts already in memory, with the
  same sentencepiece threads per process (the stage gives each of a host's processes cores / WORKERS);
- one .txt file of `big_gb` GB (the stdlib sources repeated: one huge document), tokenized by
  `python -m stages.tokenize` in a subprocess: wall time, the peak RSS of its largest process and the
  peak PSS of all its processes together (shared library pages counted once), sampled from /proc.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import save, table
from pipeline.corpus import CorpusSpec, iter_documents
from pipeline.tokenizer import Tokenizer
from pipeline.tokens import TokenizeConfig, build_token_shards, encode_threads

COPIES = 3


def run(tokenizer: Tokenizer, big_gb: float = 1.0, workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    texts = [t for _, t in iter_documents(CorpusSpec("stdlib"))]
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        root = Path(tmp)
        corpus = _write_copies(root / "corpus", texts)
        all_texts = texts * COPIES
        tokens = sum(len(ids) for ids in tokenizer.sp.encode(all_texts[: len(texts)], num_threads=2)) * COPIES
        rows = []
        for n in workers:
            threads = encode_threads(n)
            sp_wall, sp_cpu = _timed(lambda t=threads: tokenizer.sp.encode(all_texts, num_threads=t))
            stage_wall, stage_cpu = _timed(lambda n=n: build_token_shards(
                CorpusSpec(str(corpus)), tokenizer, root / f"out{n}-{time.perf_counter_ns()}",
                TokenizeConfig(workers=n, unit_bytes=4 << 20, val_tokens=0)))
            rows.append({"workers": n, "sp threads/worker": threads, "tokens": tokens, "stage wall s": stage_wall,
                         "stage tok/s": tokens / stage_wall, "stage tok/CPU-s": tokens / stage_cpu,
                         "sp.encode tok/CPU-s": tokens / sp_cpu, "stage / sp (CPU)": sp_cpu / stage_cpu,
                         "stage / sp (wall, per worker)": sp_wall / stage_wall / n})
        print(table(f"Tokenize stage vs sentencepiece batch encode ({COPIES}× stdlib, "
                    f"{sum(map(len, all_texts)) / 1e6:.0f} M chars; CPU-s: all processes' CPU time, so "
                    "tok/CPU-s is tokens/s per worker on an idle core)", rows))
        big = None
        if big_gb > 0:
            big = _big_file(root, tokenizer, texts, big_gb, max(workers))
            print(table(f"Tokenize a single {big['file GB']:.2f} GB .txt file (one document), "
                        f"WORKERS={big['workers']}", [big]))
    return {"stdlib": rows, "big_file": big}


def _write_copies(folder: Path, texts: list[str]) -> Path:
    for copy in range(COPIES):
        (folder / f"c{copy}").mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"c{copy}" / f"{i:05d}.txt").write_text(text)
    return folder


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of the worker processes it waited for)."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


def _big_file(root: Path, tokenizer: Tokenizer, texts: list[str], gb: float, workers: int) -> dict[str, Any]:
    path = root / "big.txt"
    target = int(gb * (1 << 30))
    block = "".join(texts).encode()
    with open(path, "wb") as f:
        while f.tell() < target:
            f.write(block[: target - f.tell()] if f.tell() + len(block) > target else block)
    (root / "tok").mkdir()
    tokenizer.save(root / "tok" / "tokenizer.model")
    cmd = [sys.executable, "-m", "stages.tokenize", "--work", str(root / "big"), "--corpus", str(path),
           "--tokenizer", str(root / "tok" / "tokenizer.model"), "--workers", str(workers),
           # one document: its 16 MB byte ranges are split by their ids, so val gets about a tenth of them
           "--unit-bytes", str(16 << 20), "--val-fraction", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start, used = time.perf_counter(), _children_cpu()
    log = open(root / "big.log", "w+")  # noqa: SIM115 (read back after the process ends)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    peak_one = peak_all = 0
    while proc.poll() is None:
        tree = _tree(proc.pid)
        peak_one = max(peak_one, *(_rss(pid) for pid in tree), 0)
        peak_all = max(peak_all, sum(_pss(pid) for pid in tree))
        time.sleep(0.2)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - used
    log.seek(0)
    tail = log.read().strip().splitlines()[-1:]
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {tail}")
    tokens = _stage_tokens(root / "big" / "tokens")
    return {"file GB": path.stat().st_size / (1 << 30), "workers": workers, "seconds": seconds,
            "window tokens": tokens, "tok/s": tokens / seconds, "tok/CPU-s": tokens / cpu,
            "peak RSS largest process MB": peak_one / 1e6, "peak PSS all processes MB": peak_all / 1e6}


def _children_cpu() -> float:
    """CPU seconds of the child processes waited for (the stage and, through it, its workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _stage_tokens(tokens: Path) -> int:
    from schemas.manifest import read_manifest

    return sum(read_manifest(tokens / s, "tokens").stats.available_tokens or 0 for s in ("train", "val"))


def _tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: pages shared between the processes (torch's libraries) counted once overall."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        return int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tokenize", description=__doc__)
    p.add_argument("--work", type=Path, default=Path("runs/demo"))
    p.add_argument("--big-gb", type=float, default=1.0, help="size of the single-file corpus (0: skip it)")
    args = p.parse_args()
    from benchmarks.run import _tokenizer

    save(args.work / "bench", "tokenize", run(_tokenizer(args.work), args.big_gb))


if __name__ == "__main__":
    main()
