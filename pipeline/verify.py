"""`make verify`: is a logit cache sound? Every problem is one line naming the file (and window).

At scale the checks come in two depths. Every shard gets the footer-level checks (a stat and its Parquet
footer: no data read); the sha256 and the value invariants read the whole shard, so by default they run on a
seeded random sample of shards (`sample`: a count, or a fraction), on every shard with `full`, and always on
a shard whose size or mtime moved since the capture record its writer left (schemas/manifest.py): a shard
changed after capture is named whether or not the sample drew it (a change that keeps both the size and the
nanosecond mtime is found only by the sample or `full`). Under several ranks (`LAUNCH`) the shards are
split across them; each rank writes its findings to `.verify/rank-N.json` and rank 0 reports for all.

1. Files against their manifest: each listed shard present, its size as recorded, its schema and metadata
   those of the cache, its row and token counts, its footer's trained-position count summing to the
   manifest's, its capture record's sha256 the manifest's; then (sampled) its sha256, window ids unique
   among the checked shards of a split; the train and val splits from one cache (`check_same_cache`, which
   stage two also calls); the cache's tokenizer.
2. Value invariants (sampled), vectorised over each row group, on the decoded values (whatever the encoding): top-K
   log-probs finite and ≤ 0, and in the stored order (ids ascending, or log-probs descending for
   probability-ordered caches); tail mass in [0, 1]; Σ exp(top-K) + tail = 1 within the log-probs' rounding;
   ids inside the vocabulary and unique per position; tail draws outside the top K, unique and ascending,
   counts summing to N; with the signals, the label's log-prob equal to its top-K entry when it has one and
   otherwise no larger than the K-th nor than the tail mass, the entropy within the bounds the top K and the
   tail mass allow; positions that do not train hold zeros; the footer's trained-position count right.
3. With `windows` n: the teacher re-runs n random windows (both splits), each inside the same batch of
   windows that stage one ran it in (same shapes, so the same kernels), in the dtype the cache recorded,
   and its top-K log-probs (rounded as the cache stores them), ids, tail mass and signals are compared with
   the cache's, both in probability order. This catches another teacher, another dtype and targets shifted
   against their labels.

   Tolerance (`tolerance`, nats, on top of the rounding of the stored log-probs: 2^-10·|log p| for float16,
   one step for 8-bit codes),
   calibrated on the debug teacher (float32, CPU; 40 windows each; tests/pipeline/test_verify.py holds the
   cases): the same teacher in stage one's batches differs by 0, and in other batch and head-chunk shapes by
   less than float16 rounding (< 1e-5); the same teacher in bfloat16 by up to 0.03 (every window flagged);
   a perturbed or another random teacher by 1.7–2.0; targets shifted by one position by 4.9. The default
   1e-3 sits between shape noise and a dtype change. A GPU cache re-run on another GPU model may differ
   like a dtype change does: raise the tolerance there (it is a flag).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.capture import DTYPES, STATS_KEY, assign_by_tokens, run_id, teacher_hashes
from pipeline.checkpoint import load_model, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.fsutil import list_names, read_json, sha256_file, write_json
from pipeline.layout import SPLITS, splits_of
from pipeline.runtime import Runtime, teacher_dtype
from pipeline.settings import setting
from pipeline.topk import NonFiniteLogits, TopKConfig, teacher_targets
from schemas.logits import (
    SAMPLE_COLUMNS,
    SIGNAL_COLUMNS,
    TAIL_COLUMNS,
    TOPK_COLUMNS,
    LogitsMeta,
    decode,
    logprob_rounding,
    stored_columns,
    stored_logprobs,
    validate_logits_shard,
)
from schemas.manifest import MANIFEST, RECORDS, Manifest, read_record, record_key, record_name
from schemas.tokens import TokensMeta

WINDOW_COLUMNS = ("window", "input_ids", "label_mask")
TOPK_AND_TAIL = (*TOPK_COLUMNS, *TAIL_COLUMNS)  # what every cache holds (the draws only with samples)
SUM_ATOL = 1e-4  # float32 log-sum-exp and tail sums over the vocabulary
# Settings that may differ between the splits of one cache or one token build.
PER_SPLIT = ("split", "source_shard", "source_sha256")
# Token splits: what stage two needs to agree (other fields describe how each split was cut).
TOKEN_FIELDS = ("kind", "schema_version", "seq_len", "vocab_size", "tokenizer_fingerprint", "format")


@dataclass(frozen=True)
class VerifyConfig:
    windows: int = setting(0, "re-run the teacher on this many random windows and compare with the cache (0: files "
                              "and invariants only)")
    seed: int = setting(0, "seed of the random choices: the re-run windows and the sampled shards")
    tolerance: float = setting(1e-3, "largest |Δ log-prob| (nats) and |Δ tail mass| between the re-run and the cache, "
                                     "beyond float16 rounding")
    dtype: str = setting("auto", "the re-run teacher's dtype (auto: the one the cache recorded)",
                         choices=("auto", "float32", "bfloat16", "float16"))
    sample: str = setting("32", "shards whose sha256 and value invariants are checked (every shard's footer is): a "
                                "count, or a fraction of the shards such as 0.01; a random choice seeded by --seed")
    full: int = setting(0, "1: check the sha256 and value invariants of every shard (--sample ignored)",
                        choices=(0, 1))
    poll_s: float = 1.0  # how often rank 0 looks for the other ranks' findings

    def __post_init__(self) -> None:
        sample_size(self.sample, 1)  # refuses a malformed --sample before any work


def sample_size(spec: str, shards: int) -> int:
    """How many of `shards` a --sample of `spec` checks: a count ("64"), or a fraction ("0.01", at least one)."""
    try:
        value = float(spec)
    except ValueError:
        value = -1.0
    fraction = any(c in str(spec) for c in ".eE")
    if not math.isfinite(value) or value < 0 or (fraction and value > 1) or (not fraction and not value.is_integer()):
        raise PipelineError(f"--sample {spec!r} (VERIFY_SAMPLE): a count of shards such as 64, or a fraction of them "
                            "in (0, 1] such as 0.01")
    if fraction:
        return min(shards, max(1, math.ceil(value * shards))) if value > 0 else 0
    return min(shards, int(value))


def pick_shards(count: int, spec: str, seed: int) -> set[int]:
    """The indices (of `count` shards, in manifest order over the splits) whose data is checked: a seeded
    uniform choice, the same on every rank."""
    n = sample_size(spec, count)
    return set(np.random.default_rng(seed).choice(count, size=n, replace=False).tolist()) if n else set()


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards: int = 0  # shards whose sha256 and values were checked
    rows: int = 0  # their windows
    positions: int = 0  # their trained positions
    rechecked: int = 0
    max_diff: float = 0.0
    footers: int = 0  # shards whose footer was checked (all of them)
    windows: dict[str, list[np.ndarray]] = field(default_factory=dict)  # split → window ids of the checked shards
    footer_positions: dict[str, int] = field(default_factory=dict)  # split → trained positions the footers count
    footer_shards: dict[str, int] = field(default_factory=dict)  # split → shards whose footer counted them

    def summary(self, cache: Path) -> str:
        rerun = (f"; the teacher re-ran {self.rechecked} window(s): largest |Δ log-prob| {self.max_diff:.3g} nats"
                 if self.rechecked else "")
        return (f"{cache}: sound — {self.footers} shards match their manifests (size, schema, metadata, rows); "
                f"{self.shards} of them ({self.rows:,} windows, {self.positions:,} trained positions) also their "
                f"sha256 and the cache's invariants{rerun}")

    def to_json(self) -> dict[str, Any]:
        return {"problems": self.problems, "shards": self.shards, "rows": self.rows, "positions": self.positions,
                "footers": self.footers, "footer_positions": self.footer_positions,
                "footer_shards": self.footer_shards,
                "windows": {s: np.concatenate(w).tolist() if w else [] for s, w in self.windows.items()}}

    def merge(self, raw: dict[str, Any]) -> None:
        self.problems += raw["problems"]
        self.shards += raw["shards"]
        self.rows += raw["rows"]
        self.positions += raw["positions"]
        self.footers += raw["footers"]
        for name in ("footer_positions", "footer_shards"):
            mine = getattr(self, name)
            for split, n in raw[name].items():
                mine[split] = mine.get(split, 0) + n
        for split, ids in raw["windows"].items():
            self.windows.setdefault(split, []).append(np.asarray(ids, dtype=np.int64))


# --- splits from one cache ------------------------------------------------------------------------------


def check_same_cache(train_meta: LogitsMeta | TokensMeta, val_meta: LogitsMeta | TokensMeta, where: Any) -> None:
    """Refuses a val split made by another teacher or cache (or, for token splits, another tokenizer or
    SEQ_LEN) than the train split: every shared setting must agree."""
    if train_meta.kind != val_meta.kind:
        raise PipelineError(f"{where}: the train split holds {train_meta.kind} shards, the val split {val_meta.kind} "
                            "shards; make both with one `make teacher-logits` run")
    a, b = dataclasses.asdict(train_meta), dataclasses.asdict(val_meta)
    keys = TOKEN_FIELDS if isinstance(train_meta, TokensMeta) else [k for k in a if k not in PER_SPLIT]
    differ = [k for k in keys if a.get(k) != b.get(k)]
    if differ:
        what = "another teacher" if "teacher_fingerprint" in differ else "other settings"
        detail = "; ".join(f"{k} {_short(a.get(k))} vs {_short(b.get(k))}" for k in differ)
        stage = "`make teacher-logits`" if train_meta.kind == "logits" else "`make tokens`"
        raise PipelineError(f"{where}: the val split was made by {what} than the train split ({detail}); "
                            f"make both splits with one {stage} run")


def _short(value: Any) -> str:
    text = repr(value)
    return text[:18] + "…'" if isinstance(value, str) and len(value) > 16 else text


# --- files and invariants -------------------------------------------------------------------------------


def verify_cache(cache: Path, cfg: VerifyConfig, teacher: Path | None = None,
                 device: torch.device | None = None, runtime: Runtime = Runtime(), run: str | None = None) -> Report:
    """The checks above; under several ranks every rank calls this, and rank 0's report holds everyone's.
    `run`: an id the ranks share (default: broadcast from rank 0)."""
    run = run or (run_id(runtime) if runtime.world > 1 else "")  # first, while every rank is at the same point
    report = Report()
    manifests: dict[str, Manifest] = {}
    for split in SPLITS:
        train = manifests.get("train")  # read first: whether the cache is of rollouts decides the splits
        if split not in splits_of(cache, train is not None and train.meta.rollouts is not None):
            continue
        manifest = _read_split_manifest(cache / split, report)
        if manifest is not None:
            manifests[split] = manifest
    shards = [(split, record) for split, m in manifests.items() for record in m.shards]
    picked = set(range(len(shards))) if cfg.full else pick_shards(len(shards), cfg.sample, cfg.seed)
    owners = assign_by_tokens([r.bytes for _, r in shards], runtime.world)
    listed = {split: list_names(cache / RECORDS / split) for split in manifests}
    for i, (split, record) in enumerate(shards):
        if owners[i] == runtime.rank:
            check_shard(cache / split / record.file, record, manifests[split].meta, report, i in picked,
                        listed[split])
    if not runtime.is_main:
        write_json(_findings(cache, runtime.rank), {"run": run, **report.to_json()})
        return report
    for rank in range(1, runtime.world):
        report.merge(_await_findings(cache, rank, run, cfg.poll_s))
    for split, manifest in manifests.items():
        check_split(cache / split, manifest, report)
    if len(manifests) == len(SPLITS):
        try:
            check_same_cache(manifests["train"].meta, manifests["val"].meta, cache)
        except PipelineError as e:
            report.problems.append(str(e))
    if manifests:
        _check_tokenizer(cache, next(iter(manifests.values())).meta, report)
    if cfg.windows > 0 and manifests:
        recheck(manifests, cache, cfg, teacher, device or (runtime.device if runtime.world > 1 else _device()), report)
    return report


def _findings(cache: Path, rank: int) -> Path:
    return cache / ".verify" / f"rank-{rank}.json"


def _await_findings(cache: Path, rank: int, run: str, poll_s: float) -> dict[str, Any]:
    """Rank 0: rank `rank`'s findings of this run (polled for: no collective that can time out)."""
    while True:
        try:
            raw = json.loads(_findings(cache, rank).read_text())
        except (OSError, ValueError):
            raw = None  # absent or being written
        if isinstance(raw, dict) and raw.get("run") == run:
            return raw
        time.sleep(poll_s)


