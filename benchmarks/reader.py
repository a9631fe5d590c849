"""Streaming reader: tokens/s a rank receives, its peak memory, and how long a training step waits for data.

`run` (what `make bench` calls): the demo cache, against what the demo student consumes.

`python -m benchmarks.reader` (the real scale): a synthetic cache at SEQ_LEN 4096, V = 256000, K = 64,
N = 16 tail draws, written with `schemas.logits.encode` and the capture's shard writer (its row groups:
`schemas.logits.row_bytes`, 2 windows at this length; `--group-windows` writes another size, 33 being the
64 MB groups of caches written before), then:
- the mixing of the 2B recipe's global batch (2^20 tokens = 256 windows, default shuffle buffer): distinct
  regions (the reader's shuffle unit) and distinct row groups per global batch, over several batches;
- one process per measurement, pinned to one core, reading as rank 0 of WORLD ranks: tokens/s delivered to
  the rank (it reads the row groups its rows touch and decodes only its rows), row groups read, peak RSS,
  and with a simulated training step the time a step waits for its batch;
- the data wait per optimizer step at `--grad-accum` micro-batches (16: the 2B recipe on 8 GPUs, batch 2),
  the trainer taking each micro-batch when its turn comes, a simulated compute of `--student-tok-s` between.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import table
from pipeline.errors import PipelineError
from pipeline.reader import Cursor, ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from pipeline.shards import ShardWriter, rows_per_group
from schemas.common import with_meta
from schemas.logits import MODE_COLUMNS, LogitsMeta, LogitsShardMeta, Targets, encode, logits_schema, row_bytes
from schemas.manifest import LogitsStats, shard_record, write_manifest


def run(cache: Path, student_tok_s: float | None, batch: int = 16, seconds: float = 10.0) -> dict[str, Any]:
    rows = []
    for columns, label in ((MODE_COLUMNS["tail"], "top-K + tail"), (MODE_COLUMNS["sampled"], "+ tail draws")):
        try:
            stream = ShardStream(cache, columns, ReaderConfig(batch_size=batch))
        except PipelineError as e:  # a cache without tail draws has no `sampled` columns
            rows.append({"columns": label, "rows_s": None, "tok_s": None, "vs_student": None, "note": str(e)[-60:]})
            continue
        seq = stream.meta.seq_len
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += len(stream.next_batch()["input_ids"])
        rate = n / (time.perf_counter() - start)
        stream.close()
        rows.append({"columns": label, "rows_s": rate, "tok_s": rate * seq,
                     "vs_student": rate * seq / student_tok_s if student_tok_s else None, "note": ""})
    print(table(f"Reader over {cache} (shuffled, batch {batch}; student consumes {student_tok_s or 0:,.0f} tok/s)", rows))
    return {"rows": rows, "student_tok_s": student_tok_s}


# --- the real-scale benchmark ---------------------------------------------------------------------------


def write_cache(folder: Path, windows: int, seq_len: int, vocab: int, topk: int, samples: int,
                shard_windows: int = 64, seed: int = 0, group_windows: int = 0) -> Path:
    """A synthetic cache split with a manifest: random ids, sorted log-probs, tail mass and tail draws."""
    split = folder / "train"
    if (split / "manifest.json").is_file():
        return split
    rng = np.random.default_rng(seed)
    meta = LogitsMeta(seq_len=seq_len, vocab_size=vocab, topk=topk, samples=samples, sample_seed=0,
                      tokenizer_fingerprint="synthetic", teacher_fingerprint="synthetic", split="train")
    schema = logits_schema(seq_len, topk, samples)
    records = []
    for s, start in enumerate(range(0, windows, shard_windows)):
        n = min(shard_windows, windows - start)
        path = split / f"train-{s:05d}.parquet"
        shard_meta = LogitsShardMeta(**vars(meta), source_shard=path.name, source_sha256="synthetic")
        group = group_windows or rows_per_group(row_bytes(seq_len, topk, samples), seq_len)
        with ShardWriter(path, with_meta(schema, shard_meta), group) as writer:
            for lo in range(0, n, 8):
                b = min(8, n - lo)
                ids = rng.integers(3, vocab, (b, seq_len + 1), dtype=np.int32)
                ids[:, 0] = 2  # <bos>
                writer.write(encode(_targets(rng, b, seq_len, vocab, topk, samples), np.arange(start + lo, start + lo + b),
                                    ids, np.zeros(b, bool), schema))
        records.append(shard_record(path, n, seq_len))
    write_manifest(split, meta, records, LogitsStats(bytes_per_token=0.0, mean_tail_mass=0.0, mean_teacher_entropy=0.0))
    return split


def _targets(rng: np.random.Generator, b: int, t: int, vocab: int, k: int, n: int) -> Targets:
    positions = b * t
    logp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), positions)[:, :k]), axis=1)[:, ::-1]
    # N draws among 24 candidates a position: ≈11 distinct ids, as a peaked tail gives.
    draws = np.sort(np.take_along_axis(rng.integers(0, vocab, (positions, 24)), rng.integers(0, 24, (positions, n)), 1), 1)
    first = np.ones_like(draws, dtype=bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = np.flatnonzero(first.ravel())
    counts = np.diff(np.append(starts, draws.size))
    offsets = np.concatenate([[0], np.cumsum(first.sum(1))])
    return Targets(topk_ids=rng.integers(0, vocab, (b, t, k), dtype=np.int32),
                   topk_logprobs=logp.reshape(b, t, k).astype(np.float16),
                   tail_mass=rng.random((b, t), dtype=np.float32) * 0.3, entropy=np.zeros((b, t), np.float32),
                   sample_ids=draws.ravel()[starts].astype(np.int32), sample_counts=counts.astype(np.uint16),
                   sample_offsets=offsets.astype(np.int32))


def mixing(split: Path, batch_windows: int, batches: int) -> dict[str, Any]:
    """Distinct regions and row groups per global batch of `batch_windows` windows (the order alone: nothing
    is read but the footers)."""
    stream = ShardStream(split, ("input_ids",), ReaderConfig(batch_size=batch_windows, prefetch=0))
    order, cursor = stream._order, Cursor()
    regions, groups = [], []
    for _ in range(batches):
        shard, row, cursor = order.regions_of(cursor, batch_windows)
        regions.append(len(set(zip(shard.tolist(), ((row % order.group) // order.unit + row // order.group
                                                    * order.per_group).tolist()))))
        groups.append(len(set(zip(shard.tolist(), (row // order.group).tolist()))))
    stream.close()
    return {"windows": batch_windows, "group_windows": order.group, "region_windows": order.unit,
            "buffer_regions": order.per_buffer, "regions_min": min(regions), "regions_mean": float(np.mean(regions)),
            "row_groups_min": min(groups), "row_groups_mean": float(np.mean(groups))}


def measure(split: Path, mode: str, batch: int, world: int, seconds: float, step_s: float, core: int,
            accum: int = 0) -> dict[str, Any]:
    """One rank's numbers, in this process (pinned to `core`): run as a subprocess per measurement. With
    `accum`, steps of `accum` micro-batches, each taken when its turn comes and followed by `step_s` of
    simulated compute; the wait is summed per optimizer step."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    stream = ShardStream(split, MODE_COLUMNS[mode], ReaderConfig(batch_size=batch), Runtime(rank=0, world=world))
    seq = stream.meta.seq_len
    stream.next_batch()  # the first batch is read before training starts
    if step_s:
        time.sleep(2.0)  # the prefetch fills, as during the first (compiling) steps of a real run
    rows, waits, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        step_wait = 0.0
        for _ in range(max(1, accum)):
            t = time.perf_counter()
            rows += len(stream.next_batch()["input_ids"])
            step_wait += time.perf_counter() - t
            if step_s:
                time.sleep(step_s)  # the GPU's micro-step: the core is free for the prefetch thread meanwhile
        waits.append(step_wait)
    elapsed = time.perf_counter() - start
    groups = stream._order.groups_read
    stream.close()
    out = {"mode": mode, "world": world, "batch": batch, "accum": accum, "step_s": step_s * max(1, accum),
           "tok_s_per_rank": rows * seq / elapsed, "tok_s_read": rows * seq * world / elapsed,
           "groups_read_per_window": groups / max(1, rows + batch),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "wait_ms_mean": 1e3 * float(np.mean(waits)), "wait_ms_p99": 1e3 * float(np.percentile(waits, 99))}
    if accum:
        out["wait_pct_of_step"] = 100 * float(np.mean(waits)) / (step_s * accum)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="where the synthetic cache is (re)used (default: a temporary folder)")
    p.add_argument("--windows", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="windows per rank per micro-step (the 2B recipe's)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--student-tok-s", type=float, default=20000.0,
                   help="a training step's pace for the wait measurement (tokens/s per GPU; 2B on an H100 ≈ 20k)")
    p.add_argument("--group-windows", type=int, default=0,
                   help="rows per row group of the synthetic cache (default: stage one's, row_bytes)")
    p.add_argument("--batch-tokens", type=int, default=1 << 20, help="tokens per optimizer step (the 2B recipe's)")
    p.add_argument("--grad-accum", type=int, default=16, help="micro-batches per step for the wait per step")
    p.add_argument("--accum-world", type=int, default=8, help="the world size of the wait-per-step measurement")
    p.add_argument("--measure", nargs=7, metavar=("SPLIT", "MODE", "BATCH", "WORLD", "SECONDS", "STEP_S", "ACCUM"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        split, mode, batch, world, seconds, step_s, accum = args.measure
        print(json.dumps(measure(Path(split), mode, int(batch), int(world), float(seconds), float(step_s), core=0,
                                 accum=int(accum))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        start = time.perf_counter()
        split = write_cache(folder, args.windows, args.seq_len, args.vocab, args.topk, args.samples,
                            group_windows=args.group_windows)
        disk = sum(f.stat().st_size for f in split.glob("*.parquet"))
        print(f"synthetic cache: {args.windows} windows × {args.seq_len} (V {args.vocab}, K {args.topk}, N {args.samples}), "
              f"{disk / 2**20:,.0f} MB, {disk / (args.windows * args.seq_len):.0f} bytes/token on disk, "
              f"written in {time.perf_counter() - start:.0f} s")
        global_windows = args.batch_tokens // args.seq_len
        mix = mixing(split, global_windows, 8)
        print(table(f"Mixing: distinct regions / row groups per global batch of {global_windows} windows "
                    f"(default shuffle buffer, {ReaderConfig().shuffle_tokens:,} tokens; 8 global batches)", [mix]))
        step_s = args.batch * args.seq_len / args.student_tok_s
        rows = []
        for world in args.worlds:
            for mode, pace in (("sampled", 0.0), ("sampled", step_s)):
                rows.append(_subprocess(split, mode, args.batch, world, args.seconds, pace, 0))
        print(table(f"Reader, rank 0 of WORLD, one core, default shuffle buffer ({ReaderConfig().shuffle_tokens:,} tokens), "
                    f"batch {args.batch}; step_s > 0: a training step of that length between batches", rows))
        accum = _subprocess(split, "sampled", args.batch, args.accum_world, max(args.seconds, 4 * args.grad_accum * step_s),
                            step_s, args.grad_accum)
        print(table(f"Data wait per optimizer step: rank 0 of {args.accum_world}, {args.grad_accum} micro-batches of "
                    f"{args.batch} windows a step, {step_s:.2f} s of simulated compute each "
                    f"({args.student_tok_s:,.0f} tokens/s)", [accum]))


def _subprocess(split: Path, mode: str, batch: int, world: int, seconds: float, pace: float, accum: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.reader", "--measure", str(split), mode, str(batch), str(world), str(seconds),
           str(pace), str(accum)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
