"""`make tokens`: corpus → tokenizer (given or trained) → token shards + manifests.

WORKERS local processes tokenize the corpus's work units; under LAUNCH (torchrun / accelerate launch)
every rank does so for its share and rank 0 writes the manifests once all units are recorded on the
shared file system. The shards are the same whatever WORKERS and the rank count; a killed run continues
from its completed units. `--format chat` reads conversations (Gemma's chat template, only model turns
trained); the filters (duplicates, near duplicates, personal information, length, blocklist) apply to
either format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.corpus import CorpusSpec
from pipeline.filters import FilterConfig
from pipeline.runtime import Runtime
from pipeline.tokenizer import Tokenizer
from pipeline.tokens import TokenizeConfig, build_token_shards, train_tokenizer
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("tokenize", __doc__)
    add_settings(p, CorpusSpec)
    add_settings(p, TokenizeConfig)
    add_settings(p, FilterConfig)
    p.add_argument("--tokenizer", type=Path, help="an existing tokenizer.model (e.g. the teacher's); else one is "
                   "trained (by every rank alike: pass one for multi-host runs)")
    p.add_argument("--tokens", type=Path, help="output folder (default: WORK/tokens)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    work = layout(args)
    cfg, spec = build(TokenizeConfig, args), build(CorpusSpec, args)
    runtime = Runtime.from_env()
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(spec, cfg)
    manifests = build_token_shards(spec, tokenizer, args.tokens or work.tokens, cfg, runtime, build(FilterConfig, args))
    if runtime.is_main:  # after the shards: a run refused on its input leaves no folder behind
        tokenizer.save(work.tokenizer)
    if manifests is not None:
        print(json.dumps({s: {"shards": len(m.shards), "windows": m.rows, "tokens": m.tokens,
                              "available_tokens": m.stats.available_tokens,
                              **{k: v for k, v in (("filters", m.stats.filters), ("conversations", m.stats.conversations))
                                 if v is not None}} for s, m in manifests.items()}))


if __name__ == "__main__":
    run(main)
