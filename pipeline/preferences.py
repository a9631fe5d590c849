"""Preference data (FORMAT=preference): rows of a prompt and two replies, `chosen` better than `rejected`,
through the chat template, the filters and the content-hash split into the preference shards the reward
model trains on (schemas/preferences.py).

A row (a JSON line of a `.jsonl`/`.json` file, optionally `.gz`/`.zst`, or a Parquet row) holds
- the prompt: `prompt` (a string: one user turn, with an optional `system` column; or a messages list) or
  `messages` (a list of {role, content} ending with the user's turn), in Gemma's template as chat data is
  (pipeline/chat.py: `assistant` read as `model`, a leading system message folded into the first user turn);
- `chosen` and `rejected`: each a string, a {role: assistant|model, content} message, or a list of one such
  message. Without `prompt`/`messages`, `chosen` and `rejected` may be whole conversations (TRL's implicit
  prompt): their common leading messages are the prompt, and each one's last message is the reply.

Each pair becomes two sequences, `<bos>` + the template of prompt + reply (ending `<end_of_turn>\\n`),
tokenized whole. Bad rows are counted and dropped, the first few named on stderr: invalid JSON (`bad_json`),
no usable prompt or a reply that is not a string/message (`bad_row`), an empty or absent reply
(`missing_reply`), chosen equal to rejected (`identical`), a turn marker inside a content (`markers`), a
sequence over `max_tokens` (`too_long`).

Filters (pipeline/filters.py, chat's defaults: exact, near, pii): personal information is scrubbed in every
turn of both sequences; a pair is an exact or near duplicate when the text of its prompt and both replies
together is (the first occurrence is kept), so a prompt answered by several pairs keeps them all; length
bounds (`--min-chars`/`--max-chars`) apply to each conversation (prompt + chosen, prompt + rejected). The
blocklist reads the chosen reply only: a pair that ranks a blocklisted reply (a mistaken self-identification)
below a good one is what a reward model should learn from, while one that prefers it is not.

The split is the content hash of `make tokens` (pipeline/corpus.py `split_key`/`is_val`) over the prompt's
turns and the chosen reply, as written in the file (before scrubbing), so a pair keeps its split however the
file is moved or reordered, and the conversation prompt + chosen lands in the split it would as chat data.

Memory: two passes over the file (the second only re-reads it); between them, for the duplicate filters,
~100 bytes per pair (hash, band hashes, one decision byte) and the MinHash signatures on disk, memory-mapped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import chat
from pipeline.chat import Turn
from pipeline.corpus import Part, Piece, _blocks, file_kind, is_val, split_key
from pipeline.errors import PipelineError
from pipeline.filters import EXACT, KEEP, FilterConfig, Filters, Sketch, Sketches, decide, scrub_turns
from pipeline.fsutil import atomic_path, write_json
from pipeline.layout import SPLITS
from pipeline.settings import setting
from pipeline.shards import ShardWriter
from pipeline.tokenizer import BOS, Tokenizer
from schemas.common import to_json, with_meta
from schemas.preferences import (
    MANIFEST,
    PreferenceShard,
    PreferencesManifest,
    PreferencesMeta,
    preference_schema,
    read_preferences_manifest,
)

BAD = ("bad_json", "bad_row", "missing_reply", "identical", "markers", "too_long")
BAD_SHOWN = 10  # bad rows named on stderr (all are counted)
UNIT_PAIRS = 1 << 16  # pairs per sketch unit: one signature file each
ENCODE_PAIRS = 512  # pairs per sentencepiece batch call
GROUP_ROWS = 1024  # rows per Parquet row group


@dataclass(frozen=True)
class PreferenceConfig:
    val_fraction: float = setting(0.05, "share of pairs (by a hash of the prompt and the chosen reply) held out to "
                                        "measure the reward model's pairwise accuracy")
    max_tokens: int = setting(1024, "pairs whose chosen or rejected sequence (template included) is longer are "
                                    "dropped (counted as too_long)")
    shard_pairs: int = setting(65536, "pairs per preference shard")


class BadRow(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Pair:
    prompt: tuple[Turn, ...]  # ends with the user's turn
    chosen: str
    rejected: str

    def conversations(self) -> tuple[tuple[Turn, ...], tuple[Turn, ...]]:
        return self.prompt + (Turn("model", self.chosen),), self.prompt + (Turn("model", self.rejected),)


# ---------------------------------------------------------------- rows → pairs


def parse_pair(row: Any, where: chat.Where) -> Pair:
    """A row → its pair; a BadRow (kind, one line naming the row) when it is not a usable one."""
    if not isinstance(row, dict):
        raise BadRow("bad_row", f"{where()}: a {type(row).__name__}, expected an object with prompt (or messages), "
                                "chosen and rejected")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
        raise BadRow("missing_reply", f"{where()}: no {' or '.join(missing)} reply (keys: {sorted(row)})")
    if row.get("messages") is not None:
        messages = row["messages"]
    elif row.get("prompt") is not None:
        messages = row["prompt"]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
            if row.get("system"):
                messages.insert(0, {"role": "system", "content": row["system"]})
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        messages = chosen[:-1]  # implicit prompt: the conversations' common leading messages
        if rejected[:-1] != messages:
            raise BadRow("bad_row", f"{where()}: chosen and rejected conversations differ before their last "
                                    "message; give the prompt as a prompt or messages column")
        chosen, rejected = chosen[-1:], rejected[-1:]
    else:
        raise BadRow("bad_row", f"{where()}: no prompt or messages (keys: {sorted(row)})")
    try:
        prompt = chat.normalize(messages, where)
    except PipelineError as e:
        raise BadRow("bad_row", str(e)) from None
    if prompt[-1].role != "user":
        raise BadRow("bad_row", f"{where()}: the prompt ends with a model turn; it must end with the user's turn")
    chosen_text, rejected_text = _reply(chosen, "chosen", where), _reply(rejected, "rejected", where)
    if chosen_text.strip() == rejected_text.strip():
        raise BadRow("identical", f"{where()}: chosen and rejected are the same reply")
    return Pair(prompt, chosen_text, rejected_text)


def _reply(value: Any, name: str, where: chat.Where) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") not in ("assistant", "model") or not isinstance(value.get("content"), str):
            raise BadRow("bad_row", f"{where()}: {name} is not an assistant message {{role: assistant, content: "
                                    f"string}} ({chat._short(value)})")
        value = value["content"]
    if not isinstance(value, str):
        raise BadRow("bad_row", f"{where()}: {name} is a {type(value).__name__}; expected a string or an assistant "
                                "message")
    if not value.strip():
        raise BadRow("missing_reply", f"{where()}: {name} is empty")
    return value


def read_rows(path: Path) -> Iterator[tuple[int, chat.Where, Any]]:
    """(row index, where, the row as a dict or a BadRow) of a `.jsonl`/`.json` (.gz/.zst) or `.parquet` file."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such preference file; pass PREFERENCES= a .jsonl (.gz/.zst) or .parquet "
                            "file of prompt/chosen/rejected rows")
    try:
        kind, _ = file_kind(path)
    except PipelineError:
        kind = "unknown"
    if kind == "lines":
        yield from _json_rows(path)
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        raise PipelineError(f"{path}: a preference file is .jsonl/.json (optionally .gz/.zst) or .parquet")


