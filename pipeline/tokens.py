"""Stage one, first half: corpus → `<bos> doc <eos>` packed into `<bos>`-first windows of SEQ_LEN+1 → token
shards (the window contract is in schemas/tokens.py).

The corpus is planned into work units fixed by the input alone (pipeline/corpus.py). Each unit is
tokenized on its own: its documents (split by a hash of their id) are packed into its own train and val
windows, its last windows padded, and written as its own shards `{split}/{split}-UUUUUU-KKKKK.parquet`
(window index = unit << 32 | row), then a completion record `units/UUUUUU.json`; both are written under a
temporary name and renamed. So the output is byte-identical whatever processes did the work, and a killed
run continues from its completed units.

Units are dealt round-robin to WORKERS local processes per rank (`unit % (ranks × workers)`). Rank 0 then
waits for every needed unit's record on the shared file system (polling, no collective, so no timeout
can fire during a long run; a failed rank leaves a failure record that rank 0 reports), and writes each
split's manifest from the records in unit order: train up to --corpus-tokens (the leading units), val up to
--val-tokens (whole units spread evenly over the plan, `spread_order`); the last kept shard is cut to a `-cap`
copy. Both caps depend on the records only, never on the process count. A document's split is a hash of its
content (pipeline/corpus.py `split_key`), so val documents never reach train: those of val units beyond the
cap are in neither split.

Chat (`--format chat`): each conversation is rendered in Gemma's template and tokenized whole, its
`loss_mask` taken from the tokens' character spans (pipeline/chat.py); it is packed as one document
`<bos> conversation` (no `<eos>`: the template ends each turn) and never split across windows: one that does
not fit the rest of a window starts the next (the rest padded), one longer than a window keeps its leading
whole turns up to its last model turn that fits, or is dropped (`ChatStream`; counts in `stats.conversations`).

Filters (pipeline/filters.py): personal information is scrubbed where a document is read; dropping filters
(duplicates, length, blocklist) first sketch every unit (in the same WORKERS processes, each unit's records by
hash in `filters/sketch/`), then rank 0 cuts the decision into hash partitions (`filters/layout.json`, from the
records' count and `--filter-memory-mb`), every process decides its partitions (`filters/part/`) and then
writes the decisions of its groups of units (`filters/decisions/`), and tokenization skips the dropped
documents. A process holds its own units only, never the unit plan. Counts per split and filter in
`stats.filters`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import chat
from pipeline.corpus import CorpusSpec, Piece, Splitter, Unit, iter_split_documents, plan_units, read_unit
from pipeline.errors import PipelineError
from pipeline.filters import (
    DROPS,
    GROUPS,
    KEEP,
    PARTS,
    SKETCH,
    FilterConfig,
    Filters,
    Layout,
    Sketch,
    Sketches,
    decide_partition,
    decision_path,
    gather_group,
    scrub,
    scrub_turns,
    sketch_chat,
    write_unit,
)
from pipeline.fsutil import clean_stale_tmp, write_json
from pipeline.layout import SPLITS
from pipeline.progress import progress
from pipeline.runtime import Runtime
from pipeline.settings import setting
from pipeline.shards import ShardWriter, rows_per_group
from pipeline.tokenizer import BOS, EOS, PAD, Tokenizer
from schemas.common import from_json, to_json, with_meta
from schemas.manifest import MANIFEST, Manifest, ShardRecord, TokensStats, read_manifest, shard_record, write_manifest
from schemas.tokens import TokensMeta, encode, token_schema

UNITS = "units"  # the completion records, beside the split folders
FILTERS = "filters"  # the dropping filters' pre-pass: sketch/ and decisions/ per unit, part/ and groups/ per job
POLL_S = 2.0  # rank 0's polling interval while other ranks finish their units
BATCH_CHARS = 4 << 20  # characters per sentencepiece batch call (several pieces of a long document: its threads share them)
BATCH_PIECES = 1024
STALE_S = 60.0  # a failure record older than rank 0's start by more than this is from an earlier run
PII_KINDS = ("email", "phone", "ip", "card")
BAD_LINES_SHOWN = 10  # per unit: malformed lines named on stderr under --skip-bad-lines (all are counted)
CONVERSATION_COUNTS = ("whole", "cut", "too_long", "no_reply", "markers")


@dataclass(frozen=True)
class TokenizeConfig:
    seq_len: int = setting(128, "positions per window (a window holds SEQ_LEN+1 tokens)")
    val_fraction: float = setting(0.03, "share of documents (by a hash of their content) in the validation split")
    shard_windows: int = setting(1024, "windows per token shard")
    vocab_size: int = setting(4096, "pieces of a tokenizer trained here (unused with --tokenizer)", flag="vocab")
    corpus_tokens: int = setting(0, "stop after this many train tokens (0: the whole corpus)")
    val_tokens: int = setting(2_000_000, "cap on the validation split: whole work units spread evenly over the "
                                         "corpus that cover this many tokens (0: no cap)")
    workers: int = setting(1, "tokenizer processes on this host (per rank under LAUNCH); the output does not "
                              "depend on it")
    unit_bytes: int = setting(64 << 20, "corpus bytes per work unit (a group of small files or a slice of a large "
                                        "one); fixes the output, so keep it when resuming")
    # How much of a long document is read and encoded at once: sentencepiece slows down on long strings
    # (1 MiB pieces encode at ~0.6× the speed of 64 KiB ones). Tests make it small.
    piece_bytes: int = 64 << 10


def train_tokenizer(spec: CorpusSpec, cfg: TokenizeConfig) -> Tokenizer:
    """Trains on the train split only, so validation text never shapes the vocabulary."""
    if spec.chat:
        raise PipelineError("FORMAT=chat tokenizes with the teacher's tokenizer: pass --tokenizer (TOKENIZER=) "
                            "its tokenizer.model")
    texts = (text for split, _, text in iter_split_documents(spec, cfg.unit_bytes, cfg.piece_bytes, cfg.val_fraction)
             if split == "train")
    return Tokenizer.train(texts, cfg.vocab_size)


def build_token_shards(spec: CorpusSpec, tokenizer: Tokenizer, out: Path, cfg: TokenizeConfig,
                       runtime: Runtime = Runtime(), filters: FilterConfig = FilterConfig()) -> dict[str, Manifest] | None:
    """Tokenizes the corpus into `out/{train,val}/`; returns the two manifests on rank 0."""
    if cfg.workers < 1:
        raise PipelineError(f"--workers {cfg.workers}: must be at least 1")
    flt = filters.resolve(spec.format)
    if spec.chat:
        tokenizer.chat_ids()
    metas = split_metas(spec, tokenizer, cfg, flt)
    units = plan_units(spec, cfg.unit_bytes)
    plan = _sha([u.to_json() for u in units])
    if _already_built(out, metas, plan):
        print(f"{out}: token shards with these settings are complete; nothing to do")
        return {s: read_manifest(out / s, "tokens") for s in SPLITS} if runtime.is_main else None
    job = _Job(spec, cfg, out, _unit_key(metas["train"], spec, cfg), metas, tokenizer.proto, tuple(units), (),
               _digests(units, {}), encode_threads(cfg.workers), 0, flt)
    records = out / UNITS
    records.mkdir(parents=True, exist_ok=True)
    failure = records / f"failed-rank{runtime.rank}.json"
    failure.unlink(missing_ok=True)
    if runtime.is_main:
        for split in SPLITS:
            (out / split / MANIFEST).unlink(missing_ok=True)  # incomplete until this run writes it again
        (records / "rank0.started").write_text(f"{time.time()}\n")
        tokenizer.save(out / "tokenizer.model")  # every data folder carries the tokenizer it was made with
    try:
        if flt.drops:
            job = _prefilter(job, runtime, plan)
        _run_workers(job, runtime)
    except Exception as e:
        write_json(failure, {"rank": runtime.rank, "error": str(e) or type(e).__name__})
        raise
    if not runtime.is_main:
        return None
    done = _wait_for_units(job)
    return _finalize(job, done, plan)


def split_metas(spec: CorpusSpec, tokenizer: Tokenizer, cfg: TokenizeConfig,
                filters: Filters = Filters()) -> dict[str, TokensMeta]:
    return {s: TokensMeta(seq_len=cfg.seq_len, vocab_size=tokenizer.vocab_size,
                          tokenizer_fingerprint=tokenizer.fingerprint, corpus=spec.describe(), split=s,
                          format=spec.format, val_fraction=cfg.val_fraction, corpus_tokens=cfg.corpus_tokens,
                          shard_windows=cfg.shard_windows, val_tokens=cfg.val_tokens, unit_bytes=cfg.unit_bytes,
                          filters=filters.describe(), split_by="content",
                          text_docs=spec.text_docs if spec.text_docs != "file" else None)
            for s in SPLITS}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _unit_key(meta: TokensMeta, spec: CorpusSpec, cfg: TokenizeConfig) -> str:
    """Everything a unit's output depends on besides its own input (which its record holds)."""
    return _sha({**to_json(meta), "split": None, "text_column": spec.text_column,
                 **({"skip_bad_lines": 1} if spec.skip_bad_lines else {}),
                 "messages_column": spec.messages_column, "dataset_split": spec.dataset_split,
                 "piece_bytes": cfg.piece_bytes})


