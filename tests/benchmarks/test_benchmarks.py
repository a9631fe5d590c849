"""The benchmarks run, at toy sizes on the CPU: a change of the library's API that breaks a benchmark fails
here, not at the next `make bench` (which is not part of CI). These tests time nothing and assert no
speed; they check that each benchmark runs on the real stages and that what it reports is well-formed."""

from __future__ import annotations

import math

import pytest

from benchmarks import fidelity, filters, reader, restart, storage, student_step, teacher
from benchmarks import tokenize as tokenize_bench
from pipeline.capture import CaptureConfig, capture
from pipeline.topk import TopKConfig


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4, head_chunk=32), batch_size=4))
    return out


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_teacher_benchmark_runs_the_stage_loop_and_the_transformers_twin(tokenizer):
    (row,) = teacher.run([("debug", 16, 2)], tokenizer, k=8)["rows"]
    assert all(positive(row[key]) for key in ("ours_e2e_tok_s", "ours_fwd_topk_tok_s", "hf_eager_tok_s"))


def test_student_step_benchmark_runs_every_mode():
    rows = student_step.run("debug", 256, 16, 2, 32)["rows"]
    assert {r["mode"] for r in rows} == set(student_step.MODES)
    assert all(positive(r["step_s"]) and positive(r["peak_mb"]) for r in rows), rows


def test_gpu_data_wait_check_trains_real_steps_from_the_reader():
    """gpu.sh's data-wait part at toy sizes: every step trains grad_accum micro-batches read by the reader."""
    import dataclasses

    import torch

    from benchmarks import gpu_checks

    sizes = dataclasses.replace(gpu_checks.TOY, steps=1, accum=2)
    out = gpu_checks.data_wait(sizes, torch.device("cpu"))
    assert [r["step"] for r in out["rows"]] == [0, 1]
    assert all(positive(r["step_s"]) and 0 <= r["wait_s"] < r["step_s"] for r in out["rows"]), out
    assert 0 <= out["wait_pct"] < 100


def test_reader_benchmark_reads_both_column_sets(cache):
    rows = reader.run(cache / "train", student_tok_s=1000.0, batch=2, seconds=0.2)["rows"]
    assert [r["columns"] for r in rows] == ["top-K + tail", "+ tail draws"]
    assert all(positive(r["tok_s"]) for r in rows), rows


def test_fidelity_benchmark_measures_every_setting(work, cache):
    rows = fidelity.run(work / "teacher", cache / "val", None, windows=4)["rows"]
    assert len(rows) > 1
    assert all(-1.0 <= r["cos_v2"] <= 1.0 and r["v2_B"] > 0 for r in rows), rows


def test_storage_benchmark_measures_every_setting_at_256k():
    result = storage.run(positions=128, cosine_positions=128)
    assert len(result["settings"]) == len(storage.setting_keys())
    assert all(r["v2_B"] < r["v1_B"] for r in result["settings"]), result["settings"]  # v2 is the smaller encoding


def test_tokenize_benchmark_runs_the_stage(tokenizer):
    (row,) = tokenize_bench.run(tokenizer, big_gb=0, workers=(1,))["stdlib"]
    assert row["tokens"] > 0 and positive(row["stage tok/s"]), row


def test_restart_benchmark_builds_a_cache_and_times_the_stage(tokenizer, tmp_path):
    result = restart.run(tokenizer, shards=40, seq_len=16, windows=2, root=tmp_path)
    assert result["shards"] == 40 and all(positive(r["seconds"]) for r in result["rows"]), result["rows"]
    rates = restart.verify_rates(tmp_path, windows=2, seq_len=16, topk=4, samples=2, vocab=512)
    assert all(positive(rates[k]) for k in ("footer_ms", "sha256_mb_s", "values_positions_s")), rates


def test_filters_benchmark_decides_the_planted_copies_within_its_budget():
    result = filters.run(documents=3000, unit_docs=500, memory_mb=0.05)
    assert result["partitions"] > 1 and result["records_held_max"] <= result["records_budget"]
    # every planted exact copy is dropped as exact; near copies as near (a few more near pairs may exist by chance)
    assert result["exact_dropped"] == result["exact_planted"] > 0, result
    assert result["near_dropped"] >= result["near_planted"] > 0, result
    assert positive(float(result["docs_per_s"]["partitions"])) and result["peak_partition_of_budget"] > 0
