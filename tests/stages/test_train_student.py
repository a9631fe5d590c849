"""`python -m stages.train_student` as users run it: killed and resumed to the same weights, two DDP
processes equal to one, mismatches refused with one line."""

from __future__ import annotations

import json
import shutil
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.capture import CaptureConfig, capture
from pipeline.fsutil import sha256_file
from pipeline.topk import TopKConfig
from pipeline.train import OptimConfig, TrainConfig, grad_accum_for, lr_at
from stages import train_student
from stages._cli import build, parse
from tests.stages.helpers import ROOT, popen, stage, torchrun

COMMON = ("--student", "debug", "--lr", "1e-2", "--warmup-steps", "3", "--log-every", "1")


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4)))
    return out


def weights(folder):
    return load_file(folder / "model.safetensors")


def checkpoint_step(out):
    pointer = out / "checkpoint" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else -1


def test_killed_run_resumes_to_the_same_weights(cache, tmp_path):
    args = ("--cache", cache, *COMMON, "--max-tokens", 16 * 4 * 150, "--batch-size", 4, "--save-every", 1)
    stage("train_student", "--students", tmp_path / "whole", *args)
    proc = popen("train_student", "--students", tmp_path / "killed", *args)
    out = tmp_path / "killed" / "debug"
    deadline = time.time() + 120
    while time.time() < deadline and checkpoint_step(out) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "finished.json").exists(), "the run finished before it was killed; the test proves nothing"
    assert 3 <= checkpoint_step(out) < 150
    stage("train_student", "--students", tmp_path / "killed", *args)  # --resume is the default
    a, b = weights(tmp_path / "whole" / "debug"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest.json", "step-00000150"]


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


def test_a_cache_with_nan_stops_in_one_line_and_nothing_looks_finished(cache, tmp_path):
    """A corrupt cache (NaN teacher log-probs in every train window) skips steps, then stops."""
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    records = []
    manifest = json.loads((bad / "train" / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = bad / "train" / shard["file"]
        table = pq.read_table(path)
        lp = table.column("topk_logprobs").combine_chunks()
        flat = lp.flatten().flatten()
        nan = pa.array(np.full(len(flat), np.nan, dtype=np.float16))
        poisoned = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(nan, lp.type.value_type.list_size),
                                                     lp.type.list_size)
        table = table.set_column(table.schema.get_field_index("topk_logprobs"), table.schema.field("topk_logprobs"),
                                 poisoned)
        pq.write_table(table, path)
        records.append({**shard, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest["shards"] = records
    (bad / "train" / "manifest.json").write_text(json.dumps(manifest))
    result = stage("train_student", "--cache", bad, "--students", tmp_path / "s", *COMMON, "--max-tokens", 16 * 8 * 20,
                   "--batch-size", 8, "--max-bad-steps", 2, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: debug: 2 steps in a row had a non-finite loss") and "no checkpoint" in last
    out = tmp_path / "s" / "debug"
    assert not (out / "finished.json").exists() and not (out / "config.json").exists()
    assert not (out / "checkpoint").exists()


def test_report_skips_and_merge_refuses_an_unfinished_student(cache, tmp_path):
    students = tmp_path / "students"
    for name in ("a", "b"):
        stage("train_student", "--cache", cache, "--students", students, "--student", f"{name}=debug", *COMMON[2:],
              "--max-tokens", 16 * 8 * 3, "--batch-size", 8)
    (students / "b" / "finished.json").unlink()  # as if killed between the export and the marker
    report = stage("report", "--cache", cache, "--teacher", tmp_path / "none", "--students", students,
                   "--report", tmp_path / "report")
    assert "skipping" in report.stderr and "b: its training has not finished" in report.stderr
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["models"]
    assert [r["name"] for r in rows] == ["a"]
    merged = stage("merge", "--inputs", students / "a", students / "b", "--out", tmp_path / "m", check=False)
    assert merged.returncode == 2 and merged.stderr.count("\n") == 1
    assert "b: its training has not finished" in merged.stderr and not (tmp_path / "m").exists()


@pytest.mark.parametrize(("recipe", "sharding"), [("gemma-2-2b", "ddp"), ("gemma-2-9b", "fsdp")])
def test_recipes_resolve_on_any_gpu_count_and_scale_with_the_run(recipe, sharding):
    args = parse(train_student.parser(), ["--config", str(ROOT / "configs" / f"{recipe}.toml")])
    cfg, optim = build(TrainConfig, args), build(OptimConfig, args)
    assert (cfg.sharding, cfg.precision, cfg.gradient_checkpointing) == (sharding, "bf16", True)
    assert cfg.save_every_minutes > 0 and cfg.eval_windows > 0 and optim.warmup_fraction > 0
    for gpus in (1, 2, 4, 8, 16, 32):  # the global batch in tokens stays exact; accumulation adapts
        assert grad_accum_for(cfg, gpus, 4096) * cfg.batch_size * gpus * 4096 == cfg.batch_tokens
    for tokens in (cfg.max_tokens, cfg.max_tokens // 10):  # warm-up and cosine scale with the run's length
        total = tokens // cfg.batch_tokens
        lrs = [lr_at(s, total, optim) for s in range(total)]
        peak = lrs.index(max(lrs))
        assert peak + 1 == max(1, round(optim.warmup_fraction * total)) and max(lrs) == pytest.approx(optim.lr)
        assert lrs[-1] == pytest.approx(optim.lr * optim.min_lr_ratio, rel=1e-3)
