"""`make demo`'s step runner: `--set` overrides reach their stage, and a step can keep its own settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from stages import demo


def run_steps(monkeypatch, overrides: list[str], **call) -> list[str]:
    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    step = demo.Steps(Path("runs/x"), Path("configs/demo.toml"), demo.parse_overrides(overrides))
    step("title", "teacher_logits", "--cache", "c", **call)
    return seen[0]


def test_overrides_reach_their_stage(monkeypatch):
    cmd = run_steps(monkeypatch, ["teacher_logits.topk=32", "teacher_logits.head_chunk=64"])
    assert cmd[-4:] == ["--topk", "32", "--head-chunk", "64"]


def test_the_compact_step_keeps_its_preset_against_overrides(monkeypatch):
    """`make demo TOPK=32` must not turn the compact cache into K 32: the preset's flags are kept."""
    keep = frozenset(f"--{k.replace('_', '-')}" for k in demo.CACHE_PRESETS["compact"])
    cmd = run_steps(monkeypatch, ["teacher_logits.topk=32", "teacher_logits.head_chunk=64"], keep=keep)
    assert "--topk" not in cmd and cmd[-2:] == ["--head-chunk", "64"]


def test_an_unknown_override_is_refused():
    with pytest.raises(PipelineError, match="stage teacher_logits has no setting 'top_kk'"):
        demo.parse_overrides(["teacher_logits.top_kk=3"])