def _already_built(out: Path, metas: dict[str, TokensMeta], plan: str) -> bool:
    try:
        manifests = {s: read_manifest(out / s, "tokens") for s in SPLITS}
    except PipelineError:
        return False
    return all(m.meta == metas[s] and m.stats.units_sha256 == plan for s, m in manifests.items())


def encode_threads(workers: int) -> int:
    """sentencepiece threads per process: this host's cores shared by its processes (ranks × workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (workers * int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def val_target(cfg: TokenizeConfig) -> int:
    """Val tokens wanted (0: all): the cap, and under --corpus-tokens at most the val fraction's share."""
    target = cfg.val_tokens
    if cfg.corpus_tokens:
        share = math.ceil(cfg.corpus_tokens * cfg.val_fraction / max(1e-9, 1 - cfg.val_fraction))
        target = min(target, share) if target else share
    return target


# ---------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Job:
    """What one tokenizer process needs (picklable for spawned workers): its own units, not the plan."""

    spec: CorpusSpec
    cfg: TokenizeConfig
    out: Path
    key: str
    metas: dict[str, TokensMeta]
    tokenizer: bytes  # the serialized model
    plan: tuple[Unit, ...]  # the whole unit plan: a rank's main process only (workers get ())
    mine: tuple[Unit, ...]  # this process's units
    digests: bytes  # 8 bytes a unit of the plan: its JSON and decisions (what `_covered` checks of the others)
    threads: int
    slot: int
    filters: Filters = Filters()
    # With dropping filters: the sha256 of each unit's decisions (the main process: every unit; a worker: its
    # own), which a unit's output depends on; and how the decisions are cut into jobs.
    drops: dict[int, str] = field(default_factory=dict)
    layout: Layout | None = None
    slots: int = 1  # processes over all ranks

    @property
    def chat(self) -> bool:
        return self.spec.chat

    @property
    def units(self) -> int:
        return len(self.digests) // DIGEST


