"""Stage one, second half: the teacher over token shards → top-K logit shards + manifest per split.

Crash-safe and resumable: one output shard per input shard, written under a temporary name and renamed
when complete; a rerun keeps complete shards whose metadata matches this run and redoes the rest, so the
final cache is byte-identical to an uninterrupted run.

Several ranks, and no collective that can time out: shards go to ranks by tokens (largest first to the
least-loaded rank, the same plan on every rank from the manifests alone), so ranks finish together. The only
collective is one broadcast of a run id at the very start, before any slow work. Each rank cleans only the
stale temporary files of its own shards. At the end rank 0 does not wait in a barrier (a 27B shard takes
minutes, NCCL's default timeout is 10): it polls the shared filesystem until every shard is complete, then
writes the manifests; a rank that fails leaves a failure record (with the run id) that rank 0 reports.

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
from pipeline.fsutil import cached_sha256, clean_stale_tmp_of, write_json
from pipeline.layout import SPLITS
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
    LogitsShardMeta,
    Targets,
    decode,
    encode,
    row_bytes,
    schema_of,
    validate_logits_shard,
    write_options,
)
from schemas.manifest import MANIFEST, LogitsStats, Manifest, ShardRecord, read_manifest, shard_record, write_manifest
from schemas.tokens import TokensMeta, validate_token_shard

STATS_KEY = b"distill.stats"
HASH_CACHE = ".teacher_hashes.json"  # in the cache folder: the teacher's file hashes by (path, size, mtime)
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
    cache_tokens: int = setting(0, "cache only the first train shards covering this many tokens (0: all); val is "
                                   "always whole")
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
    background_writes: bool = True  # encode, compress and write on a thread while the teacher computes the next batch
    poll_s: float = 5.0  # how often rank 0 looks for the other ranks' shards at the end

    def __post_init__(self) -> None:
        self.encoding()  # refuses an unknown or incomplete encoding before any work

    def encoding(self) -> Encoding:
        q8 = self.logprob_coding == "q8"
        return Encoding(self.id_coding, self.logprob_coding, self.logprob_step if q8 else None, signals=True)


@dataclass(frozen=True)
class Job:
    """One shard to have on disk: where it comes from, where it goes, and what it must contain."""

    source: Path
    target: Path
    meta: LogitsShardMeta
    record: ShardRecord


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


def check_teacher_matches_tokens(teacher: Path, tokens: Path, splits: tuple[str, ...]) -> dict[str, Manifest]:
    """Before any work: same tokenizer, every id below the teacher's vocabulary."""
    tok_path = teacher / "tokenizer.model"
    if not tok_path.is_file():
        raise PipelineError(f"{tok_path}: the teacher directory has no tokenizer.model; copy the teacher's tokenizer there")
    teacher_fp = Tokenizer.load(tok_path).fingerprint
    vocab = load_config(teacher).vocab_size
    manifests = {s: read_manifest(tokens / s, "tokens") for s in splits}
    for split, manifest in manifests.items():
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
    """The leading shards that cover `tokens` (whole shards, so every cached shard has its source's name)."""
    kept, covered = [], 0
    for shard in manifest.shards:
        if covered >= tokens:
            break
        kept.append(shard)
        covered += shard.tokens
    return dataclasses.replace(manifest, shards=tuple(kept))


def expected_meta(token_meta: TokensMeta, shard: ShardRecord, teacher_fp: str, vocab: int, cfg: CaptureConfig,
                  split: str, dtype: str | None = None) -> LogitsShardMeta:
    return LogitsShardMeta(
        seq_len=token_meta.seq_len, vocab_size=vocab, topk=cfg.topk.topk, samples=cfg.topk.samples,
        sample_seed=cfg.topk.sample_seed, tokenizer_fingerprint=token_meta.tokenizer_fingerprint,
        teacher_fingerprint=teacher_fp, source_shard=shard.file, source_sha256=shard.sha256, split=split,
        corpus=token_meta.corpus, format=token_meta.format, temperature=cfg.topk.temperature, capture_dtype=dtype,
        **dataclasses.asdict(cfg.encoding()), sampling=cfg.topk.sampling,
    )


def is_complete(path: Path, meta: LogitsShardMeta, rows: int) -> bool:
    """A shard from an earlier run counts only if it is readable, made with these settings, and whole."""
    if not path.is_file():
        return False
    try:
        return validate_logits_shard(path) == meta and pq.read_metadata(path).num_rows == rows
    except (PipelineError, OSError):
        return False


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
        if runtime.world > 1 and not runtime.is_main:
            write_json(failure_record(out, runtime.rank), {"run": run, "error": _one_line(e)})
        raise


