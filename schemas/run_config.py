"""`run_config.json` beside every trained model, version 1: the resolved settings it was made with. A resumed
run must find the same settings that decide its trajectory (the data is identified by its fingerprints, not by
its path; pipeline/train.py `RESUMABLE` names the settings a resume may change). A resume rewrites the file with
its own settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import read_json, write_json
from schemas.common import from_json, to_json

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True, kw_only=True)
class DataRef:
    """Which cache (or token shards) a model was trained on."""

    kind: str
    tokenizer_fingerprint: str
    seq_len: int
    vocab_size: int
    train_rows: int
    teacher_fingerprint: str | None = None  # caches only
    topk: int | None = None
    samples: int | None = None
    format: str = "text"  # chat: trained on model turns only; `make generate` then applies the chat template


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str
    student: str
    model: dict[str, Any]  # the HF config.json of the model
    data: str  # the path it was reached through (informative; not compared on resume)
    cache: DataRef
    loss: dict[str, Any]
    optim: dict[str, Any]
    train: dict[str, Any]
    world_size: int
    total_steps: int
    tokens_per_step: int
    parameters: int
    # Trained on rollout caches (on-policy rounds, pipeline/train.py `OnPolicy`): the newest cache's round, and
    # the caches' identities, the mix and the init model's lineage. None: not trained on rollouts.
    onpolicy_round: int | None = None
    onpolicy: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**to_json(self), "cache": to_json(self.cache)}

    def changed(self, other: RunConfig) -> list[str]:
        """Settings that differ from `other`, the data path aside; inside a group of settings by their own
        name (`train.seed`)."""
        mine, theirs = self.to_json(), other.to_json()
        out = []
        for k in mine:
            if k == "data" or mine[k] == theirs.get(k):
                continue
            if isinstance(mine[k], dict) and isinstance(theirs.get(k), dict):
                out += [f"{k}.{n}" for n in sorted(mine[k].keys() | theirs[k].keys()) if mine[k].get(n) != theirs[k].get(n)]
            else:
                out.append(k)
        return sorted(out)


def write_run_config(folder: Path, config: RunConfig) -> None:
    write_json(folder / RUN_CONFIG, config.to_json())


def read_run_config(folder: Path) -> RunConfig:
    raw = read_json(folder / RUN_CONFIG, "the run's settings are missing; the folder is not a trained model")
    where = folder / RUN_CONFIG
    return from_json(RunConfig, {**raw, "cache": from_json(DataRef, raw.get("cache"), where)}, where)
