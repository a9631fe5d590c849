"""`python -m stages.train_student` as users run it: killed and resumed to the same weights, two DDP
processes equal to one, mismatches refused with one line."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.capture import CaptureConfig, capture
from pipeline.topk import TopKConfig
from tests.stages.helpers import popen, stage, torchrun

COMMON = ("--student", "debug", "--lr", "1e-2", "--warmup-steps", "3", "--log-every", "1")


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4)))
    return out


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights(cache, tmp_path):
    args = ("--cache", cache, *COMMON, "--max-tokens", 16 * 4 * 150, "--batch-size", 4, "--save-every", 1)
    stage("train_student", "--students", tmp_path / "whole", *args)
    proc = popen("train_student", "--students", tmp_path / "killed", *args)
    state = tmp_path / "killed" / "debug" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())
    assert not killed_at["done"], "the run finished before it was killed; the test proves nothing"
    stage("train_student", "--students", tmp_path / "killed", *args)  # --resume is the default
    a, b = weights(tmp_path / "whole" / "debug"), weights(tmp_path / "killed" / "debug")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "debug" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_two_ddp_processes_match_one_at_the_same_global_batch(cache, tmp_path):
    args = ("--cache", cache, *COMMON, "--max-tokens", 16 * 8 * 12, "--precision", "fp32")
    stage("train_student", "--students", tmp_path / "one", *args, "--batch-size", 8)
    stage("train_student", "--students", tmp_path / "two", *args, "--batch-size", 4, launcher=torchrun(2))
    a, b = weights(tmp_path / "one" / "debug"), weights(tmp_path / "two" / "debug")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4
    assert json.loads((tmp_path / "two" / "debug" / "run_config.json").read_text())["world_size"] == 2


def test_several_students_from_one_cache(cache, tmp_path):
    out = stage("train_student", "--cache", cache, "--students", tmp_path, "--student", "a=debug", "--student", "b=debug",
                "--seed", "1", "--max-tokens", 16 * 8 * 5, "--batch-size", 8).stdout
    assert [json.loads(x)["student"] for x in out.splitlines() if x.startswith("{")] == ["a", "b"]
    assert (tmp_path / "a" / "config.json").is_file() and (tmp_path / "b" / "config.json").is_file()


def test_mismatch_is_one_line(cache, tmp_path):
    bad = stage("train_student", "--cache", tmp_path / "nothing", "--students", tmp_path / "o", "--student", "debug",
                "--max-tokens", "100", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "make tokens" in bad.stderr
    bad = stage("train_student", "--cache", cache, "--students", tmp_path / "o", "--student", "gemma-2-2B", "--max-tokens", "100",
                check=False)
    assert bad.returncode == 2 and "valid presets" in bad.stderr
