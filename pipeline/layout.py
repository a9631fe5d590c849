"""The work directory, spelled once. Every stage takes `--work` and finds its inputs and outputs here;
explicit path flags override single entries.

    runs/<RUN>/
      tokenizer/tokenizer.model
      tokens/{train,val}/*.parquet + manifest.json
      teacher/                     HF Gemma 2 directory (embedded default)
      logits/{train,val}/*.parquet + manifest.json      (the cache)
      students/<name>/             HF Gemma 2 directory + checkpoint/ + metrics.jsonl + run_config.json
      report/                      report.md, summary.json, val_loss.png
      bench/                       benchmark JSON
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")


def splits_of(folder: Path, rollouts: bool) -> tuple[str, ...]:
    """The splits a tokens or logits folder must hold: train and val, except a folder of rollouts (`rollouts`
    set in its train manifest's meta; `make rollouts` writes no val split) with no val folder, which holds
    train alone. Any other folder without val is unfinished, and reading its val manifest says so."""
    return ("train",) if rollouts and not (folder / "val").exists() else SPLITS


@dataclass(frozen=True)
class Layout:
    work: Path

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer" / "tokenizer.model"

    @property
    def tokens(self) -> Path:
        return self.work / "tokens"

    @property
    def teacher(self) -> Path:
        return self.work / "teacher"

    @property
    def preferences(self) -> Path:  # `make tokens FORMAT=preference`
        return self.work / "preferences"

    @property
    def cache(self) -> Path:
        return self.work / "logits"

    @property
    def students(self) -> Path:
        return self.work / "students"

    @property
    def report(self) -> Path:
        return self.work / "report"

    @property
    def bench(self) -> Path:
        return self.work / "bench"
