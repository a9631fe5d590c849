"""Stage one's teacher pass: the cache contract, resumption, rank splitting and refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.model import Gemma2, preset
from pipeline.tokenizer import Tokenizer
from pipeline.topk import TopKConfig
from schemas.logits import validate_logits_shard
from schemas.manifest import read_manifest
from tests.conftest import CORPUS_TEXTS, per_document_logprobs, trained_positions

CFG = CaptureConfig(TopKConfig(topk=8, samples=6, head_chunk=24), batch_size=3)


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "logits"
    capture(work / "teacher", work / "tokens", out, CFG)
    return out


def test_cache_columns_mean_what_the_contract_says(work, cache):
    teacher = load_model(work / "teacher")
    manifest = read_manifest(cache / "train", "logits", verify_sha=True)
    shard = manifest.shards[1]
    meta = validate_logits_shard(cache / "train" / shard.file)
    assert (meta.topk, meta.samples, meta.seq_len) == (8, 6, 16)
    assert meta.source_shard == shard.file
    table = pq.read_table(cache / "train" / shard.file)
    ids = torch.tensor(table.column("input_ids").to_pylist())
    continued = torch.tensor(table.column("continued").to_pylist())
    train = trained_positions(ids, continued)
    assert continued.any() and (~train).any() and train.float().mean() > 0.8
    # The reference runs each document of a window alone (the teacher's attention is document-masked).
    ref_lp, ref_ids = per_document_logprobs(teacher, ids).topk(8, -1)
    got_ids = torch.tensor(table.column("topk_ids").to_pylist())
    assert torch.equal(got_ids[train], ref_ids.int()[train])
    assert (got_ids[~train] == 0).all()  # stage one skips the head where nothing trains
    lp = torch.tensor(np.array(table.column("topk_logprobs").to_pylist(), dtype=np.float32))
    assert torch.allclose(lp[train], ref_lp[train], atol=2e-2)
    tail = torch.tensor(table.column("tail_mass").to_pylist())
    assert torch.allclose(tail[train], 1 - ref_lp[train].exp().sum(-1), atol=1e-5)
    samples = table.column("sample_ids").to_pylist()
    counts = table.column("sample_counts").to_pylist()
    for w in range(len(samples)):
        for t in range(16):
            assert sum(counts[w][t]) == (6 if train[w, t] else 0)
            assert not set(samples[w][t]) & set(ref_ids[w, t].tolist())
    stats = manifest.stats
    assert 0 < stats.mean_tail_mass < 1 and stats.mean_teacher_entropy > 0
    assert stats.bytes_per_token == pytest.approx(sum(s.bytes for s in manifest.shards) / manifest.tokens)
    assert (cache / "tokenizer.model").read_bytes() == (work / "teacher" / "tokenizer.model").read_bytes()


def test_rerun_skips_complete_shards_and_redoes_the_rest(work, cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    victim = out / "train" / "train-00002.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated: must be redone
    (out / "val" / "manifest.json").unlink()
    kept = out / "train" / "train-00000.parquet"
    mtime = kept.stat().st_mtime_ns
    capture(work / "teacher", work / "tokens", out, CFG)
    assert kept.stat().st_mtime_ns == mtime
    for split in ("train", "val"):
        for path in (cache / split).iterdir():
            assert (out / split / path.name).read_bytes() == path.read_bytes(), path.name


def test_changed_settings_redo_shards(work, cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4), batch_size=5))
    assert read_manifest(out / "train", "logits").meta.topk == 4


def test_batch_size_does_not_change_the_cache(work, cache, tmp_path):
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(CFG.topk, batch_size=7, background_writes=False))
    shard = "train-00001.parquet"
    a, b = pq.read_table(out / "train" / shard), pq.read_table(cache / "train" / shard)
    for col in ("topk_ids", "sample_ids", "sample_counts", "input_ids"):
        assert a.column(col).equals(b.column(col))


def _no_manifest(out):
    return not list(out.rglob("manifest.json"))


def test_tokenizer_mismatch(work, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(work / "teacher", teacher)
    Tokenizer.train(CORPUS_TEXTS[:60], vocab_size=400).save(teacher / "tokenizer.model")
    with pytest.raises(PipelineError, match=r"made with tokenizer [0-9a-f]{16}…, the teacher's .* is [0-9a-f]{16}…; rerun `make tokens TOKENIZER="):
        capture(teacher, work / "tokens", tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()


def test_ids_beyond_teacher_vocab(work, tmp_path):
    small = Gemma2(preset("debug", vocab_size=100))
    small.init_weights(0)
    save_model(small, tmp_path / "teacher", tokenizer=work / "teacher" / "tokenizer.model")
    with pytest.raises(PipelineError, match="is not below the teacher's vocab_size 100"):
        capture(tmp_path / "teacher", work / "tokens", tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()


def test_missing_teacher_files(work, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(work / "teacher", teacher)
    (teacher / "tokenizer.model").unlink()
    with pytest.raises(PipelineError, match="has no tokenizer.model"):
        capture(teacher, work / "tokens", tmp_path / "out", CFG)
    shutil.copy(work / "teacher" / "tokenizer.model", teacher)
    (teacher / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="no model.safetensors"):
        capture(teacher, work / "tokens", tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists() or _no_manifest(tmp_path / "out")


def test_missing_tokens(work, tmp_path):
    with pytest.raises(PipelineError, match="run `make tokens` first"):
        capture(work / "teacher", tmp_path / "nothing", tmp_path / "out", CFG)
