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
from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.preferences import PreferenceConfig, build_preferences
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
    if spec.format == "preference":
        preferences(args, spec, cfg, work.preferences, runtime)
        return
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(spec, cfg)
    manifests = build_token_shards(spec, tokenizer, args.tokens or work.tokens, cfg, runtime, build(FilterConfig, args))
    if runtime.is_main:  # after the shards: a run refused on its input leaves no folder behind
        tokenizer.save(work.tokenizer)
    if manifests is not None:
        print(json.dumps({s: {"shards": len(m.shards), "windows": m.rows, "tokens": m.tokens,
                              "available_tokens": m.stats.available_tokens,
                              **{k: v for k, v in (("filters", m.stats.filters), ("conversations", m.stats.conversations))
                                 if v is not None}} for s, m in manifests.items()}))


def preferences(args: argparse.Namespace, spec: CorpusSpec, cfg: TokenizeConfig, default: Path,
                runtime: Runtime) -> None:
    """FORMAT=preference: a file of prompt/chosen/rejected rows → preference shards (schemas/preferences.py) in
    `--tokens` (default WORK/preferences), the input of `make reward-model PREFERENCES=<that folder>`. One
    process (rank 0): the pairs are a post-training set, small next to a corpus."""
    if args.tokenizer is None:
        raise PipelineError("--format preference needs --tokenizer (TOKENIZER=): the reward model's BASE "
                            "tokenizer.model, whose ids the reward model reads")
    source = Path(spec.source)
    if not source.is_file():
        raise PipelineError(f"--corpus {spec.source}: --format preference reads one .jsonl/.json(.gz/.zst) or .parquet "
                            "file of prompt/chosen/rejected rows")
    if not runtime.is_main:
        return
    out = args.tokens or default
    built = build_preferences(source, Tokenizer.load(args.tokenizer), out, PreferenceConfig(val_fraction=cfg.val_fraction),
                              build(FilterConfig, args), threads=cfg.workers)
    print(json.dumps({"preferences": str(out), **{s: m.rows for s, m in built.items()},
                      "counts": {k: v for k, v in built["train"].counts.items() if v}}))


if __name__ == "__main__":
    run(main)
