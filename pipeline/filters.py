"""Data filters of `make tokens`, for plain text and chat alike; each is switchable and counted per split in
the manifest (`stats.filters`):

- `exact` duplicates: a 64-bit hash of the normalised text (NFKC, lower case, whitespace runs as one space);
- `near` duplicates: MinHash signatures (NUM_PERM hashes of 5-word shingles of the normalised text) and LSH
  banding, the bands and rows chosen for `--near-threshold` as datasketch's `MinHashLSH` chooses them; a
  document is dropped when, in one of its band buckets, the earliest document (kept or not) has an
  estimated Jaccard similarity to it of at least the threshold (datasketch itself is not used: its MinHash
  hashes shingle by shingle in Python, and its index holds ~1 KB of Python objects per document);
- `length` bounds (`--min-chars`, `--max-chars`): characters of a document, or of a conversation's contents;
- `pii`: personal information scrubbed to placeholders — e-mail addresses `[EMAIL]`, phone numbers (an
  international `+` number or a North-American `(555) 123-4567` one) `[PHONE]`, IPv4/IPv6 addresses
  `[IP_ADDRESS]` (not a dotted version: after `==`/`>=`/`-`/`v`/`version`/`OID`…, or with a revision after
  it), card numbers `[CARD_NUMBER]` (13–19 digits passing the Luhn check, with an issuer's prefix, in groups
  or after a card word: a bare timestamp or row id is kept). Precision and recall on a labelled set:
  tests/pipeline/test_pii_precision.py (README);
- `blocklist` (`--blocklist FILE`, one phrase a line, `#` comments): a document — a conversation's model
  turns — containing a phrase (case and whitespace aside) is dropped, e.g. mistaken self-identification.

Scrubbing rewrites a text where it is read. The dropping filters decide per document, but a document may
come in pieces and duplicates are found across the whole corpus, so they run as a pre-pass
(pipeline/tokens.py): each work unit's documents are sketched in parallel (`Sketch`/`sketch_chat` →
one row of `Sketches` per document; `write_unit` stores the unit's own length/blocklist codes, its records
(key, doc, slot) sorted by the key's top bits, and its signatures), then the decision is cut by hash into
`Layout.partitions` jobs (`decide_partition`: first occurrence in global (unit, doc) order wins) and
`Layout.groups` jobs by unit range (`gather_group`: each unit's decisions), spread over every process, and
tokenization skips what was dropped. The decisions depend on the input and these settings alone, never on
WORKERS, the rank count or the partition count (tests/pipeline/test_filter_partitions.py compares them with
one process deciding everything, on chains of near duplicates).

Memory per deciding job: at most `--filter-memory-mb` (its `budget` of records at RECORD_BYTES each, a
quarter kept for the signature rows of candidate pairs): measured 83 bytes of peak traced memory per record
held (benchmarks/filters.py). On disk: 13 bytes a record, 10 records a document at the default threshold (1
exact hash, 9 bands), 512 bytes of signature a document; no file stays open or mapped between reads.
Sketching runs at ~9 MB/s of text per process, scrubbing at ~7 MB/s (2-core CPU, stdlib sources).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.chat import Turn, render
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path
from pipeline.settings import setting

SWITCHED = ("exact", "near", "pii")  # what --filters names; length and blocklist are on when given bounds / a file
CHAT_DEFAULT = ("exact", "near", "pii")
NUM_PERM = 128
SHINGLE_WORDS = 5
WORD_BYTES = 24  # a word's hash reads its first 24 bytes
# Decision codes per document (0 keeps it), in the order the filters apply.
KEEP, LENGTH, BLOCKLIST, EXACT, NEAR = 0, 1, 2, 3, 4
DROPS = {LENGTH: "length", BLOCKLIST: "blocklist", EXACT: "exact", NEAR: "near"}


@dataclass(frozen=True)
class FilterConfig:
    filters: str = setting("auto", "comma list of exact, near, pii (or none); auto: none for text, exact,near,pii "
                                   "for chat. Length bounds and the blocklist apply when given")
    near_threshold: float = setting(0.8, "near duplicates: estimated Jaccard similarity (5-word shingles) at which a "
                                         "later document is dropped")
    min_chars: int = setting(0, "drop documents (conversations: their contents) shorter than this (0: no bound)")
    max_chars: int = setting(0, "drop documents (conversations: their contents) longer than this (0: no bound)")
    blocklist: str = setting("", "file of phrases, one a line: a document (a conversation: its model turns) "
                                 "holding one is dropped")
    filter_memory_mb: float = setting(1024.0, "duplicate filters: memory per deciding process (MiB); the decisions "
                                              "are cut into as many hash partitions as that needs (same output)")

    def resolve(self, fmt: str) -> Filters:
        names = CHAT_DEFAULT if self.filters == "auto" and fmt == "chat" else () if self.filters in ("auto", "none", "") \
            else tuple(n.strip() for n in self.filters.split(",") if n.strip())
        unknown = sorted(set(names) - set(SWITCHED))
        if unknown:
            raise PipelineError(f"--filters {self.filters!r}: unknown {unknown}; use a comma list of "
                                f"{', '.join(SWITCHED)}, 'none' or 'auto'")
        if not 0 < self.near_threshold <= 1:
            raise PipelineError(f"--near-threshold {self.near_threshold}: must be in (0, 1]")
        if self.min_chars < 0 or self.max_chars < 0 or (self.max_chars and self.max_chars < self.min_chars):
            raise PipelineError(f"--min-chars {self.min_chars} / --max-chars {self.max_chars}: need 0 ≤ min ≤ max "
                                "(0: no bound)")
        phrases = load_blocklist(Path(self.blocklist)) if self.blocklist else ()
        active = [n for n in SWITCHED if n in names]
        if self.min_chars or self.max_chars:
            active.append("length")
        if phrases:
            active.append("blocklist")
        Layout.plan(1, 0, 0, self.filter_memory_mb)  # a budget too small for one record is refused here
        return Filters(tuple(active), self.near_threshold if "near" in active else None, self.min_chars,
                       self.max_chars, phrases, self.filter_memory_mb)


@dataclass(frozen=True)
class Filters:
    """The resolved filters of one run (what `FilterConfig.resolve` makes of the settings)."""

    active: tuple[str, ...] = ()
    near_threshold: float | None = None
    min_chars: int = 0
    max_chars: int = 0
    phrases: tuple[str, ...] = ()
    memory_mb: float = 1024.0  # per deciding process; not in `describe`: the decisions do not depend on it

    @property
    def drops(self) -> bool:
        """Whether any filter drops documents (those need the pre-pass)."""
        return any(n in self.active for n in ("exact", "near", "length", "blocklist"))

    @property
    def pii(self) -> bool:
        return "pii" in self.active

    def describe(self) -> dict[str, Any] | None:
        """What the token shards' metadata records (None: no filter)."""
        if not self.active:
            return None
        out: dict[str, Any] = {"active": list(self.active)}
        if self.near_threshold is not None:
            out.update(near_threshold=self.near_threshold, num_perm=NUM_PERM, shingle_words=SHINGLE_WORDS)
        if "length" in self.active:
            out.update(min_chars=self.min_chars, max_chars=self.max_chars)
        if self.phrases:
            out["blocklist_sha256"] = hashlib.sha256("\n".join(self.phrases).encode()).hexdigest()
        return out

    def blocked(self, text: str) -> bool:
        return bool(self.phrases) and _phrase_pattern(self.phrases).search(normalize(text)) is not None


