"""Stage one, second half: the teacher over token shards → top-K logit shards + manifest per split.

Crash-safe and resumable: one output shard per input shard, written under a temporary name and renamed
when complete; a rerun keeps complete shards whose metadata matches this run and redoes the rest, so the
final cache is byte-identical to an uninterrupted run. Ranks split the shards (shard i goes to rank
i mod world); rank 0 writes the manifests once every rank is done.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.checkpoint import load_config, load_model, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.fsutil import clean_stale_tmp
from pipeline.layout import SPLITS
from pipeline.progress import progress
from pipeline.runtime import Runtime, teacher_dtype
from pipeline.settings import setting
from pipeline.shards import ShardWriter, rows_per_group
from pipeline.tokenizer import Tokenizer
from pipeline.topk import TopKConfig, teacher_targets
from schemas.common import with_meta
from schemas.logits import LogitsShardMeta, decode, encode, logits_schema, validate_logits_shard
from schemas.manifest import MANIFEST, LogitsStats, Manifest, ShardRecord, read_manifest, shard_record, write_manifest
from schemas.tokens import TokensMeta, validate_token_shard

STATS_KEY = b"distill.stats"


@dataclass(frozen=True)
class CaptureConfig:
    topk: TopKConfig = TopKConfig()
    batch_size: int = setting(8, "windows per teacher forward")
    cache_tokens: int = setting(0, "cache only the first train shards covering this many tokens (0: all); val is "
                                   "always whole")
    background_writes: bool = True  # compress and write on a thread while the teacher computes the next batch


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
                  split: str) -> LogitsShardMeta:
    return LogitsShardMeta(
        seq_len=token_meta.seq_len, vocab_size=vocab, topk=cfg.topk.topk, samples=cfg.topk.samples,
        sample_seed=cfg.topk.sample_seed, tokenizer_fingerprint=token_meta.tokenizer_fingerprint,
        teacher_fingerprint=teacher_fp, source_shard=shard.file, source_sha256=shard.sha256, split=split,
        corpus=token_meta.corpus, format=token_meta.format,
    )


def is_complete(path: Path, meta: LogitsShardMeta, rows: int) -> bool:
    """A shard from an earlier run counts only if it is readable, made with these settings, and whole."""
    if not path.is_file():
        return False
    try:
        return validate_logits_shard(path) == meta and pq.read_metadata(path).num_rows == rows
    except (PipelineError, OSError):
        return False


def capture(teacher: Path, tokens: Path, out: Path, cfg: CaptureConfig, runtime: Runtime = Runtime(),
            dtype: torch.dtype | None = None) -> dict[str, Manifest] | None:
    """Runs the teacher over every token shard; returns the manifests on rank 0."""
    if cfg.topk.samples > 65535:
        raise PipelineError(f"--samples {cfg.topk.samples}: at most 65535 draws per position (uint16 counts)")
    manifests = check_teacher_matches_tokens(teacher, tokens, SPLITS)
    if cfg.cache_tokens:
        manifests["train"] = limit_shards(manifests["train"], cfg.cache_tokens)
    vocab = load_config(teacher).vocab_size
    if not 0 < cfg.topk.topk <= vocab:
        raise PipelineError(f"--topk {cfg.topk.topk}: must be between 1 and the teacher's vocab_size {vocab}")
    device = runtime.device
    dtype = dtype or teacher_dtype(device)
    teacher_fp = model_fingerprint(teacher)
    if runtime.is_main:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            (out / split / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until rewritten
            clean_stale_tmp(out / split)
    runtime.barrier()

    jobs = []
    for split in SPLITS:
        token_meta = manifests[split].meta
        for i, shard in enumerate(manifests[split].shards):
            meta = expected_meta(token_meta, shard, teacher_fp, vocab, cfg, split)
            target = out / split / shard.file
            if i % runtime.world == runtime.rank and not is_complete(target, meta, shard.rows):
                jobs.append((tokens / split / shard.file, target, meta, shard))
    if jobs:
        model = load_model(teacher, dtype=dtype, device=device)
        total = sum(s.tokens for *_, s in jobs)
        bar = progress(total=total, desc=f"teacher-logits[{runtime.rank}]", unit=" tok", unit_scale=True,
                       position=runtime.rank)
        for source, target, meta, _ in jobs:
            _capture_shard(model, source, target, meta, cfg, device, bar)
        bar.close()
    runtime.barrier()
    if not runtime.is_main:
        return None
    shutil.copyfile(teacher / "tokenizer.model", out / "tokenizer.model")
    return {split: _write_split_manifest(out / split, manifests[split], cfg) for split in SPLITS}


def _capture_shard(model: torch.nn.Module, source: Path, target: Path, meta: LogitsShardMeta, cfg: CaptureConfig,
                   device: torch.device, bar: Any) -> None:
    if validate_token_shard(source).seq_len != meta.seq_len:
        raise PipelineError(f"{source}: seq_len differs from its manifest; rerun `make tokens`")
    chat = meta.format == "chat"
    table = pq.read_table(source)
    seq_len, k = meta.seq_len, meta.topk
    columns = decode(table, ("window", "input_ids", "continued", "label_mask") + (("loss_mask",) if chat else ()))
    ids, windows, mask = columns["input_ids"], columns["window"], columns["label_mask"]
    schema = logits_schema(seq_len, k, meta.samples, chat)
    row_bytes = seq_len * (k * 6 + 4 + meta.samples * 6) + (seq_len + 1) * 4
    sums = {"tail_mass": 0.0, "entropy": 0.0, "positions": 0}
    with ShardWriter(target, with_meta(schema, meta), rows_per_group(row_bytes), background=cfg.background_writes) as writer:
        for start in range(0, len(ids), cfg.batch_size):
            rows = slice(start, start + cfg.batch_size)
            batch = ids[rows]
            targets = teacher_targets(model, torch.tensor(batch, dtype=torch.long, device=device),
                                      windows[rows].tolist(), cfg.topk, torch.from_numpy(mask[rows]).to(device))
            writer.write(encode(targets, windows[rows], batch, columns["continued"][rows], schema,
                                columns["loss_mask"][rows] if chat else None))
            # Statistics over the positions that train (the others hold zeros).
            sums["tail_mass"] += float(targets.tail_mass.astype(np.float64).sum())
            sums["entropy"] += float(targets.entropy.astype(np.float64).sum())
            sums["positions"] += int(mask[rows].sum())
            bar.update(batch.shape[0] * seq_len)
        writer.footer[STATS_KEY] = json.dumps(sums, sort_keys=True).encode()


def _write_split_manifest(folder: Path, token_manifest: Manifest, cfg: CaptureConfig) -> Manifest:
    records, sums = [], {"tail_mass": 0.0, "entropy": 0.0, "positions": 0}
    meta = None
    for shard in token_manifest.shards:
        path = folder / shard.file
        meta = validate_logits_shard(path)
        stats = json.loads(pq.read_metadata(path).metadata[STATS_KEY])
        for key in sums:
            sums[key] += stats[key]
        records.append(shard_record(path, shard.rows, meta.seq_len))
    assert meta is not None
    positions = max(1, sums["positions"])  # trained positions: the means are over them
    stats = LogitsStats(
        bytes_per_token=sum(r.bytes for r in records) / max(1, sum(r.tokens for r in records)),
        mean_tail_mass=sums["tail_mass"] / positions,
        mean_teacher_entropy=sums["entropy"] / positions,
        capture_config=dataclasses.asdict(cfg),
    )
    return write_manifest(folder, meta.shared(), records, stats)
