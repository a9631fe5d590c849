"""Stage one's control plane at corpus scale: a synthetic finished cache of `shards` shards (10^5 by default;
tiny files, as the restart reads no shard data), then the real stage on it:

- restart on the finished cache (`make teacher-logits` again): one listing per folder, no shard opened or
  stat'ed, the manifests kept — seconds per run and per shard;
- restart with work to do (the manifests gone): rank 0 checks every shard against its capture record (a stat
  and a small read each) and assembles the manifests from the records;
- the end-of-run manifest assembly alone (what rank 0 does after the last shard is written);
- `make verify`'s per-shard rates on real-shape shards (SEQ_LEN 4096, K 64, N 16, V 256,000; random values
  from benchmarks/reader.py): the footer-level checks every shard gets, sha256 and the value invariants that
  the sampled shards get; and from them the time of `make verify` at 10^10 and 10^12 tokens (computed).

`python -m benchmarks.restart --shards 100000` (or `python -m benchmarks.run --only restart`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import table
from pipeline import capture as capture_module
from pipeline.capture import CaptureConfig, capture, dtype_name, expected_meta, resolve_dtype
from pipeline.checkpoint import save_model
from pipeline.layout import SPLITS
from pipeline.model import Gemma2, Gemma2Config
from pipeline.select import batch_histograms, histograms_to_json
from pipeline.tokenizer import Tokenizer
from pipeline.topk import TopKConfig
from schemas.common import to_json
from schemas.manifest import (
    MANIFEST,
    RECORDS,
    CaptureRecord,
    ShardRecord,
    TokensStats,
    record_key,
    record_name,
    write_manifest,
)
from schemas.tokens import TokensMeta

CFG = CaptureConfig(TopKConfig(topk=64, samples=16), batch_size=8)


def _teacher(folder: Path, tokenizer: Tokenizer) -> None:
    config = Gemma2Config(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                          sliding_window=8, max_position_embeddings=8192)
    tok = folder / "tokenizer.model"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tok)
    save_model(Gemma2(config), folder, tokenizer=tok)


def build(root: Path, tokenizer: Tokenizer, shards: int, seq_len: int, windows: int) -> tuple[Path, Path, Path]:
    """Teacher, token manifests (the token shards themselves are never opened by a restart) and a finished
    cache: one tiny file and one capture record per shard, as the stage's writers leave them."""
    teacher, tokens, out = root / "teacher", root / "tokens", root / "logits"
    _teacher(teacher, tokenizer)
    counts = {"val": max(1, shards // 100)}
    counts["train"] = max(1, shards - counts["val"])
    rng = np.random.default_rng(0)
    label_lp, entropy = -rng.exponential(2.0, (windows, seq_len)), rng.exponential(2.0, (windows, seq_len))
    hist = histograms_to_json(batch_histograms(label_lp, entropy, np.ones((windows, seq_len), bool)))
    stats = {"tail_mass": 0.1, "entropy": 1.0, "teacher_loss": 2.0, "positions": windows * seq_len, "histograms": hist}
    from pipeline.checkpoint import model_fingerprint

    fingerprint = model_fingerprint(teacher, file_hash=capture_module.teacher_hashes(teacher, out))
    dtype = dtype_name(resolve_dtype(CFG, torch.device("cpu")))
    for split in SPLITS:
        meta = TokensMeta(seq_len=seq_len, vocab_size=tokenizer.vocab_size,
                          tokenizer_fingerprint=tokenizer.fingerprint, corpus="synthetic", split=split)
        records = [ShardRecord(file=f"{split}-{i:06d}.parquet", rows=windows, tokens=windows * seq_len, bytes=1,
                               sha256=f"{i:064x}", max_id=tokenizer.vocab_size - 1) for i in range(counts[split])]
        write_manifest(tokens / split, meta, records, TokensStats(max_id=tokenizer.vocab_size - 1))
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / RECORDS / split).mkdir(parents=True, exist_ok=True)
        for record in records:
            shard = out / split / record.file
            shard.write_bytes(b"PAR1")
            stat = shard.stat()
            key = record_key(expected_meta(meta, record, fingerprint, tokenizer.vocab_size, CFG, split, dtype))
            captured = CaptureRecord(file=record.file, rows=windows, tokens=windows * seq_len, bytes=stat.st_size,
                                     sha256=f"{hash(record.file) & (2**64 - 1):064x}", mtime_ns=stat.st_mtime_ns,
                                     target_bytes=3, stats=stats)
            (out / RECORDS / split / record_name(record.file, key)).write_text(json.dumps(to_json(captured)))
    return teacher, tokens, out


def run(tokenizer: Tokenizer, shards: int = 100_000, seq_len: int = 4096, windows: int = 32,
        root: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        start = time.perf_counter()
        teacher, tokens, out = build(Path(tmp), tokenizer, shards, seq_len, windows)
        built = time.perf_counter() - start
        cfg = dataclasses.replace(CFG, poll_s=0.01)
        start = time.perf_counter()
        capture(teacher, tokens, out, cfg)  # the manifests are missing: a restart with work (none left)
        with_work = time.perf_counter() - start
        start = time.perf_counter()
        capture(teacher, tokens, out, cfg)  # finished: nothing to do
        finished = time.perf_counter() - start
        start = time.perf_counter()
        capture(teacher, tokens, out, cfg)
        finished = min(finished, time.perf_counter() - start)
        jobs = _jobs(teacher, tokens, out, cfg)
        start = time.perf_counter()
        for split in SPLITS:
            capture_module._write_split_manifest(out, split, [j for j in jobs if j.meta.split == split], cfg, {})
        assembly = time.perf_counter() - start
        manifest_kb = sum((out / s / MANIFEST).stat().st_size for s in SPLITS) / 1024
    rows = [
        {"what": "restart, finished cache", "seconds": finished, "ms_per_shard": 1e3 * finished / shards},
        {"what": "restart, manifests missing (records checked, manifests assembled)", "seconds": with_work,
         "ms_per_shard": 1e3 * with_work / shards},
        {"what": "end-of-run manifest assembly (rank 0)", "seconds": assembly, "ms_per_shard": 1e3 * assembly / shards},
    ]
    print(table(f"Restart and manifests, {shards:,} shards (synthetic cache built in {built:.0f} s; "
                f"manifests {manifest_kb:,.0f} KB), {os.cpu_count()} CPUs", rows))
    return {"shards": shards, "seq_len": seq_len, "windows_per_shard": windows, "build_s": built, "rows": rows}


def verify_rates(root: Path | None = None, windows: int = 16, seq_len: int = 4096, topk: int = 64,
                 samples: int = 16, vocab: int = 256_000, cache_bytes_per_token: float = 186.0) -> dict[str, Any]:
    """Seconds per footer check, sha256 MB/s and value-invariant positions/s on shards of the real shape; the
    at-scale times take a real K 64, N 16 cache's size (`cache_bytes_per_token`: 181.6 B/token of target
    columns, README's storage table, + the window's ids; random values compress worse)."""
    from benchmarks.reader import write_cache
    from pipeline.fsutil import sha256_file
    from pipeline.verify import Report, VerifyConfig, check_shard, check_values
    from schemas.logits import validate_logits_shard
    from schemas.manifest import read_manifest

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        split = write_cache(Path(tmp), 2 * windows, seq_len, vocab, topk, samples, shard_windows=windows)
        manifest = read_manifest(split, "logits")
        paths = [split / r.file for r in manifest.shards]
        meta = validate_logits_shard(paths[0])
        footers = []
        for _ in range(20):
            for path, record in zip(paths, manifest.shards):
                start = time.perf_counter()
                check_shard(path, record, meta.shared(), Report(), deep=False, records=set())
                footers.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in paths)
        start = time.perf_counter()
        for path in paths:
            sha256_file(path)
        sha_mb_s = size / 1e6 / (time.perf_counter() - start)
        start = time.perf_counter()
        for path in paths:
            check_values(path, meta, Report())  # random values break invariants: the cost is the same
        values_pos_s = 2 * windows * seq_len / (time.perf_counter() - start)
    bytes_per_token = cache_bytes_per_token
    footer_s = float(np.median(footers))
    rows, sample = [], int(VerifyConfig().sample)
    for tokens in (10**10, 10**12):
        shards = tokens / (1024 * seq_len)  # SHARD_WINDOWS 1024
        per_shard = 1024 * seq_len * bytes_per_token / 1e6 / sha_mb_s + 1024 * seq_len / values_pos_s
        rows.append({"tokens": f"{tokens:.0e}", "shards": shards, "cache_TB": tokens * bytes_per_token / 1e12,
                     "footers_all_s": shards * footer_s, f"sample_{sample}_s": min(sample, shards) * per_shard,
                     "full_h_1_rank": shards * per_shard / 3600, "full_h_8_ranks": shards * per_shard / 3600 / 8})
    print(table(f"make verify: footer {1e3 * footer_s:.2f} ms/shard, sha256 {sha_mb_s:,.0f} MB/s, invariants "
                f"{values_pos_s:,.0f} positions/s (T {seq_len}, K {topk}, N {samples}, V {vocab:,}; "
                f"cache {bytes_per_token:.0f} B/token); at scale (computed, SHARD_WINDOWS 1024, one process unless said)",
                rows))
    return {"footer_ms": 1e3 * footer_s, "sha256_mb_s": sha_mb_s, "values_positions_s": values_pos_s,
            "bytes_per_token": bytes_per_token, "at_scale": rows}


def _jobs(teacher: Path, tokens: Path, out: Path, cfg: CaptureConfig) -> list[capture_module.Job]:
    """The stage's jobs for this cache (as rank 0 builds them), for timing the manifest assembly alone."""
    from pipeline.checkpoint import load_config, model_fingerprint
    from schemas.manifest import read_manifest

    fingerprint = model_fingerprint(teacher, file_hash=capture_module.teacher_hashes(teacher, out))
    vocab = load_config(teacher).vocab_size
    dtype = dtype_name(resolve_dtype(cfg, torch.device("cpu")))
    jobs = []
    for split in SPLITS:
        manifest = read_manifest(tokens / split, "tokens", check_files=False)
        jobs += [capture_module.Job(tokens / split / s.file, out / split / s.file,
                                    expected_meta(manifest.meta, s, fingerprint, vocab, cfg, split, dtype), s)
                 for s in manifest.shards]
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restart", description=__doc__)
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--tmp", type=Path, default=None, help="where to build the synthetic cache (default: the system's)")
    args = p.parse_args()
    from benchmarks.run import _tokenizer

    run(_tokenizer(Path("runs/demo")), args.shards, root=args.tmp)
    verify_rates(args.tmp)


if __name__ == "__main__":
    main()