def load_blocklist(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise PipelineError(f"--blocklist {path}: no such file; give a text file with one phrase a line")
    phrases = [normalize(line) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not phrases:
        raise PipelineError(f"--blocklist {path}: holds no phrase (one a line; # starts a comment)")
    return tuple(sorted(set(phrases)))


@functools.lru_cache(maxsize=4)
def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a phrase that extends another still matches; word edges where the phrase has them.
    parts = [(r"\b" if p[0].isalnum() else "") + re.escape(p) + (r"\b" if p[-1].isalnum() else "")
             for p in sorted(phrases, key=len, reverse=True)]
    return re.compile("|".join(parts))


def normalize(text: str) -> str:
    """What the duplicate and blocklist filters compare: NFKC, lower case, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


# ---------------------------------------------------------------- personal information

_EMAIL = r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not after a word, a dot, a hyphen (`libfoo-1.2.3.4`), `word/` (`Chrome/1.2.3.4`) or a comparison/pin
# (`==`, `>=`, `~=`, `=`); not followed by more parts, a Debian or local revision (`1.2.5.1-2`, `+cu121`).
_IPV4 = rf"(?<![\w.\-=<>~!^])(?<!\w/){_OCTET}(?:\.{_OCTET}){{3}}(?![.\-+]?\w)"
_HEX = r"[0-9A-Fa-f]{1,4}"
# Full form, or compressed with at least three groups (`is_ip`: so a slice such as `x[1::2]` is not an address).
_IPV6 = rf"(?<![\w:])(?:(?:{_HEX}:){{7}}{_HEX}|(?:{_HEX}:){{1,6}}:(?:{_HEX}:){{0,5}}{_HEX})(?![\w:])"
# A version, release, build or object identifier just before a dotted quad makes it one of those.
_VERSION_BEFORE = re.compile(r"(?:\b(?:v|ver|version|versions|release|rel|build|oid|OID|revision|rev|tag|"
                             r"python|kernel|firmware|update)\b[\s:=#]*)$", re.IGNORECASE)
# Card numbers: 13–19 digits passing the Luhn check, with an issuer's prefix (Visa 4, Mastercard 51–55 and
# 2221–2720, Amex 34/37, Discover 6011/644–649/65, JCB 3528–3589, Diners 300–305/36/38, UnionPay 62, Maestro
# 50/56–58/6x), and written as a card: in groups (4-4-4-4, 4-6-5, …) or with a card word nearby. A bare run of
# digits (a millisecond timestamp, a row id) is not one, whatever its checksum.
_CARD = r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-])"
_ISSUER = re.compile(r"4|5[1-5]|2(?:2(?:2[1-9]|[3-9]\d)|[3-6]\d\d|7(?:[01]\d|20))|3[47]|6011|64[4-9]|65|"
                     r"35(?:2[89]|[3-8]\d)|30[0-5]|3[68]|62|5[068]|6\d")
_CARD_WORDS = re.compile(r"\b(?:card|cards|credit|debit|visa|mastercard|master card|amex|american express|discover|"
                         r"jcb|diners|maestro|unionpay|cc|ccn|pan|payment|pay with|billing|cvv|cvc|expir\w*)\b",
                         re.IGNORECASE)
CARD_CONTEXT = 40  # characters before a bare card number searched for a card word
_PHONE = (r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
          r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)")
PII = (("email", re.compile(_EMAIL), "[EMAIL]"), ("card", re.compile(_CARD), "[CARD_NUMBER]"),
       ("ip", re.compile(f"{_IPV6}|{_IPV4}"), "[IP_ADDRESS]"), ("phone", re.compile(_PHONE), "[PHONE]"))


def luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def is_card(match: re.Match[str]) -> bool:
    """A Luhn-valid number with an issuer's prefix, written in groups or after a card word."""
    digits = re.sub(r"\D", "", match.group())
    if not (luhn(digits) and _ISSUER.match(digits)):
        return False
    groups = re.split(r"[ -]", match.group())
    if len(groups) >= 3 and all(3 <= len(g) <= 6 for g in groups):
        return True
    before = match.string[max(0, match.start() - CARD_CONTEXT):match.start()]
    return _CARD_WORDS.search(before) is not None


def is_ip(match: re.Match[str]) -> bool:
    """An address unless a version word or an object identifier's name comes just before it."""
    if ":" in match.group():  # IPv6: its form is specific enough with three groups or more
        return len([g for g in match.group().split(":") if g]) >= 3
    return _VERSION_BEFORE.search(match.string[max(0, match.start() - 24):match.start()]) is None


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """The text with personal information replaced by placeholders, and the replacements per kind."""
    counts: dict[str, int] = {}
    for kind, pattern, placeholder in PII:
        if kind == "email" and "@" not in text:
            continue

        def replace(m: re.Match[str], kind: str = kind, placeholder: str = placeholder) -> str:
            if kind == "card" and not is_card(m):
                return m.group()
            if kind == "ip" and not is_ip(m):
                return m.group()
            if kind == "phone" and m.group().startswith("+") and not 8 <= len(re.sub(r"\D", "", m.group())) <= 15:
                return m.group()
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder

        text = pattern.sub(replace, text)
    return text, counts


def scrub_turns(turns: Sequence[Turn]) -> tuple[tuple[Turn, ...], dict[str, int]]:
    out, counts = [], {}
    for turn in turns:
        content, found = scrub(turn.content)
        out.append(Turn(turn.role, content))
        for k, v in found.items():
            counts[k] = counts.get(k, 0) + v
    return tuple(out), counts


# ---------------------------------------------------------------- sketches: hash, MinHash, bands

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_WORD_POWERS = np.uint64(1099511628211) ** np.arange(WORD_BYTES, dtype=np.uint64)
_SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)
_SEEDS = None
CHUNK = 1 << 12  # shingles per MinHash step: NUM_PERM × CHUNK × 8 bytes of temporaries


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _seeds() -> np.ndarray:
    global _SEEDS
    if _SEEDS is None:
        _SEEDS = mix64(np.arange(1, NUM_PERM + 1, dtype=np.uint64) * _SHINGLE_MULT)
    return _SEEDS


def word_hashes(words: list[bytes]) -> np.ndarray:
    """A 64-bit hash of each word's first WORD_BYTES bytes, vectorised over the words."""
    if not words:
        return np.zeros(0, np.uint64)
    matrix = np.array(words, dtype=f"S{WORD_BYTES}").view(np.uint8).reshape(len(words), WORD_BYTES)
    return mix64((matrix.astype(np.uint64) * _WORD_POWERS).sum(axis=1, dtype=np.uint64))


def shingle_hashes(words: np.ndarray, k: int = SHINGLE_WORDS) -> np.ndarray:
    """Hashes of every run of k consecutive word hashes (one shingle of them all when fewer than k)."""
    n = len(words)
    if n == 0:
        return words
    k = min(k, n)
    out = np.zeros(n - k + 1, np.uint64)
    for j in range(k):  # k vector steps, not one per word
        out = out * _SHINGLE_MULT + words[j : n - k + 1 + j]
    return mix64(out)


def minhash(shingles: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
    """NUM_PERM minima of mix64(shingle ^ seed) (uint64), folded into `into` when given."""
    sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64) if into is None else into
    seeds = _seeds()[:, None]
    for a in range(0, len(shingles), CHUNK):
        np.minimum(sig, mix64(shingles[None, a : a + CHUNK] ^ seeds).min(axis=1), out=sig)
    return sig


@functools.lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) minimising the equally weighted false-positive and false-negative areas of the
    S-curve 1 − (1 − s^r)^b around the threshold (datasketch's choice)."""
    def area(lo: float, hi: float, b: int, r: int, positive: bool) -> float:
        s = lo + (np.arange(200) + 0.5) * (hi - lo) / 200
        p = 1 - (1 - s**r) ** b
        return float(((p if positive else 1 - p) * (hi - lo) / 200).sum())

    best, params = float("inf"), (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = 0.5 * area(0, threshold, b, r, True) + 0.5 * area(threshold, 1, b, r, False)
            if err < best:
                best, params = err, (b, r)
    return params


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, NUM_PERM] signatures → [n, bands] hashes of each band's `rows` values."""
    out = np.zeros((sigs.shape[0], bands), np.uint64)
    for j in range(rows):
        out = out * _SHINGLE_MULT + sigs[:, j : bands * rows : rows].astype(np.uint64)
    return mix64(out)


class Sketch:
    """One document's sketch, fed piece by piece (pieces cut after a newline give what the whole text gives):
    the normalised words' hash and shingles run on across pieces (the last SHINGLE_WORDS-1 words go on to
    the next piece, and the blocklist's longest phrase of text)."""

    def __init__(self, filters: Filters) -> None:
        self.filters = filters
        self.digest = hashlib.blake2b(digest_size=8)
        self.sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64) if filters.near_threshold else None
        self.carry: list[bytes] = []
        self.tail = ""
        self.length = 0
        self.words = 0
        self.blocked = False
        self.shingled = False
        self.span = max((len(p) for p in filters.phrases), default=0)

    def update(self, text: str, blocklist_text: str | None = None, length: int | None = None) -> None:
        """`text` adds to the hashes; the blocklist reads `blocklist_text` (default `text`)."""
        norm = normalize(text)
        self.length += len(text) if length is None else length
        if "exact" in self.filters.active and norm:
            self.digest.update((norm + " ").encode())
        if self.sig is not None:
            words = norm.encode().split()
            self.words += len(words)
            joined = self.carry + words
            if len(joined) >= SHINGLE_WORDS:
                minhash(shingle_hashes(word_hashes(joined)), self.sig)
                self.shingled = True
                joined = joined[-(SHINGLE_WORDS - 1):]
            self.carry = joined
        if self.filters.phrases and not self.blocked:
            scan = self.tail + " " + (norm if blocklist_text is None else normalize(blocklist_text))
            self.blocked = self.filters.blocked(scan)
            self.tail = scan[-self.span:]

    @property
    def hash(self) -> int:
        return int.from_bytes(self.digest.digest(), "little")

    def signature(self) -> np.ndarray | None:
        """The MinHash signature (a document of fewer than SHINGLE_WORDS words is one shingle)."""
        if self.sig is not None and not self.shingled and self.carry:
            minhash(shingle_hashes(word_hashes(self.carry)), self.sig)
            self.shingled = True
        return self.sig