def _json_rows(path: Path) -> Iterator[tuple[int, chat.Where, Any]]:
    stat = path.stat()
    if stat.st_size == 0:
        raise PipelineError(f"{path}: empty file (0 bytes); give the complete preference file")
    part = Part(path.name, "lines", f"{stat.st_size}:{stat.st_mtime_ns}")
    carry, line, index = b"", 0, 0
    for block in [*_blocks(path, part), b"\n"]:
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        for raw in lines:
            line += 1
            if not raw.strip():
                continue
            where = functools.partial(str, f"{path}:{line}")
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = f"column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                row = BadRow("bad_json", f"{where()}: invalid JSON ({reason})")
            yield index, where, row
            index += 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, chat.Where, Any]]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        index = 0
        for batch in f.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, functools.partial(str, f"{path} row {index}"), row
                index += 1
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: not a readable Parquet file ({e}); rewrite it") from None


def pair_split(pair: Pair, val_fraction: float) -> str:
    """The pair's split: the content hash of its prompt's turns and the chosen reply (`make tokens`' split of
    the conversation prompt + chosen)."""
    conversation = pair.conversations()[0]
    return "val" if is_val(split_key(Piece("", "", turns=conversation)), val_fraction) else "train"


def template_ids(tokenizer: Tokenizer, conversations: list[tuple[Turn, ...]], threads: int = 1) -> list[list[int]]:
    """`<bos>` + the template of each conversation, tokenized whole (what the reward model reads)."""
    texts = [chat.render(c).text for c in conversations]
    return [[BOS, *ids] for ids in tokenizer.sp.encode(texts, num_threads=threads)] if texts else []


