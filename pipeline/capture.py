"""Stage one, second half: the teacher over token shards → top-K logit shards + manifest per split.

Crash-safe and resumable: one output shard per input shard, written under a temporary name and renamed
when complete; a rerun keeps complete shards whose metadata matches this run and redoes the rest, so the
final cache is byte-identical to an uninterrupted run.

Several ranks, and no collective that can time out: the only collective is one broadcast of a run id at the
very start, before any slow work. Rank 0 then plans alone and writes the plan to a file the other ranks poll
for: it hashes the teacher (once per weight file, remembered beside the teacher), lists each split folder and
its capture-record folder once, removes every stale temporary file found there (no rank writes before the
plan exists), and keeps the shards whose record for this run's settings is listed; only the others are
planned, by tokens (largest first to the least-loaded rank), so a slow rank's backlog is shared out on the
next start. At the end rank 0 does not wait in a barrier (a 27B shard takes minutes, NCCL's default timeout
is 10): it lists the record folders until every planned shard has its record, then assembles the manifests
from the records; a rank that fails leaves a failure record (with the run id) that rank 0 reports.

Hashes at write time: the rank that writes a shard hashes its bytes as they are written and, right after the
rename, writes its capture record (schemas/manifest.py: sha256, bytes, mtime, rows, target bytes, statistics).
No shard is read again to make a manifest. A rerun on a finished cache lists folders and reads nothing else;
manifests are removed only when there is work to do. A shard whose size or mtime no longer match its record
when a manifest is assembled is hashed: the same bytes (a copied cache) are kept, other bytes are never
vouched for — the stage stops naming the shard and drops its record, so the next run captures it again.

Numerics guard: a non-finite teacher logit stops the stage naming the shard and window; that shard's
temporary file is removed and no manifest is written.

Off the critical path: the teacher's forward and head run on the calling thread; encoding (sorting, delta
coding, quantising), compression and writing run on one background thread, at most two batches behind
(benchmarks/storage.py measures that thread's rate against the GPU capture rates). Each shard's footer holds
its statistics (sums and the histograms of the teacher's loss and entropy that `--select` reads), which the
manifest adds up without reading the data again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.checkpoint import load_config, load_model, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.fsutil import cached_sha256, list_names, sha256_file, stale_tmp, write_json
from pipeline.layout import splits_of
from pipeline.progress import progress
from pipeline.runtime import Runtime, teacher_dtype
from pipeline.select import add_histograms, batch_histograms, histograms_from_json, histograms_to_json
from pipeline.settings import setting
from pipeline.shards import ShardWriter, rows_per_group
from pipeline.tokenizer import Tokenizer
from pipeline.topk import NonFiniteLogits, TopKConfig, teacher_targets
from schemas.common import with_meta
from schemas.logits import (
    ID_CODINGS,
    LOGPROB_CODINGS,
    TARGET_COLUMNS,
    Encoding,
    LogitsMeta,
    LogitsShardMeta,
    Targets,
    decode,
    encode,
    row_bytes,
    schema_of,
    validate_logits_shard,
    write_options,
)
from schemas.manifest import (
    MANIFEST,
    RECORDS,
    CaptureRecord,
    LogitsStats,
    Manifest,
    ShardRecord,
    read_manifest,
    read_record,
    record_file,
    record_key,
    record_name,
    write_manifest,
    write_record,
)
from schemas.tokens import BEHAVIOUR, TokensMeta, validate_token_shard

STATS_KEY = b"distill.stats"
HASH_CACHE = ".teacher_hashes.json"  # beside the teacher (else in the cache folder): file hashes by (path, size, mtime)
PLAN = ".plan.json"  # in the cache folder: rank 0's plan of a run (its id, the teacher's fingerprint, the shards to do)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Test hooks: the collective timeout the stage's process group gets (seconds), and "rank:seconds", a sleep
# before each of that rank's shards (so one rank's work outlasts that timeout).
TIMEOUT_ENV = "DISTILL_COLLECTIVE_TIMEOUT_S"
DELAY_ENV = "DISTILL_TEST_SHARD_DELAY"
REPORT_EVERY_S = 600.0
# Named settings (`--cache-preset`, `make teacher-logits CACHE_PRESET=…`): defaults of these flags, which
# explicit flags override. `compact`: of the settings measured (benchmarks/storage.py at a 256k vocabulary,
# benchmarks/fidelity.py on the demo teacher), the one with the best gradient cosine to full KD among those at
# ≤ 40 bytes/token of target columns on both teachers: pure stratified sampling, 40 draws (≈ 25 B/token at
# 256k, ≈ 36 on the demo teacher, whose distributions are much flatter). A sharper teacher buys more draws
# for the same bytes: e.g. SAMPLES=80 is ≈ 39 B/token at 256k (and ≈ 58 on the demo teacher).
CACHE_PRESETS: dict[str, dict[str, Any]] = {
    "compact": {"topk": 0, "samples": 40, "sampling": "stratified", "id_coding": "delta", "logprob_coding": "q8"},
}


@dataclass(frozen=True)
class CaptureConfig:
    topk: TopKConfig = TopKConfig()
    batch_size: int = setting(8, "windows per teacher forward")
    cache_tokens: int = setting(0, "cache only the first train shards covering this many tokens, rounded up to "
                                   "whole token shards (SHARD_WINDOWS windows each; 0: all); val is always whole")
    dtype: str = setting("auto", "the teacher's weights and activations: auto (bfloat16 on a GPU, float32 on the "
                                 "CPU), float32, bfloat16; float16 overflows in Gemma 2 and needs --allow-float16",
                         choices=("auto", *DTYPES))
    allow_float16: bool = setting(False, "run the teacher in float16 anyway (the numerics guard stops the stage at "
                                         "the first non-finite logit)")
    cache_preset: str = setting("none", "a named setting of --topk, --samples, --sampling and the encoding, applied "
                                        "as their defaults (flags override them): compact = pure sampling, 40 "
                                        "stratified draws, delta ids (≤ 40 bytes/token, benchmarks/storage.py)",
                                choices=("none", *CACHE_PRESETS))
    id_coding: str = setting("delta", "how top-K and draw ids are stored: delta (ascending, first id then gaps: the "
                                      "smallest), ascending, or probability (most likely first, as older caches)",
                             choices=ID_CODINGS)
    logprob_coding: str = setting("float16", "how top-K log-probs are stored: float16, or q8 (8-bit codes on a log "
                                             "scale, rescaled to the exact tail mass when read)",
                                  choices=LOGPROB_CODINGS)
    logprob_step: float = setting(1 / 16, "q8: nats per code (codes reach 255 × step)")
    float16_split: bool = setting(False, "write the float16 columns (log-probs, signals) with Parquet's "
                                         "byte-stream-split: smaller (README, Storage), but DuckDB cannot read them")
    overwrite: bool = setting(False, "replace a finished cache in the folder that was made with other settings "
                                     "(without it that is refused, naming what differs)")
    background_writes: bool = True  # encode, compress and write on a thread while the teacher computes the next batch
    poll_s: float = 5.0  # how often rank 0 looks for the other ranks' shards at the end

    def __post_init__(self) -> None:
        self.encoding()  # refuses an unknown or incomplete encoding before any work

    def encoding(self) -> Encoding:
        q8 = self.logprob_coding == "q8"
        return Encoding(self.id_coding, self.logprob_coding, self.logprob_step if q8 else None, signals=True,
                        float16_split=self.float16_split)


@dataclass(frozen=True)
class Job:
    """One shard to have on disk: where it comes from, where it goes, and what it must contain."""

    source: Path
    target: Path
    meta: LogitsShardMeta
    record: ShardRecord

    @functools.cached_property
    def key(self) -> str:
        """Names this shard's capture record for these settings (schemas.manifest.record_key)."""
        return record_key(self.meta)

    @property
    def record_name(self) -> str:
        return record_name(self.target.name, self.key)