def _read_split_manifest(folder: Path, report: Report) -> Manifest | None:
    try:
        raw = read_json(folder / MANIFEST, "the split is incomplete or missing; run `make teacher-logits`")
        if not isinstance(raw, dict) or raw.get("kind") != "logits":
            raise PipelineError(f"{folder / MANIFEST}: not a logits manifest")
        return Manifest.from_json(raw, folder / MANIFEST)
    except (PipelineError, KeyError, TypeError) as e:
        report.problems.append(str(e) if isinstance(e, PipelineError) else f"{folder / MANIFEST}: malformed ({e!r})")
        return None


def _check_tokenizer(cache: Path, meta: LogitsMeta, report: Report) -> None:
    from pipeline.tokenizer import Tokenizer

    path = cache / "tokenizer.model"
    try:
        found = Tokenizer.load(path).fingerprint if path.is_file() else None
    except (PipelineError, OSError, RuntimeError) as e:
        report.problems.append(f"{path}: unreadable ({' '.join(str(e).split())})")
        return
    if found != meta.tokenizer_fingerprint:
        what = "missing" if found is None else f"tokenizer {found[:16]}…"
        report.problems.append(f"{path}: {what}, the cache was made with {meta.tokenizer_fingerprint[:16]}…; copy the "
                               "teacher's tokenizer.model there (stage two reads it)")