def sketch_chat(turns: Sequence[Turn], filters: Filters) -> Sketch:
    """A conversation: the rendered template hashed, its model turns read by the blocklist."""
    sketch = Sketch(filters)
    sketch.update(render(turns).text, "\n".join(t.content for t in turns if t.role == "model"),
                  sum(len(t.content.strip()) for t in turns))
    return sketch


@dataclass
class Sketches:
    """One unit's documents, in reading order (the arrays `decide` reads)."""

    hashes: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    blocked: list[bool] = field(default_factory=list)
    nonempty: list[bool] = field(default_factory=list)
    sigs: list[np.ndarray] = field(default_factory=list)

    def add(self, sketch: Sketch) -> None:
        self.hashes.append(sketch.hash)
        self.lengths.append(sketch.length)
        self.blocked.append(sketch.blocked)
        self.nonempty.append(sketch.words > 0)
        sig = sketch.signature()
        if sig is not None:
            self.sigs.append((sig >> np.uint64(32)).astype(np.uint32))  # 32 bits: plenty to estimate J

    def arrays(self, filters: Filters) -> dict[str, np.ndarray]:
        n = len(self.hashes)
        out = {"hash": np.array(self.hashes, np.uint64).reshape(n), "length": np.array(self.lengths, np.int64).reshape(n),
               "blocked": np.array(self.blocked, bool).reshape(n), "nonempty": np.array(self.nonempty, bool).reshape(n)}
        sigs = np.stack(self.sigs) if self.sigs else np.zeros((n, NUM_PERM if filters.near_threshold else 0), np.uint32)
        out["sig"] = sigs
        if filters.near_threshold:
            out["bands"] = band_hashes(sigs, *lsh_params(filters.near_threshold))
        return out