def resolve_dtype(cfg: CaptureConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return teacher_dtype(device)
    if cfg.dtype not in DTYPES:
        raise PipelineError(f"--dtype {cfg.dtype!r}: use auto, {', '.join(DTYPES)}")
    if cfg.dtype == "float16" and not cfg.allow_float16:
        raise PipelineError("--dtype float16: Gemma 2's activations overflow float16 (inf, then NaN logits); use "
                            "bfloat16 or float32, or pass --allow-float16 to try anyway")
    return DTYPES[cfg.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_teacher_matches_tokens(teacher: Path, tokens: Path) -> dict[str, Manifest]:
    """Before any work: the teacher directory exists, same tokenizer, every id below the teacher's vocabulary,
    no id of the teacher without a piece of the tokenizer, windows within the teacher's positions. Returns the
    manifests of the splits to capture (`splits_of`: train alone for rollouts)."""
    if not teacher.is_dir():
        raise PipelineError(f"{teacher}: no such teacher directory; pass TEACHER= (--teacher) a Hugging Face Gemma 2 "
                            "directory (config.json, safetensors weights, tokenizer.model)")
    tok_path = teacher / "tokenizer.model"
    if not tok_path.is_file():
        raise PipelineError(f"{tok_path}: the teacher directory has no tokenizer.model; copy the teacher's tokenizer there")
    tokenizer = Tokenizer.load(tok_path)
    teacher_fp = tokenizer.fingerprint
    config = load_config(teacher)
    vocab = config.vocab_size
    if vocab > tokenizer.vocab_size:
        raise PipelineError(
            f"{teacher / 'config.json'}: vocab_size {vocab} exceeds the {tokenizer.vocab_size} pieces of {tok_path}: the "
            f"teacher could predict ids {tokenizer.vocab_size}..{vocab - 1}, which no piece decodes; use the "
            "tokenizer the teacher was trained with")
    train = read_manifest(tokens / "train", "tokens", check_files=False)
    manifests = {s: train if s == "train" else read_manifest(tokens / s, "tokens", check_files=False)
                 for s in splits_of(tokens, train.meta.rollouts is not None)}
    for split, manifest in manifests.items():
        if manifest.meta.seq_len > config.max_position_embeddings:
            raise PipelineError(
                f"{tokens / split}: SEQ_LEN {manifest.meta.seq_len} exceeds the teacher's max_position_embeddings "
                f"{config.max_position_embeddings} ({teacher / 'config.json'}); rerun `make tokens "
                f"SEQ_LEN={config.max_position_embeddings}` (or smaller)")
        token_fp = manifest.meta.tokenizer_fingerprint
        if token_fp != teacher_fp:
            raise PipelineError(
                f"{tokens / split}: token shards were made with tokenizer {token_fp[:16]}…, the teacher's "
                f"{tok_path} is {teacher_fp[:16]}…; rerun `make tokens TOKENIZER={tok_path}`"
            )
        if manifest.stats.max_id >= vocab:
            raise PipelineError(
                f"{tokens / split}: token id {manifest.stats.max_id} is not below the teacher's vocab_size {vocab}; "
                "the tokens were made for another model"
            )
    return manifests


def limit_shards(manifest: Manifest, tokens: int) -> Manifest:
    """The leading shards that cover `tokens` (whole shards, so every cached shard has its source's name);
    says how many tokens that is when it rounds up."""
    kept, covered = [], 0
    for shard in manifest.shards:
        if covered >= tokens:
            break
        kept.append(shard)
        covered += shard.tokens
    if covered != tokens:
        print(f"CACHE_TOKENS={tokens}: caching {covered:,} train tokens, the {len(kept)} whole token shard(s) that "
              f"cover it (rounded up to whole token shards, SHARD_WINDOWS windows each)", file=sys.stderr)
    return dataclasses.replace(manifest, shards=tuple(kept))


def expected_meta(token_meta: TokensMeta, shard: ShardRecord, teacher_fp: str, vocab: int, cfg: CaptureConfig,
                  split: str, dtype: str | None = None) -> LogitsShardMeta:
    return LogitsShardMeta(
        seq_len=token_meta.seq_len, vocab_size=vocab, topk=cfg.topk.topk, samples=cfg.topk.samples,
        sample_seed=cfg.topk.sample_seed, tokenizer_fingerprint=token_meta.tokenizer_fingerprint,
        teacher_fingerprint=teacher_fp, source_shard=shard.file, source_sha256=shard.sha256, split=split,
        corpus=token_meta.corpus, format=token_meta.format, temperature=cfg.topk.temperature, capture_dtype=dtype,
        **dataclasses.asdict(cfg.encoding()), sampling=cfg.topk.sampling, rollouts=token_meta.rollouts,
    )


def refuse_replacing(out: Path, wanted: dict[str, LogitsMeta]) -> None:
    """A finished cache (a split with its manifest) made with other settings is never replaced silently:
    students trained on it point at this folder. Names what differs and the two ways out."""
    for split, meta in wanted.items():
        try:
            have = read_manifest(out / split, "logits", check_files=False).meta
        except PipelineError:
            continue  # no finished cache here (or an unreadable one): nothing a student could point at
        old, new = dataclasses.asdict(have), dataclasses.asdict(meta)
        differ = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
        if differ:
            raise PipelineError(
                f"{out / split}: a finished cache made with other settings is there ({'; '.join(differ)}); students "
                "trained on it would point at a cache that is not theirs: write this one elsewhere with CACHE= "
                "(--cache), or replace it with --overwrite (EXTRA=--overwrite)")


def assign_by_tokens(tokens: list[int], world: int) -> list[int]:
    """The rank of each item: largest first, each to the rank with the fewest tokens so far (ties: the lower
    rank, then the earlier item), so the ranks' totals differ by at most one item. Deterministic: every rank
    computes the same plan from the manifests alone, whatever is already on disk."""
    load, owner = [0] * world, [0] * len(tokens)
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += tokens[i]
    return owner


def run_id(runtime: Runtime) -> str:
    """An id shared by the ranks of this run (rank 0's, broadcast once, at the start), so failure records of
    an earlier run are never mistaken for this one's."""
    token = torch.frombuffer(bytearray(uuid.uuid4().bytes), dtype=torch.uint8).to(runtime.device)
    if runtime.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(token, src=0)  # a tensor, not broadcast_object_list: nothing is unpickled
    return bytes(token.cpu().tolist()).hex()


def failure_record(out: Path, rank: int) -> Path:
    return out / f".rank-{rank}.failed.json"


def capture(teacher: Path, tokens: Path, out: Path, cfg: CaptureConfig, runtime: Runtime = Runtime(),
            run: str | None = None) -> dict[str, Manifest] | None:
    """Runs the teacher over every token shard; returns the manifests on rank 0. `run` is the run id the
    ranks share (default: broadcast from rank 0)."""
    run = run or run_id(runtime)  # first, while every rank is at the same point
    try:
        return _capture(teacher, tokens, out, cfg, runtime, run)
    except Exception as e:
        if runtime.world > 1:  # rank 0's too: the other ranks may be waiting for its plan
            write_json(failure_record(out, runtime.rank), {"run": run, "error": _one_line(e)})
        raise


def teacher_hashes(teacher: Path, out: Path) -> Callable[[Path], str]:
    """The teacher's file hashes, remembered beside the teacher (so every cache folder made from it reuses
    them), or in the cache folder when the teacher's folder cannot be written."""
    return cached_sha256([teacher / HASH_CACHE, out / HASH_CACHE])


def _capture(teacher: Path, tokens: Path, out: Path, cfg: CaptureConfig, runtime: Runtime,
             run: str) -> dict[str, Manifest] | None:
    if cfg.topk.samples > 65535:
        raise PipelineError(f"--samples {cfg.topk.samples}: at most 65535 draws per position (uint16 counts)")
    manifests = check_teacher_matches_tokens(teacher, tokens)
    splits = tuple(manifests)
    if cfg.cache_tokens:
        manifests["train"] = limit_shards(manifests["train"], cfg.cache_tokens)
    vocab = load_config(teacher).vocab_size
    if not 0 <= cfg.topk.topk <= vocab:
        raise PipelineError(f"--topk {cfg.topk.topk}: must be between 0 and the teacher's vocab_size {vocab}")
    dtype = resolve_dtype(cfg, runtime.device)
    for split in splits:
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / RECORDS / split).mkdir(parents=True, exist_ok=True)
    failure_record(out, runtime.rank).unlink(missing_ok=True)

    def jobs_for(teacher_fp: str) -> list[Job]:
        return [Job(tokens / split / shard.file, out / split / shard.file,
                    expected_meta(manifests[split].meta, shard, teacher_fp, vocab, cfg, split, dtype_name(dtype)), shard)
                for split in splits for shard in manifests[split].shards]

    if runtime.is_main:
        teacher_fp = model_fingerprint(teacher, file_hash=teacher_hashes(teacher, out))
        jobs = jobs_for(teacher_fp)
        todo, kept, known = plan(out, jobs, cfg, splits)
        if runtime.world > 1:
            write_json(out / PLAN, {"run": run, "teacher_fingerprint": teacher_fp, "todo": todo})
    else:
        published = _await_plan(out, run, cfg.poll_s)
        jobs = jobs_for(published["teacher_fingerprint"])
        todo, kept, known = published["todo"], {}, {}
    pending = [jobs[i] for i in todo]
    owners = assign_by_tokens([j.record.tokens for j in pending], runtime.world)
    _run_jobs(teacher, [j for j, owner in zip(pending, owners) if owner == runtime.rank], cfg, runtime, dtype, out)
    if not runtime.is_main:
        return None
    _wait_for(pending, out, run, runtime.world, cfg.poll_s)
    shutil.copyfile(teacher / "tokenizer.model", out / "tokenizer.model")
    manifests = {split: kept.get(split) or _write_split_manifest(out, split, [j for j in jobs if j.meta.split == split],
                                                                 cfg, known) for split in splits}
    for rank in range(1, runtime.world):
        failure_record(out, rank).unlink(missing_ok=True)  # every shard is complete: older records are moot
    return manifests


def plan(out: Path, jobs: list[Job], cfg: CaptureConfig,
         splits: tuple[str, ...]) -> tuple[list[int], dict[str, Manifest], dict[str, CaptureRecord]]:
    """Rank 0, before any rank writes: the indices of the jobs to do, the manifests that stay as they are, and
    the capture records it read. One listing of each split folder and of each record folder. A finished cache
    (every record listed, every manifest current) is left as it is: nothing per shard is opened or stat'ed.
    Otherwise (a restart with work) each listed shard is stat'ed against its record once, here on rank 0 (the
    records serve the manifests at the end): a shard whose bytes changed since its capture is captured again.
    A cache written before capture records has its records made once from its manifest and footers."""
    shards = {split: list_names(out / split) for split in splits}
    records = {split: list_names(out / RECORDS / split) for split in splits}
    for split in splits:  # what killed writers left: stale, as no rank writes before the plan exists
        for folder, names in ((out / split, shards[split]), (out / RECORDS / split, records[split])):
            for name in stale_tmp(names):
                _remove(folder / name)
    wanted = {j.meta.split: j.meta.shared() for j in jobs}
    if not cfg.overwrite:
        refuse_replacing(out, wanted)
    old = {split: _old_manifest(out / split) for split in splits}
    listed = [j.target.name in shards[j.meta.split] and j.record_name in records[j.meta.split] for j in jobs]
    current = {}
    for split in splits:
        mine = sorted((j.target.name, j.record.rows) for j in jobs if j.meta.split == split)
        manifest = old[split]
        current[split] = (manifest is not None and manifest.meta == wanted.get(split)
                          and [(r.file, r.rows) for r in manifest.shards] == mine)
    if all(listed) and all(current.values()):
        return [], {split: m for split, m in old.items() if m is not None}, {}
    known: dict[str, CaptureRecord] = {}
    todo = []
    for i, (job, done) in enumerate(zip(jobs, listed)):
        if not done and job.target.name in shards[job.meta.split]:
            done = _adopt(out, job, old[job.meta.split])
        record = _unchanged(out, job) if done else None
        if record is None:
            todo.append(i)
        else:
            known[job.record_name] = record
    by_shard: dict[tuple[str, str], list[str]] = {}
    for split in splits:
        for name in records[split]:
            by_shard.setdefault((split, record_file(name) or ""), []).append(name)
    for i in todo:  # a shard to redo counts as complete only once its new record is written
        split = jobs[i].meta.split
        for name in {jobs[i].record_name, *by_shard.get((split, jobs[i].target.name), [])}:
            (out / RECORDS / split / name).unlink(missing_ok=True)
    busy = {jobs[i].meta.split for i in todo}
    kept = {}
    for split in splits:
        if split not in busy and current[split]:
            kept[split] = old[split]  # finished, and every shard as its record says: kept as it is
        else:
            (out / split / MANIFEST).unlink(missing_ok=True)  # the split is incomplete until rewritten
    return todo, kept, known


def _unchanged(out: Path, job: Job) -> CaptureRecord | None:
    """A complete shard's capture record, if the shard is still what was written: size and mtime as recorded,
    or else (a copied cache) the recorded sha256, after which the record takes the new mtime. None when the
    shard or its record is missing or unreadable, or the bytes differ."""
    folder = out / RECORDS / job.meta.split
    try:
        record = read_record(folder / job.record_name)
        stat = job.target.stat()
    except (PipelineError, OSError, TypeError):
        return None
    if (stat.st_size, stat.st_mtime_ns) == (record.bytes, record.mtime_ns):
        return record
    if stat.st_size != record.bytes or sha256_file(job.target) != record.sha256:
        return None
    record = dataclasses.replace(record, mtime_ns=stat.st_mtime_ns)
    write_record(folder, job.key, record)
    return record


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _old_manifest(folder: Path) -> Manifest | None:
    try:
        return read_manifest(folder, "logits", check_files=False)
    except (PipelineError, KeyError, TypeError, ValueError):
        return None


def _adopt(out: Path, job: Job, manifest: Manifest | None) -> bool:
    """A shard of a cache written before capture records: its record is made once from the manifest that
    listed it (its sha256, taken then) and its footer, when the footer is this run's and the size the
    manifest's. Reads the footer, never the data."""
    listed = next((r for r in manifest.shards if r.file == job.target.name), None) if manifest else None
    if listed is None or listed.rows != job.record.rows:
        return False
    try:
        if validate_logits_shard(job.target) != job.meta:
            return False
        footer, stat = pq.read_metadata(job.target), job.target.stat()
        stats = json.loads(footer.metadata[STATS_KEY])
    except (PipelineError, OSError, KeyError, ValueError, TypeError):
        return False
    if footer.num_rows != listed.rows or stat.st_size != listed.bytes:
        return False
    write_record(out / RECORDS / job.meta.split, job.key, CaptureRecord(
        file=listed.file, rows=listed.rows, tokens=listed.tokens, bytes=listed.bytes, sha256=listed.sha256,
        mtime_ns=stat.st_mtime_ns, target_bytes=_target_bytes(footer), stats=stats))
    return True


def _await_plan(out: Path, run: str, poll_s: float) -> dict[str, Any]:
    """Ranks other than 0: the plan rank 0 writes for this run (no collective: hashing a new teacher may take
    longer than a collective's timeout); rank 0's failure record of this run stops this rank with its line."""
    while True:
        for path, check in ((out / PLAN, True), (failure_record(out, 0), False)):
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # absent or being written
            if isinstance(raw, dict) and raw.get("run") == run:
                if check:
                    return raw
                raise PipelineError(f"rank 0 failed: {raw.get('error', 'no message')}")
        time.sleep(min(poll_s, 0.2))


def _run_jobs(teacher: Path, jobs: list[Job], cfg: CaptureConfig, runtime: Runtime, dtype: torch.dtype,
              out: Path) -> None:
    if not jobs:
        return
    model = load_model(teacher, dtype=dtype, device=runtime.device)
    bar = progress(total=sum(j.record.tokens for j in jobs), desc=f"teacher-logits[{runtime.rank}]", unit=" tok",
                   unit_scale=True, position=runtime.rank)
    delay = _test_delay(runtime.rank)
    try:
        for job in jobs:
            if delay:
                time.sleep(delay)
            sha256, size, stats = _capture_shard(model, job.source, job.target, job.meta, cfg, runtime.device, bar)
            _record(out, job, sha256, size, stats)
    finally:
        bar.close()  # ends its line, so an error message starts on a line of its own


def _record(out: Path, job: Job, sha256: str, size: int, stats: bytes) -> None:
    """The writer's capture record of a shard it has just renamed into place (its footer read back for the
    column-chunk sizes: a few KB, not the data)."""
    stat, footer = job.target.stat(), pq.read_metadata(job.target)
    if stat.st_size != size or footer.num_rows != job.record.rows:
        raise PipelineError(f"{job.target}: {stat.st_size} bytes / {footer.num_rows} rows on disk right after it was "
                            f"written as {size} bytes / {job.record.rows} rows; is another run writing this cache?")
    write_record(out / RECORDS / job.meta.split, job.key, CaptureRecord(
        file=job.target.name, rows=footer.num_rows, tokens=footer.num_rows * job.meta.seq_len, bytes=size,
        sha256=sha256, mtime_ns=stat.st_mtime_ns, target_bytes=_target_bytes(footer), stats=json.loads(stats)))


def _wait_for(jobs: list[Job], out: Path, run: str, world: int, poll_s: float) -> None:
    """Rank 0: lists the record folders until every planned shard has its record; a failure record of this
    run from another rank stops the stage with that rank's line. No timeout: a rank that dies without a
    record is the launcher's to notice (torchrun stops the job)."""
    pending, reported = list(jobs), -REPORT_EVERY_S
    start = time.monotonic()
    while True:
        for rank in range(1, world):
            path = failure_record(out, rank)
            if path.is_file():
                try:
                    record = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # being written; read again at the next poll
                if record.get("run") == run:
                    raise PipelineError(f"rank {rank} failed: {record.get('error', 'no message')}")
        listed = {split: list_names(out / RECORDS / split) for split in {j.meta.split for j in pending}}
        pending = [j for j in pending if j.record_name not in listed[j.meta.split]]
        if not pending:
            return
        waited = time.monotonic() - start
        if waited - reported >= REPORT_EVERY_S:
            print(f"teacher-logits[0]: waiting for {len(pending)} shard(s) of the other ranks, e.g. "
                  f"{pending[0].target}", file=sys.stderr)
            reported = waited
        time.sleep(poll_s)


def _test_delay(rank: int) -> float:
    spec = os.environ.get(DELAY_ENV, "")
    if ":" not in spec:
        return 0.0
    who, seconds = spec.split(":", 1)
    return float(seconds) if int(who) == rank else 0.0


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


@dataclass
class ShardStats:
    """What a shard's footer records: sums over its trained positions and the signal histograms."""

    sums: dict[str, float] = field(default_factory=lambda: {"tail_mass": 0.0, "entropy": 0.0, "teacher_loss": 0.0,
                                                             "positions": 0})
    histograms: dict[str, Any] = field(default_factory=dict)

    def add(self, targets: Targets, mask: np.ndarray) -> None:
        # Positions that do not train hold zeros, so plain sums are sums over the trained ones.
        self.sums["tail_mass"] += float(targets.tail_mass.astype(np.float64).sum())
        self.sums["entropy"] += float(targets.entropy.astype(np.float64).sum())
        self.sums["teacher_loss"] -= float(targets.label_logprob.astype(np.float64).sum())
        self.sums["positions"] += int(mask.sum())
        self.histograms = add_histograms(self.histograms, batch_histograms(targets.label_logprob, targets.entropy, mask))

    def to_json(self) -> bytes:
        return json.dumps({**self.sums, "histograms": histograms_to_json(self.histograms)}, sort_keys=True).encode()


class Background:
    """Runs jobs in order on one thread (inline when disabled), at most two waiting, so memory stays flat when
    the disk is slow; a job's error is raised at the next submit or at exit."""

    def __init__(self, enabled: bool) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1) if enabled else None
        self.futures: deque[Future[None]] = deque()

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        if self.pool is None:
            job(*args)
            return
        self.futures.append(self.pool.submit(job, *args))
        while len(self.futures) > 2:
            self.futures.popleft().result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            while exc_type is None and self.futures:
                self.futures.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def _capture_shard(model: torch.nn.Module, source: Path, target: Path, meta: LogitsShardMeta, cfg: CaptureConfig,
                   device: torch.device, bar: Any) -> tuple[str, int, bytes]:
    """Writes one shard; returns its sha256 and bytes (taken while writing) and its footer's statistics."""
    if validate_token_shard(source).seq_len != meta.seq_len:
        raise PipelineError(f"{source}: seq_len differs from its manifest; rerun `make tokens`")
    chat = meta.format == "chat"
    table = pq.read_table(source)
    seq_len, k = meta.seq_len, meta.topk
    behaviour = meta.rollouts is not None  # rollouts: the sampling model's log-probs pass through unchanged
    columns = decode(table, ("window", "input_ids", "continued", "label_mask") + (("loss_mask",) if chat else ())
                     + ((BEHAVIOUR,) if behaviour else ()))
    ids, windows, mask = columns["input_ids"], columns["window"], columns["label_mask"]
    schema, encoding = schema_of(meta), meta.encoding
    stats = ShardStats()

    def write(targets: Targets, rows: slice) -> None:  # on the background thread
        writer.write(encode(targets, windows[rows], ids[rows], columns["continued"][rows], schema,
                            columns["loss_mask"][rows] if chat else None, encoding,
                            columns[BEHAVIOUR][rows] if behaviour else None))
        stats.add(targets, mask[rows])

    with ShardWriter(target, with_meta(schema, meta), rows_per_group(row_bytes(seq_len, k, meta.samples), seq_len),
                     options=write_options(schema, float16_split=encoding.float16_split)) as writer:
        with Background(cfg.background_writes) as background:
            for start in range(0, len(ids), cfg.batch_size):
                rows = slice(start, start + cfg.batch_size)
                batch = ids[rows]
                try:
                    targets = teacher_targets(model, torch.tensor(batch, dtype=torch.long, device=device),
                                              windows[rows].tolist(), cfg.topk, torch.from_numpy(mask[rows]).to(device),
                                              pad_to=cfg.batch_size)  # one forward shape: the last batch padded
                except NonFiniteLogits as e:
                    hint = " (float16 overflows in Gemma 2: use bfloat16)" if meta.capture_dtype == "float16" else ""
                    raise PipelineError(f"{target}: {e}; the shard was not written and no manifest was; check the "
                                        f"teacher checkpoint and its dtype{hint}") from None
                background.submit(write, targets, rows)
                bar.update(batch.shape[0] * seq_len)
        writer.footer[STATS_KEY] = stats.to_json()
    assert writer.sha256 is not None and writer.bytes is not None  # set by a clean exit
    return writer.sha256, writer.bytes, writer.footer[STATS_KEY]