def check_split(folder: Path, manifest: Manifest, report: Report) -> None:
    """One split's totals: rows and tokens against its shards, trained positions against the footers (when
    every footer was read), window ids unique among the checked shards."""
    split = folder.name
    if manifest.rows != sum(r.rows for r in manifest.shards) or manifest.tokens != sum(r.tokens for r in manifest.shards):
        report.problems.append(f"{folder / MANIFEST}: rows/tokens totals differ from the sum over its shards")
    expected = getattr(manifest.stats, "positions", None)
    counted = report.footer_positions.get(split)
    every = report.footer_shards.get(split) == len(manifest.shards)
    if expected is not None and every and expected != counted:
        report.problems.append(f"{folder / MANIFEST}: {expected} trained positions recorded, the shards' footers count "
                               f"{counted}")
    windows = report.windows.get(split)
    if windows:
        ids = np.concatenate(windows)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            report.problems.append(f"{folder}: {int((counts > 1).sum())} window id(s) appear more than once "
                                   f"(first: window {int(unique[counts > 1][0])}); the split mixes two caches")


def check_shard(path: Path, record: Any, meta: LogitsMeta, report: Report, deep: bool = True,
                records: set[str] | None = None) -> tuple[np.ndarray, int] | None:
    """One shard: the footer-level checks (a stat and the footer: size, schema, metadata, rows, the footer's
    position count, the capture record), then with `deep`, or when the shard moved since its capture record,
    its sha256 and values. Returns its window ids and trained positions when its values were checked."""
    problems = report.problems
    if not path.is_file():
        problems.append(f"{path}: listed in the manifest but missing; rerun `make teacher-logits`")
        return None
    stat = path.stat()
    if stat.st_size != record.bytes:
        problems.append(f"{path}: {stat.st_size} bytes, the manifest says {record.bytes}; the file changed after it was "
                        "written: delete it and rerun `make teacher-logits`")
        return None
    try:
        shard_meta = validate_logits_shard(path)
        footer = pq.read_metadata(path)
    except (PipelineError, OSError, pa.ArrowException) as e:
        problems.append(str(e) if isinstance(e, PipelineError) else
                        f"{path}: cannot read its footer ({' '.join(str(e).split())}); delete it and rerun "
                        "`make teacher-logits`")
        return None
    if shard_meta.shared() != meta:
        a, b = dataclasses.asdict(shard_meta.shared()), dataclasses.asdict(meta)
        differ = ", ".join(f"{k} {_short(a[k])} vs {_short(b[k])}" for k in a if a[k] != b[k])
        problems.append(f"{path}: metadata differs from the manifest's ({differ}); the shard is from another run")
        return None
    if shard_meta.source_shard != record.file:
        problems.append(f"{path}: made from {shard_meta.source_shard}, not from the token shard of its name")
    rows = footer.num_rows
    if rows != record.rows or record.tokens != record.rows * meta.seq_len:
        problems.append(f"{path}: {rows} rows, the manifest says {record.rows} rows / {record.tokens} tokens")
        return None
    report.footers += 1
    stats = (footer.metadata or {}).get(STATS_KEY)
    split = path.parent.name
    if stats is not None:
        report.footer_positions[split] = report.footer_positions.get(split, 0) + int(json.loads(stats)["positions"])
        report.footer_shards[split] = report.footer_shards.get(split, 0) + 1
    name = record_name(record.file, record_key(shard_meta))
    if records and name in records:
        captured = read_record(path.parent.parent / RECORDS / split / name)
        if captured.sha256 != record.sha256:
            problems.append(f"{path}: the manifest's sha256 is not the one its writer recorded "
                            f"({RECORDS}/{split}/{name}); the manifest vouches for bytes the capture did not write")
        deep = deep or (stat.st_size, stat.st_mtime_ns) != (captured.bytes, captured.mtime_ns)
    if not deep:
        return None
    if sha256_file(path) != record.sha256:
        problems.append(f"{path}: sha256 differs from the manifest's; the file changed after it was written: delete "
                        "it and rerun `make teacher-logits`")
        return None
    found = check_values(path, shard_meta, report)
    if found is not None:
        report.shards += 1
        report.rows += rows
        report.positions += found[1]
        report.windows.setdefault(split, []).append(found[0])
    return found


