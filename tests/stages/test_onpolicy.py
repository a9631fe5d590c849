"""`python -m stages.onpolicy`: R rounds of rollouts → teacher-logits → train-student from an outside
(transformers-made) student; each round samples with the previous round's student and records its lineage;
a rerun skips finished steps and redoes only what is missing, to the same weights."""

from __future__ import annotations

import json
import shutil

from schemas.manifest import read_manifest
from tests.pipeline.test_rollouts import make_student, write_prompts
from tests.stages.helpers import stage

ARGS = ("--rollouts-per-prompt", "2", "--max-new-tokens", "8", "--seq-len", "64", "--topk", "8", "--max-tokens", "512")


def test_two_rounds_chain_lineage_and_resume(tmp_path, tokenizer):
    make_student(tmp_path / "student", tokenizer, seed=0)
    make_student(tmp_path / "teacher", tokenizer, seed=1)
    write_prompts(tmp_path / "prompts.jsonl")
    run = ("onpolicy", "--work", tmp_path, "--model", tmp_path / "student", "--teacher", tmp_path / "teacher",
           "--prompts", tmp_path / "prompts.jsonl", "--rounds", "2", *ARGS)
    out = stage(*run)
    summary = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"round"')]
    assert [s["onpolicy_round"] for s in summary] == [1, 2]
    rounds = tmp_path / "onpolicy"
    r1, r2 = (read_manifest(rounds / f"round-{r}" / "logits" / "train", "logits").meta.rollouts for r in (1, 2))
    assert (r1["model"], r1["model_round"], r1["round"], r1["seed"]) == (str(tmp_path / "student"), 0, 1, 0)
    assert (r2["model"], r2["model_round"], r2["round"], r2["seed"]) == (str(rounds / "round-1" / "student"), 1, 2, 1)
    weights = (rounds / "round-2" / "student" / "model.safetensors").read_bytes()

    # Killed after round 2's rollouts: its cache and student are gone; round 1 and the rollouts are kept.
    shutil.rmtree(rounds / "round-2" / "student")
    (rounds / "round-2" / "logits" / "train" / "manifest.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in [*(rounds / "round-1").rglob("*"), *(rounds / "round-2" / "rollouts").rglob(
        "*.parquet")] if p.is_file()}
    out = stage(*run)
    assert "round 1/2: " in out.stdout and "is finished; skipped" in out.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (rounds / "round-2" / "student" / "model.safetensors").read_bytes() == weights


def test_missing_model_is_one_line(tmp_path):
    result = stage("onpolicy", "--work", tmp_path, "--model", tmp_path / "none", "--prompts", tmp_path / "p.jsonl",
                   check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no config.json" in lines[0]