# ---------------------------------------------------------------- the decision, partitioned by hash
#
# Every document that survives its unit's own filters (length, blocklist) gives records (key, doc, slot):
# slot EXACT_SLOT its exact hash, slot j (near) its band j's hash, and empty documents no band records. A
# unit writes them sorted by the key's top FANOUT_BITS bits, with the offset of each of those fine buckets, so
# a partition (a run of fine buckets) is one read per unit. Partition p then goes through the units in unit
# order holding, per slot, each key's first position (unit << 32 | doc): a later record of an exact key is an
# exact duplicate; a later record of a band key is a candidate pair with that first position, dropped when
# their signatures agree on at least the threshold's share of their NUM_PERM values — the rule of one process
# deciding everything at once: a document is a near duplicate when in one of its band buckets the earliest
# document (kept or not) is that similar to it.
#
# The band buckets hold the exact duplicates too (one process excluded them first): the earliest document of a
# bucket is never one, since its original has the same normalised words, so the same signature and buckets,
# and comes first; the buckets' earliest documents, so every decision, are the same (unless two different
# texts share a 64-bit exact hash, where the one process also dropped the later as an exact duplicate).

FANOUT_BITS = 12
FANOUT = 1 << FANOUT_BITS  # fine buckets per unit key file: the most partitions there can be
EXACT_SLOT = 255  # a record's slot: the exact hash, or band j < 255 (lsh_params gives at most NUM_PERM bands)
RECORD = np.dtype([("key", "<u8"), ("doc", "<u4"), ("slot", "u1")])  # 13 bytes a record on disk
DROP = np.dtype([("pos", "<u8"), ("code", "i1")])
# Memory of a partition job per record it holds (its first-position state and the batch of units being merged,
# with numpy's sort temporaries), measured by benchmarks/filters.py (peak traced bytes / records held).
RECORD_BYTES = 96
DOC_BYTES = 48  # a gathering job per document of its units (codes, drops and their sort)
SIG_BYTES = 4 * NUM_PERM
SPAN_READ = 16  # signature rows read for one wanted, at most, where one read of a span beats a read a row
SKETCH, PARTS, GROUPS, DECISIONS = "sketch", "part", "groups", "decisions"