def _capture(teacher: Path, tokens: Path, out: Path, cfg: CaptureConfig, runtime: Runtime,
             run: str) -> dict[str, Manifest] | None:
    if cfg.topk.samples > 65535:
        raise PipelineError(f"--samples {cfg.topk.samples}: at most 65535 draws per position (uint16 counts)")
    manifests = check_teacher_matches_tokens(teacher, tokens, SPLITS)
    if cfg.cache_tokens:
        manifests["train"] = limit_shards(manifests["train"], cfg.cache_tokens)
    vocab = load_config(teacher).vocab_size
    if not 0 <= cfg.topk.topk <= vocab:
        raise PipelineError(f"--topk {cfg.topk.topk}: must be between 0 and the teacher's vocab_size {vocab}")
    dtype = resolve_dtype(cfg, runtime.device)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    failure_record(out, runtime.rank).unlink(missing_ok=True)
    if runtime.is_main:
        for split in SPLITS:
            (out / split / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until rewritten
    teacher_fp = model_fingerprint(teacher, file_hash=cached_sha256(out / HASH_CACHE))
    jobs = [Job(tokens / split / shard.file, out / split / shard.file,
                expected_meta(manifests[split].meta, shard, teacher_fp, vocab, cfg, split, dtype_name(dtype)), shard)
            for split in SPLITS for shard in manifests[split].shards]
    owners = assign_by_tokens([j.record.tokens for j in jobs], runtime.world)
    _run_jobs(teacher, [j for j, owner in zip(jobs, owners) if owner == runtime.rank], cfg, runtime, dtype)
    if not runtime.is_main:
        return None
    _wait_for(jobs, out, run, runtime.world, cfg.poll_s)
    shutil.copyfile(teacher / "tokenizer.model", out / "tokenizer.model")
    manifests = {split: _write_split_manifest(out / split, manifests[split], cfg) for split in SPLITS}
    for rank in range(1, runtime.world):
        failure_record(out, rank).unlink(missing_ok=True)  # every shard is complete: older records are moot
    return manifests


def _run_jobs(teacher: Path, jobs: list[Job], cfg: CaptureConfig, runtime: Runtime, dtype: torch.dtype) -> None:
    for job in jobs:
        clean_stale_tmp_of(job.target)  # only this rank writes these shards
    todo = [j for j in jobs if not is_complete(j.target, j.meta, j.record.rows)]
    if not todo:
        return
    model = load_model(teacher, dtype=dtype, device=runtime.device)
    bar = progress(total=sum(j.record.tokens for j in todo), desc=f"teacher-logits[{runtime.rank}]", unit=" tok",
                   unit_scale=True, position=runtime.rank)
    delay = _test_delay(runtime.rank)
    try:
        for job in todo:
            if delay:
                time.sleep(delay)
            _capture_shard(model, job.source, job.target, job.meta, cfg, runtime.device, bar)
    finally:
        bar.close()  # ends its line, so an error message starts on a line of its own


def _wait_for(jobs: list[Job], out: Path, run: str, world: int, poll_s: float) -> None:
    """Rank 0: polls the filesystem until every shard is complete; a failure record of this run from another
    rank stops the stage with that rank's line. No timeout: a rank that dies without a record is the
    launcher's to notice (torchrun stops the job)."""
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
        pending = [j for j in pending if not is_complete(j.target, j.meta, j.record.rows)]
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
                   device: torch.device, bar: Any) -> None:
    if validate_token_shard(source).seq_len != meta.seq_len:
        raise PipelineError(f"{source}: seq_len differs from its manifest; rerun `make tokens`")
    chat = meta.format == "chat"
    table = pq.read_table(source)
    seq_len, k = meta.seq_len, meta.topk
    columns = decode(table, ("window", "input_ids", "continued", "label_mask") + (("loss_mask",) if chat else ()))
    ids, windows, mask = columns["input_ids"], columns["window"], columns["label_mask"]
    schema, encoding = schema_of(meta), meta.encoding
    stats = ShardStats()

    def write(targets: Targets, rows: slice) -> None:  # on the background thread
        writer.write(encode(targets, windows[rows], ids[rows], columns["continued"][rows], schema,
                            columns["loss_mask"][rows] if chat else None, encoding))
        stats.add(targets, mask[rows])

    with ShardWriter(target, with_meta(schema, meta), rows_per_group(row_bytes(seq_len, k, meta.samples)),
                     options=write_options(schema)) as writer:
        with Background(cfg.background_writes) as background:
            for start in range(0, len(ids), cfg.batch_size):
                rows = slice(start, start + cfg.batch_size)
                batch = ids[rows]
                try:
                    targets = teacher_targets(model, torch.tensor(batch, dtype=torch.long, device=device),
                                              windows[rows].tolist(), cfg.topk, torch.from_numpy(mask[rows]).to(device))
                except NonFiniteLogits as e:
                    hint = " (float16 overflows in Gemma 2: use bfloat16)" if meta.capture_dtype == "float16" else ""
                    raise PipelineError(f"{target}: {e}; the shard was not written and no manifest was; check the "
                                        f"teacher checkpoint and its dtype{hint}") from None
                background.submit(write, targets, rows)
                bar.update(batch.shape[0] * seq_len)
        writer.footer[STATS_KEY] = stats.to_json()


def target_bytes(path: Path) -> int:
    """Compressed bytes of a shard's target columns (what a cache mode costs; the window columns are the
    token shard's), from the Parquet column-chunk sizes."""
    meta = pq.read_metadata(path)
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema.split(".")[0]
               in TARGET_COLUMNS)


def _write_split_manifest(folder: Path, token_manifest: Manifest, cfg: CaptureConfig) -> Manifest:
    records, sums = [], {"tail_mass": 0.0, "entropy": 0.0, "teacher_loss": 0.0, "positions": 0}
    hists: dict[str, Any] = {}
    meta, targets = None, 0
    for shard in token_manifest.shards:
        path = folder / shard.file
        meta = validate_logits_shard(path)
        stats = json.loads(pq.read_metadata(path).metadata[STATS_KEY])
        for key in sums:
            sums[key] += stats[key]
        hists = add_histograms(hists, histograms_from_json(stats["histograms"]))
        targets += target_bytes(path)
        records.append(shard_record(path, shard.rows, meta.seq_len))
    assert meta is not None
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
    return write_manifest(folder, meta.shared(), records, stats)