DIGEST = 8  # bytes of a unit's digest


def _digest(unit: dict[str, Any] | None, drops: str | None) -> bytes:
    return hashlib.blake2b(json.dumps([unit, drops], sort_keys=True).encode(), digest_size=DIGEST).digest()


def _digests(units: list[Unit] | tuple[Unit, ...], drops: dict[int, str]) -> bytes:
    return b"".join(_digest(u.to_json(), drops.get(u.index)) for u in units)


def _run_workers(job: _Job, runtime: Runtime, fn: Any = None) -> None:
    """Deals units to this rank's workers (unit i → slot i mod ranks × workers) and runs them; a worker gets
    its own units, not the plan."""
    slots = runtime.world * job.cfg.workers
    jobs = []
    for slot in range(runtime.rank * job.cfg.workers, (runtime.rank + 1) * job.cfg.workers):
        mine = tuple(u for u in job.plan if u.index % slots == slot)
        jobs.append(dataclasses.replace(job, plan=(), mine=mine, slot=slot, slots=slots,
                                        drops={u.index: job.drops[u.index] for u in mine if u.index in job.drops}))
    fn = fn or _work
    if len(jobs) == 1:
        fn(jobs[0])
        return
    # spawn: a clean interpreter per worker (no forked threads or locks). The first failure (in the order they
    # end: a worker may be waiting for a failed one's files) terminates the others; a success lets them exit on
    # their own (terminating finished workers leaks their semaphores).
    pool = multiprocessing.get_context("spawn").Pool(len(jobs))
    try:
        for _ in pool.imap_unordered(fn, jobs):
            pass
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _work(job: _Job) -> None:
    tokenizer = Tokenizer(job.tokenizer, "<tokenizer>")
    known: dict[int, tuple[int, int]] = {}
    with progress(desc=f"tokenize[{job.slot}]", unit=" tok", unit_scale=True, position=job.slot) as bar:
        for unit in job.mine:
            if _complete(job, unit) is not None:
                continue
            if job.cfg.corpus_tokens and _covered(job, unit.index, known):
                continue  # the units before this one already hold every token the caps keep
            _tokenize_unit(job, unit, tokenizer, bar)


def _covered(job: _Job, index: int, known: dict[int, tuple[int, int]]) -> bool:
    """Whether complete units before `index` already cover both caps: a leading run of them, so a unit past
    one that was itself skipped is skipped too. Their records are checked against the plan's digests (a
    worker does not hold the plan)."""

    def counts() -> Iterator[tuple[int, int] | None]:
        for i in range(index):  # read lazily: stops at the first unit not complete, or once the caps are met
            if i not in known:
                record = _read_record(job, i)
                if record is None or _digest(record.get("unit"), record.get("drops")) != \
                        job.digests[i * DIGEST : (i + 1) * DIGEST] or not _shards_there(job, record):
                    break
                known[i] = _token_counts(record)
            yield known[i]
        yield None  # unit `index` itself is not done: so the count is known only if the units before it suffice

    return needed_units(counts(), job.cfg) is not None


def _token_counts(record: dict[str, Any]) -> tuple[int, int]:
    """A unit record's (train, val) tokens."""
    return tuple(sum(s["tokens"] for s in record["splits"][split]["shards"]) for split in SPLITS)  # type: ignore[return-value]


def needed_units(counts: Iterable[tuple[int, int] | None], cfg: TokenizeConfig) -> int | None:
    """How many leading units the manifests draw from, given each unit's (train, val) tokens, or None while
    that is not known yet (a record in the way is missing). Under --corpus-tokens the first units that cover
    both caps; else all."""
    train = val = n = 0
    target = val_target(cfg)
    for n, count in enumerate(counts, 1):
        if count is None:
            return None
        train, val = train + count[0], val + count[1]
        if cfg.corpus_tokens and train >= cfg.corpus_tokens and (not target or val >= target):
            return n
    return n


def _tokenize_unit(job: _Job, unit: Unit, tokenizer: Tokenizer, bar: Any) -> None:
    cfg = job.cfg
    streams: dict[str, Any] = {s: (ChatStream if job.chat else WindowStream)(cfg.seq_len) for s in SPLITS}
    writers = {s: _UnitWriter(job.out / s, s, unit.index, job.metas[s], cfg) for s in SPLITS}
    budgets = {"train": cfg.corpus_tokens, "val": val_target(cfg)}  # one unit never needs more (0: all)
    stats = {s: _SplitStats.new(job) for s in SPLITS}
    verdicts = _Verdicts(job, unit)
    splitter = Splitter(cfg.val_fraction)
    for batch in _batches(read_unit(job.spec, unit, cfg.piece_bytes)):
        open_ = {s for s in SPLITS if not budgets[s] or writers[s].total * cfg.seq_len < budgets[s]}
        if not open_:
            break
        routed = []
        for piece in batch:
            if piece.bad is not None:
                stats["train"].bad_line(piece.bad)
                continue
            split = splitter(piece)
            code = verdicts.code(piece)
            if split not in open_:
                continue
            if code != KEEP:
                if verdicts.new:
                    stats[split].dropped(code)
                continue
            routed.append((stats[split].scrubbed(piece, job.filters), split))
        pack = _pack_chat if job.chat else _pack_text
        for split, window, continued, mask in pack(job, tokenizer, routed, streams, stats, bar):
            writers[split].add(window, continued, mask)
    for split in SPLITS:
        for window, continued, *mask in streams[split].flush():
            writers[split].add(window, continued, *mask)
        if job.chat:
            stats[split].add_conversations(streams[split].counts)
    shards = {s: writers[s].finish() for s in SPLITS}
    write_json(_record_path(job.out, unit.index), {
        "key": job.key, "unit": unit.to_json(), "drops": job.drops.get(unit.index),
        "splits": {s: {**stats[s].to_json(), "shards": [to_json(r) for r in shards[s]]} for s in SPLITS},
    })


