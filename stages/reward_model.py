"""`make reward-model`: preference pairs (PREFERENCES: prompt or messages, chosen, rejected) through the chat
template, the filters and the content-hash split into REWARD_MODEL/data/, then a Gemma 2 reward model
(sequence classifier, one output) initialised from BASE and trained with TRL's RewardTrainer (Bradley–Terry)
into REWARD_MODEL/: an HF directory `AutoModelForSequenceClassification` loads, with finished.json holding the
held-out pairwise accuracy (eval_accuracy) and mean reward margin (eval_margin). Resumable; a finished folder
is skipped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.preferences import PreferenceConfig
from pipeline.reward import RewardTrainConfig, train_reward_model
from stages._cli import add_settings, build, layout, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("reward_model", __doc__)
    p.add_argument("--preferences", type=Path, help="preference file: .jsonl/.json (optionally .gz/.zst) or "
                   ".parquet rows of prompt (or messages), chosen, rejected (required)")
    p.add_argument("--base", type=Path, help="Hugging Face Gemma 2 directory the reward model starts from, with its "
                   "tokenizer.model: the teacher or a student (required)")
    p.add_argument("--out", type=Path, help="output folder (default: WORK/reward-model)")
    add_settings(p, RewardTrainConfig)
    add_settings(p, PreferenceConfig)
    add_settings(p, FilterConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    if args.preferences is None or args.base is None:
        missing = " and ".join(f for f, v in (("--preferences (PREFERENCES=)", args.preferences),
                                             ("--base (BASE=)", args.base)) if v is None)
        raise PipelineError(f"{missing} required: the preference file and the Gemma 2 directory to start from")
    out = args.out or layout(args).work / "reward-model"
    final = train_reward_model(args.preferences, args.base, out, build(RewardTrainConfig, args),
                               build(PreferenceConfig, args), build(FilterConfig, args))
    if final:
        print(json.dumps({"reward_model": str(out), **{k: final[k] for k in
                          ("eval_accuracy", "eval_margin", "eval_pairs", "train_pairs", "steps", "wall_s")}}))


if __name__ == "__main__":
    run(main)
