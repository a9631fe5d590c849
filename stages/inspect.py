"""`make inspect`: a shard's schema, metadata and, for one position, the decoded context with the
teacher's top-K tokens most likely first (whatever order and encoding the cache stores them in), their
probabilities, the tail mass and draws, and the teacher's log-prob of the actual next token and entropy."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.tokenizer import Tokenizer
from schemas.common import from_json, read_file_meta
from schemas.logits import SAMPLE_COLUMNS, SIGNAL_COLUMNS, TOPK_COLUMNS, LogitsShardMeta, decode
from schemas.manifest import read_manifest
from stages._cli import layout, parse, run, stage_parser


def decoding_tokenizer(shard: Path, explicit: Path | None) -> Tokenizer | None:
    """The cache keeps its tokenizer one folder up (logits/tokenizer.model); token shards two up."""
    for candidate in (explicit, shard.parent.parent / "tokenizer.model", shard.parent.parent.parent / "tokenizer" / "tokenizer.model"):
        if candidate is not None and candidate.is_file():
            return Tokenizer.load(candidate)
    return None


def parser() -> argparse.ArgumentParser:
    p = stage_parser("inspect", __doc__)
    p.add_argument("file", type=Path, nargs="?", help="a token or logit shard (default: the first val shard of WORK's "
                                                      "cache)")
    p.add_argument("--row", type=int, default=0, help="row (window) of the shard")
    p.add_argument("--pos", type=int, default=None, help="position in the window (default: the middle)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model for decoding (found next to the cache if omitted)")
    p.add_argument("--context", type=int, default=12, help="tokens of context to show")
    p.add_argument("--show", type=int, default=10, help="how many of the top-K to list")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    if args.file is None:
        val = layout(args).cache / "val"
        args.file = val / read_manifest(val, "logits").shards[0].file
    schema, meta = read_file_meta(args.file)
    parquet = pq.ParquetFile(args.file)
    print(f"file: {args.file}  rows: {parquet.metadata.num_rows}  row groups: {parquet.num_row_groups}")
    print("schema:\n  " + str(schema.remove_metadata()).replace("\n", "\n  "))
    print("metadata: " + json.dumps(meta, indent=2, sort_keys=True))
    if not 0 <= args.row < parquet.metadata.num_rows:
        raise PipelineError(f"{args.file}: --row {args.row} out of range 0..{parquet.metadata.num_rows - 1}")
    table = pq.read_table(args.file).slice(args.row, 1)
    row = {name: table.column(name)[0].as_py() for name in ("window", "input_ids")}
    tok = decoding_tokenizer(args.file, args.tokenizer)
    show = (lambda i: repr(tok.piece(i))) if tok else str
    ids = row["input_ids"]
    pos = len(ids) // 2 if args.pos is None else args.pos
    if not 0 <= pos < len(ids) - 1:
        raise PipelineError(f"--pos {pos} out of range 0..{len(ids) - 2}")
    context = ids[max(0, pos + 1 - args.context) : pos + 1]
    print(f"\nwindow {row['window']}, position {pos}: context ends with")
    print("  " + (repr(tok.decode(context)) if tok else str(context)))
    print(f"  actual next token: {show(ids[pos + 1])}")
    if meta.get("kind") != "logits":
        return
    cache = from_json(LogitsShardMeta, meta, args.file)
    wanted = TOPK_COLUMNS + ("tail_mass",) + (SAMPLE_COLUMNS if cache.samples else ()) + \
        (SIGNAL_COLUMNS if cache.signals else ())
    values = {name: v[0, pos] for name, v in decode(table, wanted, cache).items()}
    if cache.topk:
        print("  teacher top-K (most likely first):")
        order = sorted(range(cache.topk), key=lambda j: (-values["topk_logprobs"][j], values["topk_ids"][j]))
        for rank, j in enumerate(order[: args.show]):
            i, lp = int(values["topk_ids"][j]), float(values["topk_logprobs"][j])
            mark = "  <- actual" if i == ids[pos + 1] else ""
            print(f"    {rank:3d}  p={math.exp(lp):.4f}  {show(i)}{mark}")
        print(f"  tail mass outside the top {cache.topk}: {values['tail_mass']:.4f}")
    if cache.samples:
        drawn = [(int(i), int(c)) for i, c in zip(values["sample_ids"], values["sample_counts"]) if c > 0]
        what = "draws from the whole distribution" if cache.topk == 0 else "tail draws"
        print(f"  {what} ({cache.samples}, {cache.sampling}): " + ", ".join(f"{show(i)}×{c}" for i, c in drawn))
    if cache.signals:
        print(f"  teacher log-prob of the actual next token: {values['label_logprob']:.4f} "
              f"(p={math.exp(values['label_logprob']):.4f}); entropy {values['entropy']:.4f} nats")


if __name__ == "__main__":
    run(main)