def _pack_text(job: _Job, tokenizer: Tokenizer, routed: list[tuple[Piece, str]], streams: dict[str, Any],
               stats: dict[str, _SplitStats], bar: Any) -> Iterator[tuple[str, np.ndarray, bool, None]]:
    for (piece, split), ids in zip(routed, encode_pieces(tokenizer, [p for p, _ in routed], job.threads)):
        if piece.first and piece.last and not len(ids):
            continue  # a document with no tokens
        for window, continued in streams[split].push(ids, piece.first, piece.last):
            yield split, window, continued, None
        stats[split].documents += piece.first
        bar.update(len(ids))


def _pack_chat(job: _Job, tokenizer: Tokenizer, routed: list[tuple[Piece, str]], streams: dict[str, Any],
               stats: dict[str, _SplitStats], bar: Any) -> Iterator[tuple[str, np.ndarray, bool, np.ndarray]]:
    kept = []
    for piece, split in routed:
        assert piece.turns is not None
        if chat.has_markers(piece.turns):
            stats[split].conversations["markers"] += 1  # would forge turns: dropped
            continue
        kept.append((piece, split))
    encoded = chat.encode(tokenizer, [chat.render(p.turns) for p, _ in kept], job.threads)  # type: ignore[arg-type]
    for (_, split), conversation in zip(kept, encoded):
        for window, continued, mask in streams[split].push(conversation):
            yield split, window, continued, mask
        bar.update(len(conversation.ids))


@dataclass
class _SplitStats:
    """One unit's counts for one split: documents packed, filters, conversations."""

    documents: int
    filters: dict[str, int] | None
    conversations: dict[str, int] | None

    @classmethod
    def new(cls, job: _Job) -> _SplitStats:
        names = [n for n in job.filters.active if n != "pii"]
        names += [f"pii_{k}" for k in PII_KINDS] if job.filters.pii else []
        names += ["bad_lines"] if job.spec.skip_bad_lines else []
        return cls(0, dict.fromkeys(names, 0) if names else None,
                   dict.fromkeys(CONVERSATION_COUNTS, 0) if job.chat else None)

    def bad_line(self, why: str) -> None:
        """A malformed line skipped under --skip-bad-lines: named on stderr (the first few), counted."""
        assert self.filters is not None
        self.filters["bad_lines"] += 1
        if self.filters["bad_lines"] <= BAD_LINES_SHOWN:
            print(f"skipped: {why}", file=sys.stderr, flush=True)

    def dropped(self, code: int) -> None:
        assert self.filters is not None
        self.filters[DROPS[code]] += 1

    def scrubbed(self, piece: Piece, filters: Filters) -> Piece:
        if not filters.pii:
            return piece
        if piece.turns is not None:
            turns, counts = scrub_turns(piece.turns)
            piece = dataclasses.replace(piece, turns=turns)
        else:
            text, counts = scrub(piece.text)
            piece = dataclasses.replace(piece, text=text)
        assert self.filters is not None
        for kind, n in counts.items():
            self.filters[f"pii_{kind}"] += n
        return piece

    def add_conversations(self, counts: dict[str, int]) -> None:
        assert self.conversations is not None
        for k, v in counts.items():
            self.conversations[k] += v
        self.documents = self.conversations["whole"] + self.conversations["cut"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"documents": self.documents}
        if self.filters is not None:
            out["filters"] = self.filters
        if self.conversations is not None:
            out["conversations"] = self.conversations
        return out


class _Verdicts:
    """The pre-pass's decision for each document of a unit, in reading order (a new document id is a new
    document: a later byte range of a large file, which starts mid-document, is one of its own)."""

    def __init__(self, job: _Job, unit: Unit) -> None:
        self.where = decision_path(job.out / FILTERS, unit.index)
        self.codes = np.load(self.where, allow_pickle=False) if job.filters.drops else None
        self.index, self.doc_id, self.current = -1, None, KEEP
        self.new = False  # whether the last piece began a document

    def code(self, piece: Piece) -> int:
        if self.codes is None:
            return KEEP
        self.new = piece.doc_id != self.doc_id or piece.first
        if self.new:
            self.index, self.doc_id = self.index + 1, piece.doc_id
            if self.index >= len(self.codes):
                raise PipelineError(f"{self.where}: holds {len(self.codes)} decisions, the unit has more documents; "
                                    f"the corpus changed while tokenizing: rerun")
            self.current = int(self.codes[self.index])
        return self.current


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    """Pieces grouped for one sentencepiece call (it encodes a list of strings in C++)."""
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_pieces(tokenizer: Tokenizer, pieces: list[Piece], threads: int = 1) -> list[np.ndarray]:
    """Token ids of each piece. A piece that continues its document after a newline is encoded with that
    newline in front and its ids dropped, so it gets the ids it has inside the whole document (no
    sentencepiece dummy-prefix space at the cut); where the newline's ids do not come out first (merged
    with what follows), the piece is encoded alone."""
    newline = encode_batch(tokenizer, ["\n"])[0]
    out = encode_batch(tokenizer, [("\n" + p.text) if p.after_newline else p.text for p in pieces], threads)
    for i, piece in enumerate(pieces):
        if piece.after_newline:
            ids = out[i]
            out[i] = ids[len(newline):] if np.array_equal(ids[: len(newline)], newline) else \
                encode_batch(tokenizer, [piece.text])[0]
    return out