# ---------------------------------------------------------------- the build


@dataclass
class _Candidate:
    index: int
    pair: Pair  # scrubbed
    split: str


class _Rows:
    """The file's rows as pairs, with the checks every pass makes alike (so pass two finds pass one's pairs
    in the same order), counting and naming the bad ones."""

    def __init__(self, path: Path, cfg: PreferenceConfig, filters: Filters, counts: Counter, verbose: bool) -> None:
        self.path, self.cfg, self.filters, self.counts, self.verbose = path, cfg, filters, counts, verbose

    def __iter__(self) -> Iterator[_Candidate]:
        for index, where, row in read_rows(self.path):
            self.counts["rows"] += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                pair = parse_pair(row, where)
                if chat.has_markers(pair.conversations()[0]) or chat.has_markers(pair.conversations()[1][-1:]):
                    raise BadRow("markers", f"{where()}: a content holds <start_of_turn>/<end_of_turn>")
            except BadRow as bad:
                self.counts[bad.kind] += 1
                if self.verbose and sum(self.counts[k] for k in BAD) <= BAD_SHOWN:
                    print(f"skipped: {bad}", file=sys.stderr)
                continue
            split = pair_split(pair, self.cfg.val_fraction)
            if self.filters.pii:
                pair = self._scrub(pair)
            if "length" in self.filters.active and not self._length_ok(pair):
                self.counts["length"] += 1
                continue
            if self.filters.phrases and self.filters.blocked(pair.chosen):
                self.counts["blocklist"] += 1
                continue
            yield _Candidate(index, pair, split)

    def _scrub(self, pair: Pair) -> Pair:
        """Every turn of the prompt and both replies scrubbed, the replacements counted per kind."""
        turns, found = scrub_turns((*pair.prompt, Turn("model", pair.chosen), Turn("model", pair.rejected)))
        for kind, n in found.items():
            self.counts[f"pii_{kind}"] += n
        return Pair(turns[:-2], turns[-2].content, turns[-1].content)

    def _length_ok(self, pair: Pair) -> bool:
        prompt = sum(len(t.content.strip()) for t in pair.prompt)
        lengths = (prompt + len(pair.chosen.strip()), prompt + len(pair.rejected.strip()))
        return min(lengths) >= self.filters.min_chars and (not self.filters.max_chars
                                                            or max(lengths) <= self.filters.max_chars)