def check_values(path: Path, meta: LogitsMeta, report: Report) -> tuple[np.ndarray, int] | None:
    """The value invariants, one row group at a time; one line per kind of problem with its first window."""
    columns = (WINDOW_COLUMNS + TOPK_AND_TAIL + (SAMPLE_COLUMNS if meta.samples else ())
               + (SIGNAL_COLUMNS if meta.signals else ()))
    found: dict[str, list[Any]] = {}  # what → [count, first window, first position]
    windows, positions = [], 0
    try:
        f = pq.ParquetFile(path, page_checksum_verification=True)
        stored = stored_columns(columns, f.schema_arrow.names)
        for group in range(f.num_row_groups):
            arrays = decode(f.read_row_group(group, columns=stored), columns, meta)
            windows.append(arrays["window"])
            positions += int(arrays["label_mask"].sum())
            for what, bad in value_checks(arrays, meta).items():
                n = int(bad.sum())
                if n and what not in found:
                    row, pos = np.argwhere(bad)[0]
                    found[what] = [0, int(arrays["window"][row]), int(pos)]
                if n:
                    found[what][0] += n
        footer = (f.metadata.metadata or {}).get(STATS_KEY)
    except (OSError, pa.ArrowException) as e:
        report.problems.append(f"{path}: cannot read ({' '.join(str(e).split())}); the shard is corrupted, delete it "
                               "and rerun `make teacher-logits`")
        return None
    for what, (n, window, pos) in found.items():
        report.problems.append(f"{path}: {n} position(s) with {what}; first: window {window}, position {pos}")
    if footer is not None:
        recorded = json.loads(footer).get("positions")
        if recorded is not None and recorded != positions:
            report.problems.append(f"{path}: the footer counts {recorded} trained positions, the rows hold {positions}")
    ids = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
    return (ids, positions) if not found else None