def encode_batch(tokenizer: Tokenizer, texts: list[str], threads: int = 1) -> list[np.ndarray]:
    """Token ids of each text as int32 arrays, from one sentencepiece batch call."""
    if not texts:
        return []
    try:
        return tokenizer.sp.encode(texts, num_threads=threads, return_type="numpy")
    except ValueError:  # sentencepiece before 0.2.1 returns lists only
        return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.sp.encode(texts, num_threads=threads)]


def _record_path(out: Path, index: int) -> Path:
    return _done_path(out / UNITS, index)


def _complete(job: _Job, unit: Unit) -> dict[str, Any] | None:
    """A unit's record if it is from these settings, this input and these filter decisions, and its shards
    are all there."""
    record = _read_record(job, unit.index)
    if record is None or record.get("unit") != unit.to_json() or record.get("drops") != job.drops.get(unit.index):
        return None
    return record if _shards_there(job, record) else None


def _read_record(job: _Job, index: int) -> dict[str, Any] | None:
    """A unit's record if there is one from these settings."""
    return _keyed(_record_path(job.out, index), job.key)


def _keyed(path: Path, key: str) -> dict[str, Any] | None:
    """The JSON record at `path` if it was written for `key` (these settings); None while there is none, or
    while another process's write is not visible yet."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _done_path(folder: Path, index: int) -> Path:
    """Record NNNNNN.json of a folder of records (units/, and the pre-pass's sketch/, part/, groups/, where it
    sits beside the job's NNNNNN*.npy files)."""
    return folder / f"{index:06d}.json"


def _shards_there(job: _Job, record: dict[str, Any]) -> bool:
    return all((job.out / split / s["file"]).is_file() and (job.out / split / s["file"]).stat().st_size == s["bytes"]
               for split in SPLITS for s in record["splits"][split]["shards"])


class _UnitWriter:
    """One unit's windows of one split, in shards of `shard_windows` rows named after the unit."""

    def __init__(self, folder: Path, split: str, unit: int, meta: TokensMeta, cfg: TokenizeConfig) -> None:
        self.folder, self.split, self.unit, self.cfg = folder, split, unit, cfg
        self.chat = meta.format == "chat"
        self.schema = with_meta(token_schema(cfg.seq_len, self.chat), meta)
        self.rows: list[np.ndarray] = []
        self.continued: list[bool] = []
        self.masks: list[np.ndarray] = []
        self.records: list[ShardRecord] = []
        self.written = 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def total(self) -> int:
        return self.written + len(self.rows)

    def add(self, window: np.ndarray, continued: bool, mask: np.ndarray | None = None) -> None:
        self.rows.append(window)
        self.continued.append(continued)
        if self.chat:
            assert mask is not None
            self.masks.append(mask)
        if len(self.rows) == self.cfg.shard_windows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        ids = np.stack(self.rows)
        n, width = ids.shape
        windows = (self.unit << 32) + np.arange(self.written, self.written + n, dtype=np.int64)
        path = self.folder / f"{self.split}-{self.unit:06d}-{len(self.records):05d}.parquet"
        masks = np.stack(self.masks) if self.chat else None
        with ShardWriter(path, self.schema, rows_per_group(width * 4 + (width - 1) * self.chat, width - 1)) as w:
            w.write(encode(windows, ids, np.array(self.continued), self.schema, masks))
        self.records.append(shard_record(path, n, self.cfg.seq_len, max_id=int(ids.max())))
        self.written += n
        self.rows, self.continued, self.masks = [], [], []

    def finish(self) -> list[ShardRecord]:
        self.flush()
        return self.records


# ---------------------------------------------------------------- the dropping filters' pre-pass


def _prefilter(job: _Job, runtime: Runtime, plan: str) -> _Job:
    """Sketches every unit (this rank's share, in its WORKERS processes); rank 0 cuts the decision into jobs
    (`filters/layout.json`); every process decides its hash partitions, then, once all are done, writes the
    decisions of its groups of units. Returns the job with each unit's decisions (their sha256, which the
    unit's output depends on)."""
    folder = job.out / FILTERS
    key = _sha({"sketch": _sketch_key(job), "plan": plan, "memory_mb": job.filters.memory_mb})
    _run_workers(job, runtime, _sketch_work)
    if runtime.is_main:
        documents = records = 0
        for record in _wait_for_sketches(job):
            documents, records = documents + record["documents"], records + record["records"]
        layout = Layout.plan(len(job.plan), records, documents, job.filters.memory_mb)
        write_json(folder / "layout.json", {"key": key, **dataclasses.asdict(layout)})
    layout = _poll(job, f"rank 0's filter layout ({folder / 'layout.json'})", lambda: _layout(job, key))
    _run_workers(dataclasses.replace(job, layout=layout, key=key), runtime, _decide_work)  # key: the jobs' records
    shas = _poll(job, f"the filter decisions ({folder / GROUPS})", _all_done(folder / GROUPS, range(layout.groups), key))
    drops = {i: sha for record in shas for i, sha in zip(range(*layout.unit_range(record["group"])), record["units"])}
    return dataclasses.replace(job, drops=drops, digests=_digests(job.plan, drops))


def _layout(job: _Job, key: str) -> Layout | None:
    record = _keyed(job.out / FILTERS / "layout.json", key)
    return None if record is None else Layout(**{k: v for k, v in record.items() if k != "key"})


def _all_done(folder: Path, jobs: range, key: str) -> Callable[[], list[dict[str, Any]] | None]:
    """For `_poll`: the done records of `jobs` in `folder`, once every one is there for this key. A record
    found is remembered, so a poll reads only those still missing (not every job's, every process, every poll)."""
    found: dict[int, dict[str, Any]] = {}

    def ready() -> list[dict[str, Any]] | None:
        for index in jobs:
            if index not in found:
                if (record := _keyed(_done_path(folder, index), key)) is None:
                    return None
                found[index] = record
        return [found[i] for i in jobs]

    return ready


def _poll(job: _Job, what: str, ready: Callable[[], Any]) -> Any:
    """`ready()` once it is not None: polled (quickly at first, then every POLL_S), a failed rank's record
    ending the wait. No timeout: a long corpus takes as long as it takes."""
    delay, announced, started = 0.02, False, job.out / UNITS / "rank0.started"
    while (found := ready()) is None:
        if started.is_file():
            _raise_failures(job.out / UNITS, started)
        if delay >= POLL_S and not announced:
            print(f"waiting for {what}", flush=True)
            announced = True
        time.sleep(delay)
        delay = min(POLL_S, delay * 2)
    return found


def _decide_work(job: _Job) -> None:
    """One process's share of the decision: its hash partitions; then, once every process's are written, its
    groups of units. Each job's done record (its key, its counts) is written last; a done job is not redone."""
    assert job.layout is not None
    folder, layout = job.out / FILTERS, job.layout
    mine = range(job.slot, layout.partitions, job.slots)
    with progress(desc=f"dedup[{job.slot}]", unit=" part", position=job.slot, total=len(mine)) as bar:
        for part in mine:
            if _keyed(_done_path(folder / PARTS, part), job.key) is None:
                counts = decide_partition(folder, part, layout, job.filters)
                write_json(_done_path(folder / PARTS, part), {"key": job.key, "part": part, **counts})
            bar.update(1)
    groups = range(job.slot, layout.groups, job.slots)  # empty when job.slot >= layout.groups
    if not groups:
        return  # nothing of this process waits for the partitions (its rank's main process does, for the groups)
    _poll(job, f"the other processes' filter partitions ({folder / PARTS})",
          _all_done(folder / PARTS, range(layout.partitions), job.key))
    for group in groups:
        if _keyed(_done_path(folder / GROUPS, group), job.key) is None:
            write_json(_done_path(folder / GROUPS, group),
                       {"key": job.key, "group": group, "units": gather_group(folder, group, layout)})


def _sketch_key(job: _Job) -> str:
    """What a unit's sketches depend on besides its input."""
    spec = job.spec
    return _sha({"filters": job.filters.describe(), "format": spec.format, "text_column": spec.text_column,
                 **({"text_docs": spec.text_docs} if spec.text_docs != "file" else {}),
                 "messages_column": spec.messages_column, "dataset_split": spec.dataset_split,
                 "piece_bytes": job.cfg.piece_bytes})


def _sketch_record(job: _Job, unit: Unit) -> Path:
    return _done_path(job.out / FILTERS / SKETCH, unit.index)


def _sketch_work(job: _Job) -> None:
    with progress(desc=f"filter[{job.slot}]", unit=" doc", position=job.slot) as bar:
        for unit in job.mine:
            if _sketched(job, unit) is None:
                _sketch_unit(job, unit, bar)


def _sketched(job: _Job, unit: Unit) -> dict[str, Any] | None:
    """The unit's sketch record, if its files are there for these settings."""
    record = _keyed(_sketch_record(job, unit), _sketch_key(job))
    suffixes = (".codes.npy", ".keys.npy") + ((".sig.npy",) if job.filters.near_threshold else ())
    if record is None or record.get("unit") != unit.to_json() or \
            not all(_sketch_record(job, unit).with_suffix(s).is_file() for s in suffixes):
        return None
    return record


def _sketch_unit(job: _Job, unit: Unit, bar: Any) -> None:
    """One row per document of the unit, in reading order (a new document id is a new document)."""
    flt, sketches = job.filters, Sketches()
    current, doc_id = None, None
    for piece in read_unit(job.spec, unit, job.cfg.piece_bytes):
        if piece.bad is not None:
            continue  # no document: tokenization skips it too
        if piece.turns is not None:
            sketches.add(sketch_chat(scrub_turns(piece.turns)[0] if flt.pii else piece.turns, flt))
            bar.update(1)
            continue
        if piece.doc_id != doc_id or piece.first:
            if current is not None:
                sketches.add(current)
                bar.update(1)
            current, doc_id = Sketch(flt), piece.doc_id
        assert current is not None
        current.update(scrub(piece.text)[0] if flt.pii else piece.text)
    if current is not None:
        sketches.add(current)
    counts = write_unit(job.out / FILTERS, unit.index, sketches.arrays(flt), flt)
    write_json(_sketch_record(job, unit), {"key": _sketch_key(job), "unit": unit.to_json(), **counts})


def _wait_for_sketches(job: _Job) -> list[dict[str, Any]]:
    """Rank 0: every unit's sketch record, once all exist (the other ranks' too)."""
    found: dict[int, dict[str, Any]] = {}

    def ready() -> list[dict[str, Any]] | None:
        for unit in job.plan:
            if unit.index not in found and (record := _sketched(job, unit)) is not None:
                found[unit.index] = record
        return [found[u.index] for u in job.plan] if len(found) == len(job.plan) else None

    return _poll(job, f"the other ranks' filter sketches ({job.out / FILTERS / SKETCH})", ready)


# ---------------------------------------------------------------- rank 0: wait, then the manifests


def _wait_for_units(job: _Job) -> list[dict[str, Any]]:
    """The records of the units the manifests need, once they all exist (`_poll`: no timeout, a failed rank's
    record ends the wait). A record found is kept: a poll reads only the missing ones."""
    records: list[dict[str, Any] | None] = [None] * len(job.plan)

    def ready() -> list[dict[str, Any]] | None:
        for i, record in enumerate(records):
            if record is None:
                records[i] = _complete(job, job.plan[i])
        needed = needed_units([None if r is None else _token_counts(r) for r in records], job.cfg)
        return None if needed is None else [r for r in records[:needed] if r is not None]

    return _poll(job, f"the other ranks' units (records in {job.out / UNITS})", ready)


def _raise_failures(folder: Path, started: Path) -> None:
    since = started.stat().st_mtime - STALE_S  # file-system clock on both sides
    for path in sorted(folder.glob("failed-rank*.json")):
        try:
            if path.stat().st_mtime < since:
                continue
            failure = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        raise PipelineError(f"rank {failure.get('rank')} failed: {failure.get('error')}")


def _finalize(job: _Job, records: list[dict[str, Any]], plan: str) -> dict[str, Manifest]:
    cfg = job.cfg
    if not any(r["splits"][s]["documents"] for r in records for s in SPLITS):
        raise PipelineError(f"corpus {job.spec.describe()!r} has no documents; nothing to tokenize")
    for split in SPLITS:
        if not any(r["splits"][split]["shards"] for r in records):
            raise PipelineError(
                f"{job.out / split}: the {split} split got no window; use a larger corpus, a smaller SEQ_LEN or "
                "another --val-fraction"
            )
    caps = {"train": cfg.corpus_tokens, "val": val_target(cfg)}
    kept = {s: _capped(job, s, records, caps[s]) for s in SPLITS}
    _clean(job, records, {s: {r.file for r in kept[s]} for s in SPLITS})
    manifests = {}
    for split in SPLITS:
        stats = TokensStats(
            max_id=max(r.max_id for r in kept[split] if r.max_id is not None), units=len(records),
            documents=sum(r["splits"][split]["documents"] for r in records),
            available_tokens=sum(s["tokens"] for r in records for s in r["splits"][split]["shards"]),
            units_sha256=plan, filters=_summed(records, split, "filters"),
            conversations=_summed(records, split, "conversations"),
        )
        manifests[split] = (job.out / split, job.metas[split], kept[split], stats)
    return {s: write_manifest(*manifests[s]) for s in SPLITS}  # last: their presence means complete


def _summed(records: list[dict[str, Any]], split: str, key: str) -> dict[str, int] | None:
    """A split's counts (filters, conversations) over the units, or None where the records have none."""
    found = [r["splits"][split][key] for r in records if key in r["splits"][split]]
    if not found:
        return None
    return {k: sum(f.get(k, 0) for f in found) for k in sorted({k for f in found for k in f})}


def spread_order(n: int) -> list[int]:
    """0…n-1 in bit-reversed order (0, n/2, n/4, 3n/4, …): every prefix is spread evenly over the range, so
    the first k units taken cover the whole plan at a spacing of about n/k."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def _capped(job: _Job, split: str, records: list[dict[str, Any]], cap: int) -> list[ShardRecord]:
    """The split's shards up to the windows covering `cap` tokens (0: all), in unit order; the shard that
    crosses the cap is replaced by a copy of its leading rows. Train takes the leading units (CORPUS_TOKENS is
    a prefix of the corpus); the capped val split takes whole units spread over the whole plan
    (`spread_order`), so a corpus of folders is represented in proportion. Both depend on the records alone,
    never on the process count. Val documents of units beyond the cap are in neither split."""
    with_shards = [r for r in records if r["splits"][split]["shards"]]
    order = spread_order(len(with_shards)) if split == "val" and cap else range(len(with_shards))
    chosen, covered = [], 0
    for i in order:
        if cap and covered >= cap:
            break
        chosen.append(with_shards[i])
        covered += sum(s["tokens"] for s in with_shards[i]["splits"][split]["shards"])
    last = chosen[-1]["unit"]["index"] if chosen else None  # the unit the cap falls in: taken last
    chosen.sort(key=lambda r: (r["unit"]["index"] == last, r["unit"]["index"]))
    kept, covered = [], 0
    for record in chosen:
        for raw in record["splits"][split]["shards"]:
            shard = from_json(ShardRecord, raw, job.out / UNITS)
            if cap and covered >= cap:
                break
            if cap and covered + shard.tokens > cap:
                rows = math.ceil((cap - covered) / job.cfg.seq_len)
                shard = _cut(job.out / split / shard.file, rows, job.metas[split], job.cfg.seq_len) if rows < shard.rows \
                    else shard
            kept.append(shard)
            covered += shard.tokens
    return sorted(kept, key=lambda r: r.file)  # unit order (shard names carry the unit index)


def _cut(path: Path, rows: int, meta: TokensMeta, seq_len: int) -> ShardRecord:
    table = pq.read_table(path).slice(0, rows).replace_schema_metadata(None)
    target = path.with_name(f"{path.stem}-cap.parquet")
    with ShardWriter(target, with_meta(token_schema(seq_len, meta.format == "chat"), meta),
                     rows_per_group((seq_len + 1) * 4, seq_len)) as w:
        w.write(table)
    ids = np.asarray(table.column("input_ids").combine_chunks().flatten())
    return shard_record(target, rows, seq_len, max_id=int(ids.max()))


def _clean(job: _Job, records: list[dict[str, Any]], kept: dict[str, set[str]]) -> None:
    """Leaves the kept units' files and the listed shards: removes units past the caps (whichever process
    made them), shards and records of other settings, temporary files and failure records."""
    keep_records = {_record_path(job.out, r["unit"]["index"]).name for r in records}
    for path in (job.out / UNITS).iterdir():
        if path.is_file() and path.name not in keep_records:
            path.unlink()
    clean_stale_tmp(job.out / UNITS)
    for split in SPLITS:
        keep = kept[split] | {s["file"] for r in records for s in r["splits"][split]["shards"]}
        for path in (job.out / split).glob("*.parquet"):
            if path.name not in keep:
                path.unlink()
        clean_stale_tmp(job.out / split)


# ---------------------------------------------------------------- packing


_BOS, _EOS, _NONE = np.array([BOS], np.int32), np.array([EOS], np.int32), np.zeros(0, np.int32)


class WindowStream:
    """Packs documents `<bos> doc <eos>` into windows of seq_len+1 tokens that each start with `<bos>`. A
    document that does not fit continues in the next window after a fresh `<bos>` and a repeat of the last
    token already placed (so its next token is predicted with context, and no token goes untrained);
    such a window is `continued`. A new document never starts in a window's last slot (that slot is
    padded). A long document may come in pieces (`start`: the piece begins the document; `end`: it ends
    it); a stream whose first piece does not begin its document (a later byte range of a large file)
    starts with a continued window. Memory: one window; time: linear in the tokens."""

    def __init__(self, seq_len: int) -> None:
        self.width = seq_len + 1
        self.buf = np.zeros(self.width, dtype=np.int32)
        self.fill = 0
        self.continued = False

    def push(self, ids: list[int] | np.ndarray, start: bool = True, end: bool = True) -> Iterator[tuple[np.ndarray, bool]]:
        if start and self.fill and self.width - self.fill < 2:
            yield from self.flush()
        if not start and self.fill == 0:  # the document began before this stream
            self.buf[0], self.fill, self.continued = BOS, 1, True
        doc = np.concatenate((_BOS if start else _NONE, np.asarray(ids, dtype=np.int32), _EOS if end else _NONE))
        at = 0
        while at < len(doc):
            take = min(self.width - self.fill, len(doc) - at)
            self.buf[self.fill : self.fill + take] = doc[at : at + take]
            self.fill += take
            at += take
            if self.fill == self.width:
                yield self.buf.copy(), self.continued
                if at < len(doc) or not end:  # the document goes on (in this piece or the next)
                    self.buf[0], self.buf[1] = BOS, self.buf[-1]
                    self.fill, self.continued = 2, True
                else:
                    self.fill, self.continued = 0, False

    def flush(self) -> Iterator[tuple[np.ndarray, bool]]:
        """The partial last window, padded (pad labels do not train). A continued window holding only its
        `<bos>` and the repeated token has nothing to train and is dropped."""
        if self.fill and not (self.continued and self.fill <= 2):
            self.buf[self.fill :] = PAD
            yield self.buf.copy(), self.continued
        self.fill, self.continued = 0, False


class ChatStream:
    """Packs conversations as documents `<bos> conversation` (no `<eos>`: the template ends every turn) into
    windows of seq_len+1 tokens, never splitting one across windows: a conversation that does not fit the
    rest of the window starts the next one (the rest padded). One longer than a window keeps its leading
    whole turns up to the last model turn that fits (`cut`), or is dropped when not even its first
    exchange fits (`too_long`); a trailing user turn is not kept (nothing of it trains), and a conversation
    without a model turn is dropped (`no_reply`). Yields (window, False, loss_mask), loss_mask[p] = 1 where
    token p+1 of the window belongs to a model turn. Memory: one window."""

    def __init__(self, seq_len: int) -> None:
        self.width = seq_len + 1
        self.ids = np.zeros(self.width, dtype=np.int32)
        self.model = np.zeros(self.width, dtype=bool)
        self.fill = 0
        self.counts = dict.fromkeys(("whole", "cut", "too_long", "no_reply"), 0)

    def keep(self, conversation: chat.Encoded) -> int:
        """How many tokens of `<bos> conversation` to pack (0: drop it), counted."""
        n = len(conversation.ids)
        ends = np.append(conversation.turn_starts[1:], n)  # each turn's end: where the next one starts
        replies = ends[1::2]  # turns alternate user/model: the model's are the odd ones
        if not len(replies):
            self.counts["no_reply"] += 1
            return 0
        fitting = replies[replies + 1 <= self.width]
        if not len(fitting):
            self.counts["too_long"] += 1
            return 0
        keep = int(fitting[-1]) + 1
        self.counts["whole" if keep == n + 1 else "cut"] += 1
        return keep

    def push(self, conversation: chat.Encoded) -> Iterator[tuple[np.ndarray, bool, np.ndarray]]:
        keep = self.keep(conversation)
        if not keep:
            return
        if self.fill + keep > self.width:
            yield from self.flush()
        a, b = self.fill, self.fill + keep
        self.ids[a], self.model[a] = BOS, False
        self.ids[a + 1 : b], self.model[a + 1 : b] = conversation.ids[: keep - 1], conversation.model[: keep - 1]
        self.fill = b
        if self.fill == self.width:
            yield from self.flush()

    def flush(self) -> Iterator[tuple[np.ndarray, bool, np.ndarray]]:
        """The partial window, padded (pad labels do not train)."""
        if self.fill:
            self.ids[self.fill :], self.model[self.fill :] = PAD, False
            yield self.ids.copy(), False, self.model[1:].astype(np.uint8)
        self.fill = 0