@dataclass(frozen=True)
class Layout:
    """How the decision is cut: `partitions` jobs by hash (a power of two up to FANOUT), each holding at most
    `budget` records, then `groups` jobs by unit range writing each unit's decisions."""

    units: int
    partitions: int
    groups: int
    budget: int
    memory_mb: float

    @classmethod
    def plan(cls, units: int, records: int, documents: int, memory_mb: float) -> Layout:
        """Each partition's expected records at most half its budget (the keys it has seen, and the batch it
        merges into them). It depends on the sketches and the budget only, not on the process count, so every
        file the pre-pass writes is the same whatever WORKERS and ranks (the jobs go round-robin to them)."""
        memory = memory_mb * (1 << 20)
        budget = int(memory * 3 / 4) // RECORD_BYTES  # the rest: signature rows of candidate pairs
        if budget < 1:
            raise PipelineError(f"--filter-memory-mb {memory_mb}: too small for one record; give at least 0.001")
        wanted = max(1, math.ceil(2 * records / budget))
        partitions = 1 << (wanted - 1).bit_length()
        if partitions > FANOUT:
            raise PipelineError(f"--filter-memory-mb {memory_mb}: {records} filter records need "
                                f"{math.ceil(2 * records / budget)} partitions, at most {FANOUT} exist; raise it "
                                f"to at least {math.ceil(memory_mb * partitions / FANOUT)}")
        groups = max(1, min(units, math.ceil(documents * DOC_BYTES / memory)))
        return cls(units, partitions, groups, budget, memory_mb)

    def buckets(self, part: int) -> tuple[int, int]:
        return part * FANOUT // self.partitions, (part + 1) * FANOUT // self.partitions

    def unit_range(self, group: int) -> tuple[int, int]:
        return group * self.units // self.groups, (group + 1) * self.units // self.groups

    def pairs_per_chunk(self) -> int:
        """Candidate pairs verified at once: a quarter of the memory, at two signature rows a pair and up to
        SPAN_READ times that read where a unit's rows are dense."""
        return max(64, int(self.memory_mb * (1 << 20) / 4) // (2 * (SPAN_READ + 1) * SIG_BYTES))


def _path(folder: Path, kind: str, index: int, suffix: str = ".npy") -> Path:
    return folder / kind / f"{index:06d}{suffix}"


def local_codes(arrays: dict[str, np.ndarray], filters: Filters) -> np.ndarray:
    """A unit's own decisions: LENGTH and BLOCKLIST (the rest KEEP until the partitions decide)."""
    n = len(arrays["hash"])
    codes = np.zeros(n, np.int8)
    if "length" in filters.active:
        short = arrays["length"] < filters.min_chars
        long = arrays["length"] > filters.max_chars if filters.max_chars else np.zeros(n, bool)
        codes[short | long] = LENGTH
    if "blocklist" in filters.active:
        codes[(codes == KEEP) & arrays["blocked"]] = BLOCKLIST
    return codes


def unit_records(arrays: dict[str, np.ndarray], filters: Filters, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unit's records sorted by fine bucket, and the FANOUT + 1 offsets of the buckets."""
    alive = np.flatnonzero(codes == KEEP).astype(np.uint32)
    parts: list[tuple[np.ndarray, np.ndarray, int]] = []
    if "exact" in filters.active:
        parts.append((arrays["hash"][alive], alive, EXACT_SLOT))
    if filters.near_threshold:
        shingled = alive[arrays["nonempty"][alive]]
        parts += [(arrays["bands"][shingled, j], shingled, j) for j in range(arrays["bands"].shape[1])]
    records = np.zeros(sum(len(d) for _, d, _ in parts), RECORD)
    at = 0
    for keys, docs, slot in parts:
        records["key"][at : at + len(docs)], records["doc"][at : at + len(docs)] = keys, docs
        records["slot"][at : at + len(docs)] = slot
        at += len(docs)
    bucket = records["key"] >> np.uint64(64 - FANOUT_BITS)
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(FANOUT + 1, dtype=np.uint64)).astype(np.int64)
    return records[order], offsets


def write_unit(folder: Path, index: int, arrays: dict[str, np.ndarray], filters: Filters) -> dict[str, int]:
    """A unit's sketch files under `folder/sketch/`: its own codes, its records by fine bucket and, with
    `near`, its signatures (read only for candidate pairs). Returns its counts."""
    codes = local_codes(arrays, filters)
    records, offsets = unit_records(arrays, filters, codes)
    _save(_path(folder, SKETCH, index, ".codes.npy"), codes)
    _save(_path(folder, SKETCH, index, ".keys.npy"), offsets, records)
    if filters.near_threshold:
        _save(_path(folder, SKETCH, index, ".sig.npy"), arrays["sig"])
    return {"documents": len(codes), "records": len(records)}


def _save(path: Path, *arrays: np.ndarray) -> None:
    """.npy arrays one after the other in one file, written under a temporary name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for a in arrays:
            np.save(f, a, allow_pickle=False)


def _data_at(f: Any, at: int) -> int:
    """Where the data of the .npy array whose header starts at byte `at` begins (the caller knows its dtype and
    row width: the header is not parsed)."""
    head = os.pread(f.fileno(), 12, at)
    if head[:6] != b"\x93NUMPY":
        raise PipelineError(f"{f.name}: not a .npy array at byte {at}; delete the folder's filters/ and rerun")
    return at + 10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else \
        at + 12 + int.from_bytes(head[8:12], "little")


def _read(f: Any, dtype: np.dtype, data: int, start: int, count: int, width: int = 1) -> np.ndarray:
    """Rows [start, start + count) of `width` values of the array whose data begins at byte `data` (one
    positioned read)."""
    size = width * dtype.itemsize
    out = np.frombuffer(os.pread(f.fileno(), count * size, data + start * size), dtype)
    return out.reshape(count, width) if width > 1 else out


def _slice(path: Path, offsets: int, dtype: np.dtype, index: int, total: int) -> np.ndarray:
    """From a file of `offsets` int64 offsets then rows of `dtype`: the rows between offsets[index] and
    offsets[index + total] (opened, read, closed)."""
    with open(path, "rb", buffering=0) as f:
        data = _data_at(f, 0)
        bounds = _read(f, np.dtype(np.int64), data, index, total + 1)
        rows = _data_at(f, data + offsets * 8)
        return _read(f, dtype, rows, int(bounds[0]), int(bounds[-1] - bounds[0]))


def signature_rows(folder: Path, positions: np.ndarray) -> np.ndarray:
    """The signatures of documents at `positions` (unit << 32 | doc), read from each unit's file (opened,
    read and closed: no memory map stays open): one read of the span of a unit's rows where they are dense
    (at most SPAN_READ rows read a row wanted), else one positioned read a row."""
    out = np.zeros((len(positions), NUM_PERM), np.uint32)
    units = positions >> np.uint64(32)
    order = np.argsort(units, kind="stable")
    bounds = np.searchsorted(units[order], np.unique(units), side="right")
    for where in np.split(order, bounds[:-1]):
        unit = int(units[where[0]])
        rows, inverse = np.unique((positions[where] & np.uint64(0xFFFFFFFF)).astype(np.int64), return_inverse=True)
        with open(_path(folder, SKETCH, unit, ".sig.npy"), "rb", buffering=0) as f:
            data, u32 = _data_at(f, 0), np.dtype(np.uint32)
            span = int(rows[-1] - rows[0] + 1)
            if span <= SPAN_READ * len(rows):
                got = _read(f, u32, data, int(rows[0]), span, NUM_PERM)[rows - rows[0]]
            else:
                got = np.concatenate([_read(f, u32, data, int(r), 1, NUM_PERM) for r in rows])
        out[where] = got[inverse.reshape(-1)]
    return out


def decide_partition(folder: Path, part: int, layout: Layout, filters: Filters) -> dict[str, int]:
    """Partition `part`'s decisions: reads its fine buckets of every unit, in unit order, and writes the
    dropped positions with their code (`folder/part/`), cut by the layout's unit groups. Returns its counts
    (`held`: the most records it held at once, at most `layout.budget`)."""
    lo, hi = layout.buckets(part)
    state: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot → (keys sorted, their first positions)
    batch: list[tuple[int, np.ndarray]] = []
    counts = {"records": 0, "held": 0, "pairs": 0}
    drops: list[tuple[np.ndarray, int]] = []

    def merge() -> None:
        if batch:
            _merge(folder, batch, state, drops, counts, layout, filters)
            batch.clear()

    seen = pending = 0  # keys in the state; records in the batch
    for unit in range(layout.units):
        records = _slice(_path(folder, SKETCH, unit, ".keys.npy"), FANOUT + 1, RECORD, lo, hi - lo)
        if seen + pending + len(records) > layout.budget:
            merge()
            seen, pending = sum(len(k) for k, _ in state.values()), 0
            if seen + len(records) > layout.budget:
                raise PipelineError(f"filter partition {part}: {seen + len(records)} records (unit {unit}) exceed the "
                                    f"{layout.budget} that --filter-memory-mb {layout.memory_mb} allows; raise it (or "
                                    "lower --unit-bytes)")
        batch.append((unit, records))
        pending += len(records)
        counts["records"] += len(records)
        counts["held"] = max(counts["held"], seen + pending)
    merge()
    found = np.zeros(sum(len(p) for p, _ in drops), DROP)
    found["pos"] = np.concatenate([p for p, _ in drops] + [np.zeros(0, np.uint64)])
    found["code"] = np.concatenate([np.full(len(p), c, np.int8) for p, c in drops] + [np.zeros(0, np.int8)])
    out = _first_drops(found)
    bounds = np.array([layout.unit_range(g)[0] for g in range(layout.groups)] + [layout.units], np.uint64)
    _save(_path(folder, PARTS, part), np.searchsorted(out["pos"], bounds << np.uint64(32)).astype(np.int64), out)
    return {**counts, "drops": len(out)}


def _first_drops(drops: np.ndarray) -> np.ndarray:
    """DROP rows sorted by position, one a position: where several filters dropped a document, the lowest code
    (exact before near) names it."""
    drops = drops[np.lexsort((drops["code"], drops["pos"]))]
    return drops[np.r_[True, drops["pos"][1:] != drops["pos"][:-1]]] if len(drops) else drops


def _merge(folder: Path, batch: list[tuple[int, np.ndarray]], state: dict[int, tuple[np.ndarray, np.ndarray]],
           drops: list[tuple[np.ndarray, int]], counts: dict[str, int], layout: Layout, filters: Filters) -> None:
    """Merges a batch of consecutive units into the first positions: what comes after a key's first is
    dropped (exact) or a candidate pair (band)."""
    records = np.concatenate([r for _, r in batch])
    pos = np.concatenate([(np.uint64(u) << np.uint64(32)) | r["doc"].astype(np.uint64) for u, r in batch])
    later, firsts = [], []
    for slot in np.unique(records["slot"]).tolist():
        sel = np.flatnonzero(records["slot"] == slot)
        keys, at = records["key"][sel], pos[sel]
        order = np.lexsort((at, keys))
        keys, at = keys[order], at[order]
        starts = np.r_[True, keys[1:] != keys[:-1]]
        new_keys, new_first = keys[starts], at[starts]
        known_keys, known_first = state.get(slot, (np.zeros(0, np.uint64), np.zeros(0, np.uint64)))
        where = np.searchsorted(known_keys, new_keys)
        found = np.zeros(len(new_keys), bool)
        first = new_first.copy()
        if len(known_keys):
            near = np.minimum(where, len(known_keys) - 1)
            found = known_keys[near] == new_keys
            first[found] = known_first[near[found]]  # seen in an earlier batch: that position comes first
        first = first[np.cumsum(starts) - 1]  # each record's key's first position
        dup = at != first
        if slot == EXACT_SLOT:
            drops.append((at[dup], EXACT))
        else:
            later.append(at[dup])
            firsts.append(first[dup])
        state[slot] = (np.insert(known_keys, where[~found], new_keys[~found]),
                       np.insert(known_first, where[~found], new_first[~found]))
    if later:
        _verify(folder, np.concatenate(later), np.concatenate(firsts), drops, counts, layout, filters)


def _verify(folder: Path, later: np.ndarray, first: np.ndarray, drops: list[tuple[np.ndarray, int]],
            counts: dict[str, int], layout: Layout, filters: Filters) -> None:
    """Candidate pairs (one per pair, whatever bands it shares) dropped when similar enough."""
    if not len(later):
        return
    order = np.lexsort((first, later))
    later, first = later[order], first[order]
    unique = np.r_[True, (later[1:] != later[:-1]) | (first[1:] != first[:-1])]
    later, first = later[unique], first[unique]
    counts["pairs"] += len(later)
    step = layout.pairs_per_chunk()
    for a in range(0, len(later), step):
        x, y = later[a : a + step], first[a : a + step]
        rows = signature_rows(folder, np.concatenate([x, y]))  # one read of each unit's file for both sides
        same = (rows[: len(x)] == rows[len(x) :]).mean(axis=1)
        assert filters.near_threshold is not None
        drops.append((x[same >= filters.near_threshold], NEAR))


def gather_group(folder: Path, group: int, layout: Layout) -> list[str]:
    """Group `group`'s units: their own codes with every partition's drops, written per unit
    (`folder/decisions/`); returns the sha256 of each unit's decisions."""
    lo, hi = layout.unit_range(group)
    found = [_slice(_path(folder, PARTS, p), layout.groups + 1, DROP, group, 1) for p in range(layout.partitions)]
    drops = _first_drops(np.concatenate(found) if found else np.zeros(0, DROP))
    units = (drops["pos"] >> np.uint64(32)).astype(np.int64)
    bounds = np.searchsorted(units, np.arange(lo, hi + 1))
    shas = []
    for i, unit in enumerate(range(lo, hi)):
        codes = np.load(_path(folder, SKETCH, unit, ".codes.npy"), allow_pickle=False)
        mine = drops[bounds[i] : bounds[i + 1]]
        codes[(mine["pos"] & np.uint64(0xFFFFFFFF)).astype(np.int64)] = mine["code"]
        _save(_path(folder, DECISIONS, unit), codes)
        shas.append(hashlib.sha256(codes.tobytes()).hexdigest())
    return shas


def decision_path(folder: Path, unit: int) -> Path:
    return _path(folder, DECISIONS, unit)


def decide(units: Sequence[dict[str, np.ndarray]], filters: Filters, folder: Path,
           memory_mb: float | None = None) -> list[np.ndarray]:
    """Per unit, per document, a code (KEEP or what dropped it), with every job in this process: `units` in
    unit order, each the arrays of `Sketches.arrays`; the files go under `folder`; `memory_mb` per deciding job
    (None: `filters.memory_mb`, --filter-memory-mb). `make tokens` runs the same steps with the partitions and
    groups spread over its processes."""
    counts = [write_unit(folder, i, u, filters) for i, u in enumerate(units)]
    layout = Layout.plan(len(units), sum(c["records"] for c in counts), sum(c["documents"] for c in counts),
                         filters.memory_mb if memory_mb is None else memory_mb)
    for part in range(layout.partitions):
        decide_partition(folder, part, layout, filters)
    for group in range(layout.groups):
        gather_group(folder, group, layout)
    return [np.load(decision_path(folder, i), allow_pickle=False) for i in range(len(units))]
