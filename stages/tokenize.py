"""`make tokens`: corpus → tokenizer (given or trained) → token shards + manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.corpus import CorpusSpec
from pipeline.tokenizer import Tokenizer
from pipeline.tokens import TokenizeConfig, build_token_shards, train_tokenizer
from stages._cli import parse, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.tokenize", description=__doc__)
    p.add_argument("--corpus", default="stdlib", help="stdlib, a file or folder, or a Hugging Face dataset name")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="train", help="dataset split to read (Hugging Face datasets)")
    p.add_argument("--tokenizer", type=Path, help="an existing tokenizer.model (e.g. the teacher's); else one is trained")
    p.add_argument("--vocab", type=int, default=4096, help="pieces of a trained tokenizer")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--shard-windows", type=int, default=4096, help="windows per shard")
    p.add_argument("--max-tokens", type=int, default=0, help="stop after this many train tokens (0: all)")
    p.add_argument("--work", type=Path, required=True, help="work directory: writes tokenizer/ and tokens/")
    args = parse(p, argv)
    cfg = TokenizeConfig(args.seq_len, args.val_fraction, args.shard_windows, args.vocab, args.max_tokens)
    spec = CorpusSpec(args.corpus, args.text_column, args.split)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(spec, cfg)
    tokenizer.save(args.work / "tokenizer" / "tokenizer.model")
    manifests = build_token_shards(spec, tokenizer, args.work / "tokens", cfg)
    print(json.dumps({s: {"shards": len(m["shards"]), "windows": m["rows"], "tokens": m["tokens"]}
                      for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