def value_checks(a: dict[str, np.ndarray], meta: LogitsMeta) -> dict[str, np.ndarray]:
    """[rows, T] masks of the positions that break each invariant (vectorised numpy)."""
    ids, lp, tail, train = a["topk_ids"], a["topk_logprobs"].astype(np.float32), a["tail_mass"], a["label_mask"]
    vocab, encoding = meta.vocab_size, meta.encoding
    finite = np.isfinite(lp).all(-1) & np.isfinite(tail)
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(lp.astype(np.float64))
        total = p.sum(-1) + tail
        # Σ p_i·(rounding of lp_i) bounds the sum's error.
        allowed = (p * logprob_rounding(lp, encoding)).sum(-1) + SUM_ATOL
        ordered = np.sort(ids, axis=-1)
        if encoding.ascending:
            order = ("top-K ids not ascending", train & (ids[..., 1:] <= ids[..., :-1]).any(-1))
        else:
            order = ("log-probs not in descending order", (lp[..., 1:] > lp[..., :-1]).any(-1))
        checks = {
            "non-finite log-probs or tail mass": ~finite,
            "log-probs above 0": (lp > 0).any(-1),
            order[0]: order[1],
            "tail mass outside [0, 1]": (tail < 0) | (tail > 1),
            "Σ exp(top-K log-probs) + tail mass ≠ 1 beyond their rounding": train & finite & (np.abs(total - 1) > allowed),
            "top-K ids outside the vocabulary": ((ids < 0) | (ids >= vocab)).any(-1),
            "a top-K id repeated within the position": train & (ordered[..., 1:] == ordered[..., :-1]).any(-1),
            "targets at a position that does not train (stage one stores zeros there)":
                ~train & ((ids != 0).any(-1) | (lp != 0).any(-1) | (tail != 0)),
        }
        if meta.signals:
            checks.update(signal_checks(a, p, lp, meta))
    if meta.samples:
        sid, counts = a["sample_ids"], a["sample_counts"].astype(np.int64)
        drawn = counts > 0
        expected = np.where(train & (tail > 0), meta.samples, 0)
        checks[f"tail draw counts not summing to N = {meta.samples} (0 where nothing trains or no tail)"] = \
            counts.sum(-1) != expected
        checks["draw ids outside the vocabulary"] = (drawn & ((sid < 0) | (sid >= vocab))).any(-1)
        checks["draw ids not unique and ascending"] = (drawn[..., 1:] & (sid[..., 1:] <= sid[..., :-1])).any(-1)
        checks["a tail draw inside the top K"] = _draws_in_top_k(ordered, sid, drawn)
    return checks


