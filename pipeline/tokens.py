"""Stage one, first half: documents → `<bos> doc <eos>` packed into `<bos>`-first windows of SEQ_LEN+1 →
token shards (the window contract is in schemas/tokens.py).

The split is by document hash; each split streams into its own shards and gets a manifest when complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.corpus import CorpusSpec, is_val, iter_documents
from pipeline.errors import PipelineError
from pipeline.fsutil import clean_stale_tmp
from pipeline.layout import SPLITS
from pipeline.progress import progress
from pipeline.settings import setting
from pipeline.shards import ShardWriter, rows_per_group
from pipeline.tokenizer import BOS, EOS, PAD, Tokenizer
from schemas.common import with_meta
from schemas.manifest import MANIFEST, Manifest, ShardRecord, TokensStats, read_manifest, shard_record, write_manifest
from schemas.tokens import TokensMeta, encode, token_schema


@dataclass(frozen=True)
class TokenizeConfig:
    seq_len: int = setting(128, "positions per window (a window holds SEQ_LEN+1 tokens)")
    val_fraction: float = setting(0.03, "share of documents (by a hash of their id) in the validation split")
    shard_windows: int = setting(1024, "windows per token shard")
    vocab_size: int = setting(4096, "pieces of a tokenizer trained here (unused with --tokenizer)", flag="vocab")
    corpus_tokens: int = setting(0, "stop after this many train tokens (0: the whole corpus)")


def train_tokenizer(spec: CorpusSpec, cfg: TokenizeConfig) -> Tokenizer:
    """Trains on the train split only, so validation text never shapes the vocabulary."""
    texts = (text for doc_id, text in iter_documents(spec) if not is_val(doc_id, cfg.val_fraction))
    return Tokenizer.train(texts, cfg.vocab_size)


class _SplitWriter:
    """Writes one split's windows into numbered shards."""

    def __init__(self, folder: Path, split: str, meta: TokensMeta, cfg: TokenizeConfig) -> None:
        self.folder, self.split, self.meta, self.cfg = folder, split, meta, cfg
        self.schema = token_schema(cfg.seq_len)
        self.rows: list[np.ndarray] = []
        self.continued: list[bool] = []
        self.records: list[ShardRecord] = []
        self.window = 0
        self.max_id = -1
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # incomplete until this run writes it again
        clean_stale_tmp(folder)

    @property
    def total(self) -> int:
        return self.window + len(self.rows)

    def add(self, window: np.ndarray, continued: bool) -> None:
        self.rows.append(window)
        self.continued.append(continued)
        if len(self.rows) == self.cfg.shard_windows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        ids = np.stack(self.rows)
        n, width = ids.shape
        table = encode(np.arange(self.window, self.window + n), ids, np.array(self.continued), self.schema)
        path = self.folder / f"{self.split}-{len(self.records):05d}.parquet"
        with ShardWriter(path, with_meta(self.schema, self.meta), rows_per_group(width * 4)) as w:
            w.write(table)
        record = shard_record(path, n, self.cfg.seq_len, max_id=int(ids.max()))
        self.records.append(record)
        self.max_id = max(self.max_id, int(ids.max()))
        self.window += n
        self.rows, self.continued = [], []

    def finish(self) -> Manifest:
        self.flush()
        if not self.records:
            raise PipelineError(
                f"{self.folder}: the {self.split} split got no complete window of {self.cfg.seq_len + 1} tokens; "
                "use a larger corpus, a smaller SEQ_LEN or another --val-fraction"
            )
        # Shards from an earlier, larger run would look like part of this one: remove them.
        keep = {r.file for r in self.records}
        for old in self.folder.glob(f"{self.split}-*.parquet"):
            if old.name not in keep:
                old.unlink()
        return write_manifest(self.folder, self.meta, self.records, TokensStats(max_id=self.max_id))