def source_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def build_preferences(source: Path, tokenizer: Tokenizer, out: Path, cfg: PreferenceConfig = PreferenceConfig(),
                      filter_config: FilterConfig = FilterConfig(), threads: int = 1,
                      verbose: bool = True) -> dict[str, PreferencesManifest]:
    """The preference file → `out/{train,val}/*.parquet` + manifests (a complete build with these settings is
    kept as it is). Returns the two manifests."""
    source = Path(source)
    if not 0 < cfg.val_fraction < 1:
        raise PipelineError(f"--val-fraction {cfg.val_fraction}: must be in (0, 1), so both splits get pairs")
    if cfg.max_tokens < 4 or cfg.shard_pairs < 1:
        raise PipelineError(f"--max-tokens {cfg.max_tokens} / --shard-pairs {cfg.shard_pairs}: need max_tokens >= 4 "
                            "and shard_pairs >= 1")
    filters = filter_config.resolve("chat")
    tokenizer.chat_ids()
    if not source.is_file():
        list(read_rows(source))  # the one-line error naming the file
    metas = {s: PreferencesMeta(split=s, source=str(source), source_version=source_version(source),
                                tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                                val_fraction=cfg.val_fraction, max_tokens=cfg.max_tokens,
                                filters=filters.describe()) for s in SPLITS}
    try:
        done = {s: read_preferences_manifest(out / s) for s in SPLITS}
        if all(done[s].meta == metas[s] for s in SPLITS):
            return done
    except PipelineError:
        pass
    for split in SPLITS:  # another build's shards (or a killed one's): start over
        shutil.rmtree(out / split, ignore_errors=True)
    counts: Counter = Counter()
    codes = _duplicates(source, cfg, filters, out, verbose) if {"exact", "near"} & set(filters.active) else None
    writers = {s: _SplitWriter(out / s, metas[s], cfg.shard_pairs) for s in SPLITS}
    candidate, batch = 0, []
    try:
        for cand in _Rows(source, cfg, filters, counts, verbose and codes is None):
            code = KEEP if codes is None else int(codes[candidate])
            candidate += 1
            if code != KEEP:
                counts["exact" if code == EXACT else "near"] += 1
                continue
            batch.append(cand)
            if len(batch) == ENCODE_PAIRS:
                _encode_batch(batch, tokenizer, writers, cfg, counts, threads)
                batch = []
        _encode_batch(batch, tokenizer, writers, cfg, counts, threads)
        shards = {s: writers[s].close() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    shutil.rmtree(out / ".sketch", ignore_errors=True)
    for split in SPLITS:
        counts[split] = sum(s.rows for s in shards[split])
    counts["kept"] = counts["train"] + counts["val"]
    if not counts["rows"]:
        raise PipelineError(f"{source}: holds no row; give a file of prompt/chosen/rejected rows")
    totals = {k: int(v) for k, v in sorted(counts.items())}
    manifests = {}
    for split in SPLITS:
        manifests[split] = PreferencesManifest(meta=metas[split], shards=shards[split], counts=totals)
        write_json(out / split / MANIFEST, {"meta": to_json(metas[split]), "shards": [to_json(s) for s in shards[split]],
                                            "counts": totals})
    return manifests


def _duplicates(source: Path, cfg: PreferenceConfig, filters: Filters, out: Path, verbose: bool) -> np.ndarray:
    """Pass one: every candidate pair sketched (hash of the normalised text, MinHash signature), then the
    decisions in file order (pipeline/filters.py `decide`): one code per candidate."""
    # The duplicate filters alone (length and the blocklist ran in `_Rows`), keeping --filter-memory-mb.
    dup = dataclasses.replace(filters, active=tuple(n for n in filters.active if n in ("exact", "near")), phrases=())
    folder = out / ".sketch"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    units: list[dict[str, np.ndarray]] = []
    sketches = Sketches()

    def close_unit() -> None:
        nonlocal sketches
        arrays = sketches.arrays(dup)
        path = folder / f"{len(units):06d}.sig.npy"
        np.save(path, arrays["sig"])
        arrays["sig"] = np.load(path, mmap_mode="r") if arrays["sig"].size else arrays["sig"]
        units.append(arrays)
        sketches = Sketches()

    counts: Counter = Counter()  # pass two counts again; these are thrown away
    for cand in _Rows(source, cfg, filters, counts, verbose):
        sketch = Sketch(dup)
        conversation = cand.pair.conversations()[0]
        sketch.update(chat.render(conversation).text + "\n" + cand.pair.rejected)
        sketches.add(sketch)
        if len(sketches.hashes) == UNIT_PAIRS:
            close_unit()
    if sketches.hashes or not units:
        close_unit()
    return np.concatenate(decide(units, dup, folder / "decide")) if units else np.zeros(0, np.int8)


def _encode_batch(batch: list[_Candidate], tokenizer: Tokenizer, writers: dict[str, _SplitWriter],
                  cfg: PreferenceConfig, counts: Counter, threads: int) -> None:
    if not batch:
        return
    ids = template_ids(tokenizer, [c for cand in batch for c in cand.pair.conversations()], threads)
    rows: dict[str, list[tuple[int, list[int], list[int]]]] = defaultdict(list)
    for cand, chosen, rejected in zip(batch, ids[0::2], ids[1::2]):
        if max(len(chosen), len(rejected)) > cfg.max_tokens:
            counts["too_long"] += 1
            continue
        rows[cand.split].append((cand.index, chosen, rejected))
    for split, items in rows.items():
        writers[split].write(items)


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class _SplitWriter:
    """A split's shards `{split}-KKKKK.parquet` of `shard_pairs` rows each, written under temporary names."""

    def __init__(self, folder: Path, meta: PreferencesMeta, shard_pairs: int) -> None:
        self.folder, self.meta, self.shard_pairs = folder, meta, shard_pairs
        self.schema = with_meta(preference_schema(), meta)
        self.writer: ShardWriter | None = None
        self.done: list[PreferenceShard] = []

    def write(self, items: list[tuple[int, list[int], list[int]]]) -> None:
        at = 0
        while at < len(items):
            if self.writer is None:
                path = self.folder / f"{self.meta.split}-{len(self.done):05d}.parquet"
                self.writer = ShardWriter(path, self.schema, min(GROUP_ROWS, self.shard_pairs))
            take = items[at: at + self.shard_pairs - self.writer.rows]
            self.writer.write(pa.table({
                "pair": pa.array([i for i, _, _ in take], pa.int64()),
                "chosen_ids": pa.array([c for _, c, _ in take], pa.list_(pa.int32())),
                "rejected_ids": pa.array([r for _, _, r in take], pa.list_(pa.int32())),
                "prompt_tokens": pa.array([shared_prefix(c, r) for _, c, r in take], pa.int32()),
            }, schema=self.schema))
            at += len(take)
            if self.writer.rows == self.shard_pairs:
                self._finish()

    def _finish(self) -> None:
        assert self.writer is not None
        w, self.writer = self.writer, None
        w.__exit__(None, None, None)
        self.done.append(PreferenceShard(file=w.path.name, rows=w.rows, bytes=int(w.bytes or 0), sha256=str(w.sha256)))

    def close(self) -> list[PreferenceShard]:
        if self.writer is not None:
            self._finish()
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.done

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.writer = None


def shard_paths(folder: Path) -> list[Path]:
    """A split's shards, as its manifest lists them."""
    return [Path(folder) / s.file for s in read_preferences_manifest(folder).shards]


# ---------------------------------------------------------------- the demo's preferences

# Which question a user turn asks (the instruction set's phrasings, pipeline/instructions.py).
_KINDS: list[tuple[str, re.Pattern[str]]] = []


def _kinds() -> list[tuple[str, re.Pattern[str]]]:
    if not _KINDS:
        from pipeline import instructions as ins

        def pattern(templates: tuple[str, ...], field: str) -> re.Pattern[str]:
            return re.compile("|".join(re.escape(t).replace(re.escape("{" + field + "}"), f"(?P<{field}{i}>[^`]+)")
                                       for i, t in enumerate(templates)))

        _KINDS.extend([
            ("module", pattern(ins.MODULE, "m")), ("what", pattern(ins.WHAT, "q")), ("where", pattern(ins.WHERE, "n")),
            ("identity", re.compile("|".join(re.escape(q) for q in ins.IDENTITY_Q))),
            ("signature", re.compile(re.escape("What is its signature?"))),
            ("methods", re.compile(re.escape("Which public methods does it define?"))),
            ("kind", re.compile(re.escape("Is it a class or a function?"))),
            ("members", re.compile(re.escape("Name a few of its public functions and classes."))),
        ])
    return _KINDS


def _question(text: str) -> tuple[str, str] | None:
    """(kind, the name asked about, or "") of a user turn; None for a question the demo does not know."""
    for kind, pattern in _kinds():
        found = pattern.fullmatch(text.strip())
        if found:
            return kind, next((v for v in found.groupdict().values() if v), "")
    return None


_WHERE_REPLY = re.compile(r"`(?P<name>[^`]+)` is defined in the `(?P<module>[^`]+)` module\.")


def _pick(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % n


def _choose(key: str, pool: list[tuple[str, str]], group: str, avoid: str) -> str | None:
    """A reply from `pool` ((group, reply) in file order) other than `avoid`: from the same group (module)
    when it has one, else from the whole pool; picked by a hash of `key`."""
    for candidates in ([r for g, r in pool if g == group and r != avoid], [r for _, r in pool if r != avoid]):
        if candidates:
            return candidates[_pick(key, len(candidates))]
    return None


def write_demo_preferences(instructions: Path, out: Path, val_fraction: float = 0.05) -> dict[str, int]:
    """The demo's preference JSONL, built offline from the chat demo's instruction set (a `{"messages": [...]}`
    JSONL, pipeline/instructions.py): for every model turn the demo knows the question of, a pair of the
    conversation up to that question, the right reply (chosen) and a plausible wrong one (rejected), picked
    deterministically (by a hash of the subject) —
    - `where`: the same sentence naming another module (one of the same package when there is one);
    - `what` / `module`: another function's or module's docstring (of the same module or package first);
    - `signature`: another function's signature (of the same module first); `methods`/`members`: another
      class's methods or another module's names; `kind`: class and function swapped;
    - `identity`: a mistaken self-identification (the set's own; its mistaken conversations give no pair).
    A pair is written only when its content-hash split (prompt + chosen, at `val_fraction`) equals its
    conversation's (the whole conversation's, as `make tokens` and pipeline/tasks.py split it): so no pair
    about a held-out conversation trains the reward model. Returns counts."""
    from pipeline.instructions import IDENTITY_A, MISTAKEN_A

    instructions = Path(instructions)
    if not instructions.is_file():
        raise PipelineError(f"{instructions}: no instruction set; run `make demo-chat` first (it writes it)")
    conversations: list[tuple[tuple[Turn, ...], bool]] = []
    pools: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with open(instructions, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{instructions}:{n}: invalid JSON ({e.msg}); rebuild it with `make demo-chat`") from None
            turns = chat.from_row(row, "messages", functools.partial(str, f"{instructions}:{n}"))
            val = is_val(split_key(Piece("", "", turns=turns)), val_fraction)
            conversations.append((turns, val))
            subject = ""
            for i in range(0, len(turns) - 1, 2):
                asked = _question(turns[i].content.split("\n\n")[-1])
                if asked is None:
                    continue
                kind, name = asked
                subject = name or subject
                pools[kind].append((_group(kind, subject, turns[i + 1].content), turns[i + 1].content))
    modules = sorted({m for _, reply in pools["where"] if (m := _where_module(reply))})
    counts: Counter = Counter()
    with atomic_path(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for turns, val in conversations:
            counts["conversations"] += 1
            subject = ""
            for i in range(0, len(turns) - 1, 2):
                asked = _question(turns[i].content.split("\n\n")[-1])
                if asked is None:
                    counts["unknown_question"] += 1
                    continue
                kind, name = asked
                subject = name or subject
                chosen = turns[i + 1].content
                if kind == "identity" and chosen in MISTAKEN_A:
                    counts["mistaken_identity"] += 1
                    continue
                rejected = _wrong(kind, subject, chosen, pools, modules, MISTAKEN_A, IDENTITY_A)
                if rejected is None or rejected == chosen:
                    counts["no_wrong_reply"] += 1
                    continue
                prompt = turns[: i + 1]
                if is_val(split_key(Piece("", "", turns=prompt + (Turn("model", chosen),))), val_fraction) != val:
                    counts["split_differs"] += 1
                    continue
                messages = [{"role": "user" if t.role == "user" else "assistant", "content": t.content} for t in prompt]
                f.write(json.dumps({"messages": messages, "chosen": chosen, "rejected": rejected, "kind": kind},
                                   ensure_ascii=False) + "\n")
                counts["pairs"] += 1
                counts["val_pairs" if val else "train_pairs"] += 1
                counts[f"kind_{kind}"] += 1
    return dict(sorted(counts.items()))


def _where_module(reply: str) -> str | None:
    found = _WHERE_REPLY.fullmatch(reply.strip())
    return found.group("module") if found else None


def _group(kind: str, subject: str, reply: str) -> str:
    """What makes a wrong reply plausible: the module (or package) the subject lives in."""
    if kind in ("where", "kind"):
        return (_where_module(reply) or "").split(".")[0]
    if kind in ("module", "members"):
        return subject.split(".")[0]
    return subject.rsplit(".", 1)[0]  # what / signature / methods: `json.dumps` → json


def _wrong(kind: str, subject: str, chosen: str, pools: dict[str, list[tuple[str, str]]], modules: list[str],
           mistaken: tuple[str, ...], identity: str) -> str | None:
    key = f"{kind}:{subject}:{chosen}"
    if kind == "identity":
        return mistaken[_pick(key, len(mistaken))] if chosen == identity else None
    if kind == "kind":
        swapped = {"It is a class.": "It is a function.", "It is a function.": "It is a class."}
        return swapped.get(chosen.strip())
    if kind == "where":
        found = _WHERE_REPLY.fullmatch(chosen.strip())
        if not found:
            return None
        right = found.group("module")
        package = [m for m in modules if m != right and m.split(".")[0] == right.split(".")[0]]
        others = package or [m for m in modules if m != right]
        if not others:
            return None
        return f"`{found.group('name')}` is defined in the `{others[_pick(key, len(others))]}` module."
    return _choose(key, pools[kind], _group(kind, subject, chosen), chosen)

