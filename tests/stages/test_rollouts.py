"""`python -m stages.rollouts` then `python -m stages.teacher_logits --tokens <rollouts>` as users run them:
the teacher pass accepts a train-only folder, carries `behaviour_logprob` through unchanged, always writes
the signals and records which model sampled. With the sampling model itself as the teacher, the teacher's
`label_logprob` (this pipeline's model) must equal the behaviour log-probs (transformers' generate)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.logits import decode, validate_logits_shard
from schemas.manifest import read_manifest
from tests.pipeline.test_rollouts import make_student, write_prompts
from tests.stages.helpers import stage

ARGS = ("--rollouts-per-prompt", "2", "--max-new-tokens", "8", "--seq-len", "64", "--batch-size", "4")


@pytest.fixture(scope="module")
def rolled(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rollout-stage")
    make_student(root / "student", tokenizer)
    write_prompts(root / "prompts.jsonl")
    out = stage("rollouts", "--work", root, "--model", root / "student", "--prompts", root / "prompts.jsonl", *ARGS)
    return root, json.loads(out.stdout.strip().splitlines()[-1])


def test_teacher_logits_on_rollouts_carries_behaviour_and_names_the_sampler(rolled):
    root, summary = rolled
    assert summary["windows"] == 12 and summary["round"] == 1 and not (root / "rollouts" / "val").exists()
    stage("teacher_logits", "--work", root, "--teacher", root / "student", "--tokens", root / "rollouts",
          "--cache", root / "cache", "--topk", "8", "--batch-size", "4")
    tokens = read_manifest(root / "rollouts" / "train", "tokens")
    cache = read_manifest(root / "cache" / "train", "logits")
    assert cache.meta.rollouts == tokens.meta.rollouts and cache.meta.signals
    assert cache.meta.rollouts["model_fingerprint"] == summary["model_fingerprint"]
    assert not (root / "cache" / "val" / "manifest.json").exists()
    for shard in cache.shards:
        meta = validate_logits_shard(root / "cache" / "train" / shard.file)
        got = pq.read_table(root / "cache" / "train" / shard.file)
        src = pq.read_table(root / "rollouts" / "train" / meta.source_shard)
        assert got.column("behaviour_logprob").equals(src.column("behaviour_logprob"))
        cols = decode(got, ("behaviour_logprob", "label_logprob", "label_mask", "loss_mask"), meta)
        mask = cols["label_mask"]
        assert mask.sum() == cols["loss_mask"].sum() > 0  # the head ran at every generated position
        np.testing.assert_allclose(cols["label_logprob"][mask], cols["behaviour_logprob"][mask], atol=1e-2)
        assert (cols["label_logprob"][~mask] == 0).all()
    # `make verify` takes a train-only cache of rollouts as whole (it has no val split to miss).
    out = stage("verify", "--work", root, "--cache", root / "cache", "--teacher", root / "student", check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rerun_is_a_no_op_and_errors_are_one_line(rolled, tmp_path):
    root, _ = rolled
    before = {p.name: p.stat().st_mtime_ns for p in (root / "rollouts" / "train").glob("*")}
    stage("rollouts", "--work", root, "--model", root / "student", "--prompts", root / "prompts.jsonl", *ARGS)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "rollouts" / "train").glob("*")} == before
    for args, needle in (((), "--model and --prompts are required"),
                         (("--model", tmp_path / "none", "--prompts", root / "prompts.jsonl"), "not a directory"),
                         (("--model", root / "student", "--prompts", tmp_path / "none.jsonl"), "no such prompts file"),
                         (("--model", root / "student", "--prompts", root / "prompts.jsonl", "--engine", "vllm"),
                          "ENGINE=vllm")):
        result = stage("rollouts", "--work", tmp_path, *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            result.stderr