def build_token_shards(spec: CorpusSpec, tokenizer: Tokenizer, out: Path, cfg: TokenizeConfig) -> dict[str, Manifest]:
    """Tokenizes the corpus into `out/{train,val}/`; returns the two manifests."""
    metas = {s: TokensMeta(seq_len=cfg.seq_len, vocab_size=tokenizer.vocab_size,
                           tokenizer_fingerprint=tokenizer.fingerprint, corpus=spec.describe(), split=s,
                           val_fraction=cfg.val_fraction, corpus_tokens=cfg.corpus_tokens,
                           shard_windows=cfg.shard_windows) for s in SPLITS}
    if _already_built(out, metas):
        print(f"{out}: token shards with these settings are complete; nothing to do")
        return {s: read_manifest(out / s, "tokens") for s in SPLITS}
    writers = {s: _SplitWriter(out / s, s, metas[s], cfg) for s in SPLITS}
    tokenizer.save(out / "tokenizer.model")  # every data folder carries the tokenizer it was made with
    docs = tokens = 0
    start = time.perf_counter()
    bar = progress(desc="tokenize", unit=" doc")
    streams = {s: WindowStream(cfg.seq_len) for s in SPLITS}
    for doc_id, text in iter_documents(spec):
        split = "val" if is_val(doc_id, cfg.val_fraction) else "train"
        if cfg.corpus_tokens and _budget_left(writers, cfg) == {"val"} - {split}:
            continue  # train budget met; keep reading only until val has its share
        ids = tokenizer.encode(text)
        if not ids:
            continue
        for window, continued in streams[split].push(ids):
            writers[split].add(window, continued)
        docs += 1
        tokens += len(ids) + 2
        bar.update(1)
        bar.set_postfix(tokens=tokens, tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
        if cfg.corpus_tokens and not _budget_left(writers, cfg):
            break
    bar.close()
    for split in SPLITS:
        for window, continued in streams[split].flush():
            writers[split].add(window, continued)
    if docs == 0:
        raise PipelineError(f"corpus {spec.describe()!r} has no documents; nothing to tokenize")
    return {s: writers[s].finish() for s in SPLITS}


def _already_built(out: Path, metas: dict[str, TokensMeta]) -> bool:
    try:
        return all(read_manifest(out / s, "tokens").meta == metas[s] for s in SPLITS)
    except PipelineError:
        return False


def _budget_left(writers: dict[str, _SplitWriter], cfg: TokenizeConfig) -> set[str]:
    """Splits still short of their token budget under --max-tokens (val gets its fraction's share)."""
    budget = {"train": cfg.corpus_tokens,
              "val": cfg.corpus_tokens * cfg.val_fraction / max(1e-9, 1 - cfg.val_fraction)}
    return {s for s in SPLITS if writers[s].total * cfg.seq_len < budget[s]}


class WindowStream:
    """Packs documents `<bos> doc <eos>` into windows of seq_len+1 tokens that each start with `<bos>`. A
    document that does not fit continues in the next window after a fresh `<bos>` and a repeat of the last
    token already placed (so its next token is predicted with context, and no token goes untrained);
    such a window is `continued`. A new document never starts in a window's last slot (that slot is
    padded). Memory: one window; time: linear in the tokens."""

    def __init__(self, seq_len: int) -> None:
        self.width = seq_len + 1
        self.buf = np.zeros(self.width, dtype=np.int32)
        self.fill = 0
        self.continued = False

    def push(self, ids: list[int] | np.ndarray) -> Iterator[tuple[np.ndarray, bool]]:
        if self.width - self.fill < 2 and self.fill:
            yield from self.flush()
        doc = np.concatenate(([BOS], np.asarray(ids, dtype=np.int32), [EOS])).astype(np.int32)
        start = 0
        while start < len(doc):
            take = min(self.width - self.fill, len(doc) - start)
            self.buf[self.fill : self.fill + take] = doc[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.width:
                yield self.buf.copy(), self.continued
                if start < len(doc):
                    self.buf[0], self.buf[1] = BOS, doc[start - 1]
                    self.fill, self.continued = 2, True
                else:
                    self.fill, self.continued = 0, False

    def flush(self) -> Iterator[tuple[np.ndarray, bool]]:
        """The partial last window, padded (pad labels do not train)."""
        if self.fill:
            self.buf[self.fill :] = PAD
            yield self.buf.copy(), self.continued
            self.fill, self.continued = 0, False
