"""All stages in a row on a tiny corpus with the `debug` preset, as the Makefile chains them; final
losses are compared with a golden file (set UPDATE_GOLDEN=1 to rewrite it after an intended change) and the
distilled student must beat its from-scratch twin."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from schemas.manifest import read_manifest
from tests.stages.helpers import ROOT, stage

GOLDEN = ROOT / "tests" / "assets" / "e2e_losses.json"
TRAIN = ("--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "3", "--precision", "fp32", "--eval-every", "10")
# Students at a gentler rate: at 1e-2 thirty steps of a debug student are chaotic (val CE over seeds 1.58-1.82,
# KD behind CE at one seed), so the last bits in which AVX2 and AVX-512 kernels differ grew to 0.05 nats.
STUDENT = ("--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32", "--eval-every", "10")


@pytest.mark.slow
def test_all_stages_chain(corpus_dir, tmp_path):
    work = tmp_path / "run"
    stage("tokenize", "--work", work, "--corpus", corpus_dir, "--vocab", "400", "--seq-len", "16", "--val-fraction", "0.2",
          "--shard-windows", "40")
    stage("teacher", "--tokens", work / "tokens", "--teacher", work / "teacher", "--preset", "debug", "--max-tokens", 16 * 8 * 150,
          *TRAIN)
    stage("teacher_logits", "--teacher", work / "teacher", "--tokens", work / "tokens", "--cache", work / "logits",
          "--topk", "8", "--samples", "4")
    for loss in ("kd", "ce"):
        stage("train_student", "--cache", work / "logits", "--students", work / "students", "--student", f"s-{loss}=debug",
              "--loss", loss, "--max-tokens", 16 * 8 * 30, *STUDENT)
    stage("train_student", "--cache", work / "logits", "--students", work / "students", "--student", "s-kd2=debug",
          "--init-from", work / "students" / "s-kd", "--seed", "2", "--max-tokens", 16 * 8 * 5, *STUDENT)
    stage("merge", "--inputs", work / "students" / "s-kd", work / "students" / "s-kd2", "--out", work / "students" / "merged")
    report = stage("report", "--work", work).stdout
    assert "Distilled vs from scratch" in report and "## Model merging" in report
    summary = json.loads((work / "report" / "summary.json").read_text())
    names = {m["name"]: m for m in summary["models"]}
    assert set(names) == {"teacher", "s-kd", "s-ce", "s-kd2", "merged"}
    for m in summary["models"]:
        assert {"name", "parameters", "loss_mode", "cache_mode", "training_tokens", "val_ce", "val_ppl", "kl_to_teacher",
                "top1_agreement", "ece", "wall_s"} <= set(m)
    assert (work / "report" / "val_loss.png").stat().st_size > 1000
    first_val = work / "logits" / "val" / read_manifest(work / "logits" / "val", "logits").shards[0].file
    shown = stage("inspect", first_val, "--row", "1", "--pos", "3").stdout
    assert "teacher top-K" in shown and "tail mass outside the top 8" in shown
    assert pq.read_table(first_val).num_rows > 0
    assert "teacher top-K" in stage("inspect", "--work", work, "--row", "0").stdout  # default: the cache's first val shard

    losses = {name: round(names[name]["val_ce"], 4) for name in ("teacher", "s-kd", "s-ce")}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(losses, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for name, value in golden.items():
        # The golden is AVX-512's. Measured spread over kernel sets (ATEN_CPU_CAPABILITY unset = avx512, avx2,
        # default = scalar): teacher 0.5151-0.5202, s-kd 3.0308-3.0394, s-ce 3.1146 in all three. The tolerance
        # is over twice the widest, and well inside the KD-vs-CE gap below, so erasing the gap cannot pass.
        assert losses[name] == pytest.approx(value, abs=0.02), name
    # What the pipeline is for: on the same windows and budget, the distilled student beats its twin (by
    # 0.075-0.084 on the three kernel sets).
    assert losses["s-kd"] < losses["s-ce"] - 0.04
    # Rerunning a finished chain does no work and changes nothing.
    again = stage("train_student", "--cache", work / "logits", "--students", work / "students", "--student", "s-kd=debug",
                  "--loss", "kd", "--max-tokens", 16 * 8 * 30, *STUDENT).stdout
    assert "already complete" in again