def signal_checks(a: dict[str, np.ndarray], p: np.ndarray, lp: np.ndarray, meta: LogitsMeta) -> dict[str, np.ndarray]:
    """The label log-prob and the entropy against the position's own top K and tail mass. Both are float16
    (2^-11 of their size, × 2 margin); the top-K log-probs carry their encoding's rounding."""
    ids, tail, train, k = a["topk_ids"], a["tail_mass"].astype(np.float64), a["label_mask"], lp.shape[-1]
    label_lp, entropy = a["label_logprob"].astype(np.float64), a["entropy"].astype(np.float64)
    labels = a["input_ids"][:, 1:]
    rounding = logprob_rounding(lp, meta.encoding).astype(np.float64)
    own = 2.0**-10 * np.abs(label_lp) + 1e-4
    is_label = ids == labels[..., None]
    has = is_label.any(-1)
    lp_label = np.where(is_label, lp, 0.0).sum(-1)
    lp_min = lp.min(-1) if k else np.full(tail.shape, np.inf)
    min_rounding = rounding.max(-1) if k else 0.0
    # The entropy's top-K part −Σ_S p log p, and how far the rounding of the log-probs moves it.
    h_top = -(p * lp).sum(-1)
    h_err = (p * np.abs(lp + 1.0) * rounding).sum(-1) + 2.0**-10 * entropy + 1e-3
    r_log_r = np.where(tail > 0, tail * np.log(np.maximum(tail, 1e-300)), 0.0)
    # Every tail probability is ≤ the tail mass and ≤ the K-th probability: −log p_x ≥ max(−log r, −lp_K).
    lower = h_top + np.maximum(-r_log_r, np.where(np.isfinite(lp_min), -tail * lp_min, 0.0))
    upper = h_top - r_log_r + tail * np.log(max(1, meta.vocab_size - k))
    return {
        "non-finite label log-prob or entropy": ~(np.isfinite(label_lp) & np.isfinite(entropy)),
        "label log-prob above 0": label_lp > 0,
        "label log-prob unlike its top-K entry (targets shifted against their labels?)":
            train & has & (np.abs(label_lp - lp_label) > own + np.where(is_label, rounding, 0.0).sum(-1)),
        "label outside the top K more likely than the K-th id or than the tail mass":
            train & ~has & ((label_lp > lp_min + own + min_rounding) | (np.exp(label_lp - own) > tail + SUM_ATOL)),
        "entropy outside the bounds its top K and tail mass allow":
            train & ((entropy < lower - h_err) | (entropy > upper + h_err)),
        "signals at a position that does not train (stage one stores zeros there)":
            ~train & ((label_lp != 0) | (entropy != 0)),
    }


