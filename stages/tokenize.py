"""`make tokens`: corpus → tokenizer (given or trained) → token shards + manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.corpus import CorpusSpec
from pipeline.tokenizer import Tokenizer
from pipeline.tokens import TokenizeConfig, build_token_shards, train_tokenizer
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("tokenize", __doc__)
    add_settings(p, CorpusSpec)
    add_settings(p, TokenizeConfig)
    p.add_argument("--tokenizer", type=Path, help="an existing tokenizer.model (e.g. the teacher's); else one is trained")
    p.add_argument("--tokens", type=Path, help="output folder (default: WORK/tokens)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    cfg, spec = build(TokenizeConfig, args), build(CorpusSpec, args)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(spec, cfg)
    tokenizer.save(work.tokenizer)
    manifests = build_token_shards(spec, tokenizer, args.tokens or work.tokens, cfg)
    print(json.dumps({s: {"shards": len(m.shards), "windows": m.rows, "tokens": m.tokens} for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
