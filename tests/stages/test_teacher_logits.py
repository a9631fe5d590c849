"""`python -m stages.teacher_logits` as users run it: killed and rerun, several processes, transformers'
own top-K, and one-line errors."""

from __future__ import annotations

import signal
import time

import pyarrow.parquet as pq
import pytest
import torch
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM

from tests.conftest import per_document_logprobs, trained_positions
from tests.stages.helpers import popen, same_files, stage, torchrun

ARGS = ("--topk", "8", "--samples", "4", "--batch-size", "1")


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
    assert same_files(out, reference) == []
    assert not list(out.rglob(".*tmp*"))


def test_two_processes_equal_one(work, reference, tmp_path):
    out = tmp_path / "logits"
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", out, *ARGS,
          launcher=torchrun(2))
    assert same_files(out, reference) == []


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
    stage("teacher_logits", "--teacher", tmp_path / "teacher", "--tokens", work / "tokens", "--cache", out, "--topk", "8")
    table = pq.read_table(out / "val" / "val-00000.parquet")
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
