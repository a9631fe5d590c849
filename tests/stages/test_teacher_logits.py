"""`python -m stages.teacher_logits` as users run it: killed and rerun, several processes, transformers'
own top-K, and one-line errors."""

from __future__ import annotations

import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import torch
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM

from pipeline.capture import DELAY_ENV, TIMEOUT_ENV
from pipeline.checkpoint import load_model, save_model
from schemas.manifest import read_manifest
from tests.conftest import per_document_logprobs, trained_positions
from tests.stages.helpers import ENV, ROOT, popen, same_files, stage, torchrun

ARGS = ("--topk", "8", "--samples", "4", "--batch-size", "1")


def same_cache(a, b) -> list[str]:
    """`same_files`, with the capture records compared without their mtime (the time a shard was written) and
    rank 0's plan of a multi-process run left out."""
    import json

    from schemas.manifest import RECORDS

    differ = []
    for name in same_files(a, b):
        if name == ".plan.json":
            continue
        if name.startswith(f"{RECORDS}/") and (a / name).is_file() and (b / name).is_file():
            x, y = (json.loads((f / name).read_text()) for f in (a, b))
            if {**x, "mtime_ns": 0} == {**y, "mtime_ns": 0}:
                continue
        differ.append(name)
    return differ


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "logits"
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out, *ARGS)
    return out


def test_killed_run_resumes_to_identical_files(work, reference, tmp_path):
    out = tmp_path / "logits"
    proc = popen("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out, *ARGS)
    deadline = time.time() + 120
    while not list((out / "train").glob("train-*.parquet")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(out.rglob("manifest.json")), "the run finished before it was killed; the test proves nothing"
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out, *ARGS)
    assert same_cache(out, reference) == []
    assert not list(out.rglob(".*tmp*"))


def test_two_processes_equal_one(work, reference, tmp_path):
    out = tmp_path / "logits"
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out, *ARGS,
          launcher=torchrun(2))
    assert same_cache(out, reference) == []


def test_transformers_saved_teacher_matches_transformers_topk(work, tmp_path):
    raw = {**__import__("json").loads((work / "teacher" / "config.json").read_text())}
    raw.pop("model_type"), raw.pop("architectures")
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(HFConfig(**raw, attn_implementation="eager")).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(5)
    hf.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.model").write_bytes((work / "teacher" / "tokenizer.model").read_bytes())
    out = tmp_path / "logits"
    stage("teacher_logits", "--teacher", tmp_path / "teacher", "--tokens", work / "tokens", "--cache", out, "--topk", "8",
          "--id-coding", "probability")  # stored most likely first, as transformers' topk returns them
    table = pq.read_table(out / "val" / read_manifest(out / "val", "logits").shards[0].file)
    ids = torch.tensor(table.column("input_ids").to_pylist())
    train = trained_positions(ids, torch.tensor(table.column("continued").to_pylist()))
    ref = per_document_logprobs(hf, ids).topk(8, -1)
    assert torch.equal(torch.tensor(table.column("topk_ids").to_pylist())[train], ref.indices.int()[train])


def test_errors_are_one_line_with_nonzero_exit(work, tmp_path):
    result = stage("teacher_logits", "--teacher", tmp_path / "none", "--tokens", work / "tokens", "--cache", tmp_path / "o",
                   check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tokenizer.model" in lines[0]


TIMEOUT_S = 3  # the collective timeout these tests give the process group
OLD_BARRIER = """
import time
from pipeline.runtime import Runtime
from stages.teacher_logits import collective_timeout
runtime = Runtime.from_env(timeout_s=collective_timeout())
if runtime.rank == 1:
    time.sleep(3 * collective_timeout())  # this rank's work outlasts the timeout
runtime.barrier()  # what the stage used to do at its end
"""


def _torchrun(args, env):
    return subprocess.run(torchrun(2) + args, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=600)


def test_the_old_end_barrier_fails_under_the_shortened_timeout(tmp_path):
    """The test's premise: with this timeout, a rank that waits in a barrier for a slower one is aborted."""
    script = tmp_path / "barrier.py"
    script.write_text(OLD_BARRIER)
    result = subprocess.run(torchrun(2)[:-1] + [str(script)], cwd=ROOT, env={**ENV, TIMEOUT_ENV: str(TIMEOUT_S)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and f"Timed out waiting {TIMEOUT_S * 1000}ms" in result.stderr


def test_a_rank_outlasting_the_collective_timeout_still_finishes(work, reference, tmp_path):
    """Rank 1 sleeps before each of its 7 shards, so it ends well over the timeout after rank 0: rank 0 waits on
    the filesystem, not in a collective, and the cache equals the one-process cache."""
    out = tmp_path / "logits"
    delay = 1.5
    start = time.monotonic()
    result = _torchrun(["stages.teacher_logits", "--teacher", str(work / "teacher"), "--tokens", str(work / "tokens"),
                        "--cache", str(out), *ARGS], {TIMEOUT_ENV: str(TIMEOUT_S), DELAY_ENV: f"1:{delay}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start > 7 * delay  # the delay really happened: the test proves something
    assert same_cache(out, reference) == []
    assert not list(out.glob(".rank-*"))


def test_float16_is_refused_in_one_line(work, tmp_path):
    result = stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache",
                   tmp_path / "o", "--dtype", "float16", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["error: --dtype float16: Gemma 2's activations overflow float16 (inf, "
                                                "then NaN logits); use bfloat16 or float32, or pass --allow-float16 to "
                                                "try anyway"]


def test_non_finite_teacher_is_one_line_naming_shard_and_window(work, tmp_path):
    teacher = load_model(work / "teacher")
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    save_model(teacher, tmp_path / "teacher", tokenizer=work / "teacher" / "tokenizer.model")
    out = tmp_path / "logits"
    result = stage("teacher_logits", "--teacher", tmp_path / "teacher", "--tokens", work / "tokens", "--cache", out,
                   *ARGS, check=False)
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("teacher-logits[")]  # progress
    first = read_manifest(work / "tokens" / "train", "tokens").shards[0].file
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {out / 'train' / first}: window ") and "logits are not finite" in lines[0]
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("manifest.json"))


def test_make_passes_temperature_and_the_cache_records_it(work, tmp_path):
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", "teacher-logits", "TEMPERATURE=2",
                             f"WORK={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    assert "-m stages.teacher_logits --work " in result.stdout and " --temperature 2 " in result.stdout + " "
    out = tmp_path / "logits"
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out,
          "--topk", "4", "--temperature", "2", "--cache-tokens", "1")
    assert read_manifest(out / "train", "logits").meta.temperature == 2.0
