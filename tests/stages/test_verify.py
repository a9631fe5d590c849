"""`make verify` as users run it: one summary line for a sound cache; one line per problem and a non-zero exit
for a damaged one; one line for bad input."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipeline.capture import CaptureConfig, capture
from pipeline.topk import TopKConfig
from schemas.manifest import read_manifest
from tests.stages.helpers import ENV, ROOT, stage


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage-verify") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4), batch_size=4))
    return out


def make(*args: str) -> subprocess.CompletedProcess:
    """`make` from the repository root; the venv counts as installed (-o: never rebuilt by a test)."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_make_verify_with_windows_prints_one_summary_line(work, cache, tmp_path):
    result = make("verify", f"WORK={tmp_path}", f"CACHE={cache}", f"TEACHER={work / 'teacher'}", "VERIFY_WINDOWS=3")
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if not ln.startswith(".venv/bin/python")]
    assert len(lines) == 1 and lines[0].startswith(f"{cache}: sound — ") and "re-ran 3 window(s)" in lines[0]


def test_damaged_cache_one_line_per_problem_and_nonzero_exit(cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    names = [r.file for r in read_manifest(out / "train", "logits").shards]
    for name in names[:2]:
        path = out / "train" / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    result = stage("verify", "--cache", out, check=False)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[:2] == [f"{out / 'train' / n}: sha256 differs from the manifest's; the file changed after it was "
                         "written: delete it and rerun `make teacher-logits`" for n in names[:2]]
    assert lines[2:] == [f"error: {out}: 2 problem(s), listed above; the cache is not sound"]


def test_bad_input_is_one_line(cache, tmp_path):
    result = stage("verify", "--cache", tmp_path / "none", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no such cache folder; pass --cache (CACHE=…) or run `make teacher-logits`"]
    result = stage("verify", "--cache", cache, "--windows", "2", "--teacher", tmp_path / "none", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--windows 2 re-runs the teacher" in lines[0]


def test_make_verify_sample_and_full(cache, tmp_path):
    """VERIFY_SAMPLE and VERIFY_FULL reach the stage: every footer, then sha256 and values on 2 shards, or all."""
    total = sum(len(read_manifest(cache / s, "logits").shards) for s in ("train", "val"))
    for settings, deep in ((["VERIFY_SAMPLE=2"], 2), (["VERIFY_SAMPLE=0", "VERIFY_FULL=1"], total)):
        result = make("verify", f"WORK={tmp_path}", f"CACHE={cache}", *settings)
        assert result.returncode == 0, result.stderr
        line = result.stdout.splitlines()[-1]
        assert line.startswith(f"{cache}: sound — {total} shards match their manifests") and f"; {deep} of them" in line