def target_bytes(path: Path) -> int:
    """Compressed bytes of a shard's target columns (what a cache mode costs; the window columns are the
    token shard's), from the Parquet column-chunk sizes."""
    return _target_bytes(pq.read_metadata(path))


def _target_bytes(meta: pq.FileMetaData) -> int:
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema.split(".")[0]
               in TARGET_COLUMNS)


def _write_split_manifest(out: Path, split: str, jobs: list[Job], cfg: CaptureConfig,
                          known: dict[str, CaptureRecord]) -> Manifest:
    """A split's manifest from its capture records (`known`: those the plan read; the others are read here, one
    small file per shard, no shard data). A shard changed since its record (stat, then sha256 as in the plan)
    stops the stage by name, its record dropped so that the next run captures it again: never vouched for."""
    folder = out / split
    records, changed, sums = [], [], {"tail_mass": 0.0, "entropy": 0.0, "teacher_loss": 0.0, "positions": 0}
    hists: dict[str, Any] = {}
    targets = 0
    for job in jobs:
        record = known.get(job.record_name) or _unchanged(out, job)
        if record is None:
            changed.append(job)
            continue
        for key in sums:
            sums[key] += record.stats[key]
        hists = add_histograms(hists, histograms_from_json(record.stats["histograms"]))
        targets += record.target_bytes
        records.append(record.shard())
    if changed:
        for job in changed:
            (out / RECORDS / split / job.record_name).unlink(missing_ok=True)
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise PipelineError(f"{changed[0].target}{more}: changed on disk after it was captured (missing, or size and "
                            f"sha256 differ from its capture record); its record is dropped and no manifest of {folder} "
                            "is written: rerun `make teacher-logits` to capture it again")
    positions = max(1, sums["positions"])  # trained positions: the means are over them
    tokens = max(1, sum(r.tokens for r in records))
    stats = LogitsStats(
        bytes_per_token=sum(r.bytes for r in records) / tokens,
        mean_tail_mass=sums["tail_mass"] / positions,
        mean_teacher_entropy=sums["entropy"] / positions,
        capture_config=dataclasses.asdict(cfg),
        positions=int(sums["positions"]),
        mean_teacher_loss=sums["teacher_loss"] / positions,
        target_bytes_per_token=targets / tokens,
        histograms=histograms_to_json(hists),
    )
    return write_manifest(folder, jobs[0].meta.shared(), records, stats)
