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
(pipeline/tokens.py): each work unit's documents are sketched in parallel (`sketch_text`/`sketch_chat` →
one row of `Sketches` per document), one process then decides in unit order — first occurrence wins —
(`decide`), and tokenization skips what was dropped. So the decisions depend on the input and these
settings alone, never on WORKERS or the rank count.

Memory of the deciding process (rank 0), per document: its 64-bit hash, length, flags and LSH band hashes
(8 bytes × bands: 9 bands at the default threshold), 90 bytes, plus ~200 bytes of working memory while
deciding (the columns joined across units, np.unique's sort): about 300 bytes, so 3 GB for 10^7 documents
(measured: 1.7 s and 196 B/doc of peak working memory for 10^6 documents). The signatures (4 bytes ×
NUM_PERM = 512 bytes a document) stay on disk, memory-mapped; only the rows of colliding pairs are read.
Sketching runs at ~9 MB/s of text per process, scrubbing at ~7 MB/s (2-core CPU, stdlib sources).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.chat import Turn, render
from pipeline.errors import PipelineError
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
        return Filters(tuple(active), self.near_threshold if "near" in active else None, self.min_chars,
                       self.max_chars, phrases)


@dataclass(frozen=True)
class Filters:
    """The resolved filters of one run (what `FilterConfig.resolve` makes of the settings)."""

    active: tuple[str, ...] = ()
    near_threshold: float | None = None
    min_chars: int = 0
    max_chars: int = 0
    phrases: tuple[str, ...] = ()

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


# ---------------------------------------------------------------- the decision, in unit order


def decide(units: Sequence[dict[str, np.ndarray]], filters: Filters) -> list[np.ndarray]:
    """Per unit, per document, a code (KEEP or what dropped it). `units` in unit order, each the arrays of
    `Sketches.arrays` except `sig`, which may be a memory map (only colliding rows are read)."""
    sizes = [len(u["hash"]) for u in units]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    codes = np.zeros(n, np.int8)
    if n == 0:
        return [codes[:0] for _ in units]
    if "length" in filters.active:
        lengths = np.concatenate([u["length"] for u in units])
        short = lengths < filters.min_chars
        long = lengths > filters.max_chars if filters.max_chars else np.zeros(n, bool)
        codes[short | long] = LENGTH
    if "blocklist" in filters.active:
        codes[(codes == KEEP) & np.concatenate([u["blocked"] for u in units])] = BLOCKLIST
    if "exact" in filters.active:
        alive = np.flatnonzero(codes == KEEP)
        _, first = np.unique(np.concatenate([u["hash"] for u in units])[alive], return_index=True)
        dup = np.ones(len(alive), bool)
        dup[first] = False  # np.unique's index is each value's first occurrence: the earliest document
        codes[alive[dup]] = EXACT
    if filters.near_threshold:
        _near(units, offsets, codes, filters.near_threshold)
    return [codes[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _near(units: Sequence[dict[str, np.ndarray]], offsets: np.ndarray, codes: np.ndarray, threshold: float) -> None:
    alive = np.flatnonzero((codes == KEEP) & np.concatenate([u["nonempty"] for u in units]))
    bands = np.concatenate([u["bands"] for u in units])[alive]
    dup = np.zeros(len(alive), bool)
    for j in range(bands.shape[1]):
        _, first, inverse = np.unique(bands[:, j], return_index=True, return_inverse=True)
        rep = first[inverse.reshape(-1)]  # the earliest document of each one's bucket
        pairs = np.flatnonzero((rep != np.arange(len(alive))) & ~dup)
        for a in range(0, len(pairs), 1 << 16):  # bounded: 2 × 64k signature rows at a time
            chunk = pairs[a : a + (1 << 16)]
            same = (_rows(units, offsets, alive[rep[chunk]]) == _rows(units, offsets, alive[chunk])).mean(axis=1)
            dup[chunk[same >= threshold]] = True
    codes[alive[dup]] = NEAR


def _rows(units: Sequence[dict[str, np.ndarray]], offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Signature rows of global document indices, gathered unit by unit (memory maps read only these)."""
    out = np.zeros((len(index), units[0]["sig"].shape[1]), np.uint32)
    unit = np.searchsorted(offsets, index, side="right") - 1
    for u in np.unique(unit):
        where = np.flatnonzero(unit == u)
        out[where] = units[u]["sig"][index[where] - offsets[u]]
    return out