def _draws_in_top_k(ordered_ids: np.ndarray, sample_ids: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """[rows, T]: a counted draw equals one of the position's top-K ids. Each (position, id) becomes one int64
    key, position-major, so one sorted array and one searchsorted test every draw at once."""
    rows, t, k = ordered_ids.shape
    if k == 0 or rows * t == 0:
        return np.zeros((rows, t), dtype=bool)
    pos = np.arange(rows * t, dtype=np.int64)[:, None] << 32
    top = (pos + (ordered_ids.reshape(-1, k).astype(np.int64) + 2**31)).reshape(-1)
    draws = pos + (sample_ids.reshape(rows * t, -1).astype(np.int64) + 2**31)
    at = np.minimum(np.searchsorted(top, draws), len(top) - 1)
    return ((top[at] == draws) & drawn.reshape(rows * t, -1)).any(-1).reshape(rows, t)


# --- the teacher re-run ---------------------------------------------------------------------------------


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_windows(manifests: dict[str, Manifest], n: int, seed: int) -> list[tuple[str, Any, int]]:
    """n distinct (split, shard record, row), uniform over the rows of every split (global row numbers drawn,
    then located: nothing per row is listed)."""
    records = [(split, record) for split, m in manifests.items() for record in m.shards]
    starts = np.cumsum([0] + [r.rows for _, r in records])
    total = int(starts[-1])
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    located = []
    for g in picks:
        i = int(np.searchsorted(starts, g, side="right")) - 1
        located.append((records[i][0], records[i][1], int(g - starts[i])))
    return located


def _read_rows(path: Path, columns: list[str], lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of a shard, reading only the row groups that hold them."""
    f = pq.ParquetFile(path, page_checksum_verification=True)
    groups, first, at = [], 0, 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if at < hi and at + n > lo:
            first = at if not groups else first
            groups.append(g)
        at += n
    return f.read_row_groups(groups, columns=columns).slice(lo - first, hi - lo)


def recheck(manifests: dict[str, Manifest], cache: Path, cfg: VerifyConfig, teacher: Path | None,
            device: torch.device, report: Report) -> None:
    """Re-runs the teacher on `cfg.windows` random windows, each in its stage-one batch, and compares."""
    if teacher is None or not (teacher / "config.json").is_file():
        raise PipelineError(f"{teacher}: --windows {cfg.windows} re-runs the teacher, and this is not a Hugging Face "
                            "Gemma 2 directory; pass --teacher (the one the cache was made with)")
    meta = next(iter(manifests.values())).meta
    fingerprint = model_fingerprint(teacher, file_hash=teacher_hashes(teacher, cache))
    if fingerprint != meta.teacher_fingerprint:
        report.problems.append(f"{teacher}: teacher fingerprint {fingerprint[:16]}…, the cache was made by "
                               f"{meta.teacher_fingerprint[:16]}…; another teacher (or changed weights)")
    name = meta.capture_dtype if cfg.dtype == "auto" else cfg.dtype
    model = load_model(teacher, dtype=DTYPES[name] if name else teacher_dtype(device), device=device)
    by_batch: dict[tuple[str, str, int], list[int]] = {}
    for split, record, row in pick_windows(manifests, cfg.windows, cfg.seed):
        capture = manifests[split].stats.capture_config
        size = int(capture.get("batch_size", 8))
        by_batch.setdefault((split, record.file, row // size * size), []).append(row)
    for (split, file, start), rows in by_batch.items():
        capture = manifests[split].stats.capture_config
        # Draws are not compared (a pure-sampling cache, K = 0, needs some to be a valid setting).
        topk = TopKConfig(topk=meta.topk, head_chunk=int(capture.get("topk", {}).get("head_chunk", 2048)),
                          temperature=meta.temperature, samples=0 if meta.topk else 1)
        size = int(capture.get("batch_size", 8))
        _recheck_batch(model, cache / split / file, start, size, rows, topk, cfg.tolerance, device, meta, report)


def _recheck_batch(model: Any, path: Path, start: int, size: int, rows: list[int], topk: TopKConfig,
                   tolerance: float, device: torch.device, meta: LogitsMeta, report: Report) -> None:
    columns = WINDOW_COLUMNS + TOPK_AND_TAIL + (SIGNAL_COLUMNS if meta.signals else ())
    table = _read_rows(path, stored_columns(columns, pq.read_schema(path).names), start, start + size)
    cached = decode(table, columns, meta)
    try:
        fresh = teacher_targets(model, torch.from_numpy(cached["input_ids"].astype(np.int64)).to(device),
                                cached["window"].tolist(), topk, torch.from_numpy(cached["label_mask"]).to(device))
    except NonFiniteLogits as e:
        report.problems.append(f"{path}: re-run: {e}")
        return
    cached, fresh_values = by_probability(cached, meta), by_probability(as_stored(fresh, meta), meta)
    for row in rows:
        i = row - start
        diff, bad = compare_targets(cached, fresh_values, i, tolerance, meta)
        report.rechecked += 1
        report.max_diff = max(report.max_diff, diff)
        train = cached["label_mask"][i]
        if bad.any():
            report.problems.append(
                f"{path}: window {int(cached['window'][i])}: the re-run teacher differs from the cache at "
                f"{int(bad.sum())} of {int(train.sum())} trained positions (first: position {int(np.argmax(bad))}; "
                f"largest |Δ log-prob| {diff:.3g} nats, tolerance {tolerance:g}): another teacher, dtype or label "
                "alignment")


def as_stored(fresh: Any, meta: LogitsMeta) -> dict[str, np.ndarray]:
    """A re-run's targets rounded as the cache stores them (float16 or 8-bit log-probs, float16 signals)."""
    out = {"topk_ids": fresh.topk_ids, "tail_mass": fresh.tail_mass,
           "topk_logprobs": stored_logprobs(fresh.topk_logprobs, fresh.tail_mass, meta.encoding)}
    if meta.signals:
        out["label_logprob"] = fresh.label_logprob.astype(np.float16).astype(np.float32)
        out["entropy"] = fresh.entropy.astype(np.float16).astype(np.float32)
    return out


def by_probability(values: dict[str, np.ndarray], meta: LogitsMeta) -> dict[str, np.ndarray]:
    """Top-K ids and log-probs most likely first (ties by id), whatever order the cache stores."""
    lp = values["topk_logprobs"].astype(np.float32)
    order = np.lexsort((values["topk_ids"], -lp), axis=-1)
    return {**values, "topk_ids": np.take_along_axis(values["topk_ids"], order, -1),
            "topk_logprobs": np.take_along_axis(lp, order, -1)}


def compare_targets(cached: dict[str, np.ndarray], fresh: dict[str, np.ndarray], i: int, tolerance: float,
                    meta: LogitsMeta) -> tuple[float, np.ndarray]:
    """Row i of the cache against the re-run (both in probability order, rounded alike): the largest |Δ| over
    trained positions of log-probs (and signals), and [T] the positions whose log-probs, tail mass, ids or
    signals disagree beyond `tolerance` + the stored rounding. Ids may trade places within a near tie, or
    leave the top K at its edge."""
    train = cached["label_mask"][i]
    lp_c, lp_f = cached["topk_logprobs"][i], fresh["topk_logprobs"][i]
    ids_c, ids_f = cached["topk_ids"][i], fresh["topk_ids"][i]
    allowed = tolerance + np.maximum(logprob_rounding(lp_c, meta.encoding), logprob_rounding(lp_f, meta.encoding))
    delta = np.abs(lp_c - lp_f)
    values = (delta > allowed).any(-1) | (np.abs(cached["tail_mass"][i] - fresh["tail_mass"][i]) > tolerance)
    near = np.abs(lp_c[:, :, None] - lp_f[:, None, :]) <= allowed[:, :, None]
    edge = lp_f[:, -1:] if lp_f.shape[-1] else np.zeros((lp_f.shape[0], 1), np.float32)
    placed = ((ids_c[:, :, None] == ids_f[:, None, :]) & near).any(-1) | (lp_c <= edge + allowed)
    worst = delta.max(-1, initial=0.0)
    if meta.signals:
        for name in SIGNAL_COLUMNS:
            d = np.abs(cached[name][i] - fresh[name][i])
            values |= d > tolerance + 2.0**-10 * np.abs(cached[name][i]) + 1e-4
            worst = np.maximum(worst, d)
    bad = train & (values | ~placed.all(-1) | ~np.isfinite(delta).all(-1))
    return float(worst[train].max()) if train.any() else 0.0, bad
