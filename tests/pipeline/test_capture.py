"""Stage one's teacher pass: the cache contract, resumption, rank splitting and refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

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


def undelta(stored: np.ndarray) -> np.ndarray:
    """Delta-coded ids (first id, then gaps), summed back by hand along the last axis."""
    out = np.array(stored, dtype=np.int64)
    for j in range(1, out.shape[-1]):
        out[..., j] += out[..., j - 1]
    return out


def test_cache_columns_mean_what_the_contract_says(work, cache):
    """The raw columns, read with plain pyarrow and undone by hand (delta ids), against the teacher run on each
    document alone: the top K as a set with its log-probs, the exact tail, the label's log-prob and the entropy."""
    teacher = load_model(work / "teacher")
    manifest = read_manifest(cache / "train", "logits", verify_sha=True)
    shard = manifest.shards[1]
    meta = validate_logits_shard(cache / "train" / shard.file)
    assert (meta.topk, meta.samples, meta.seq_len) == (8, 6, 16)
    assert (meta.id_coding, meta.logprob_coding, meta.signals, meta.sampling) == ("delta", "float16", True, "iid")
    assert meta.source_shard == shard.file
    table = pq.read_table(cache / "train" / shard.file)
    ids = torch.tensor(table.column("input_ids").to_pylist())
    continued = torch.tensor(table.column("continued").to_pylist())
    train = trained_positions(ids, continued)
    assert continued.any() and (~train).any() and train.float().mean() > 0.8
    # The reference runs each document of a window alone (the teacher's attention is document-masked).
    ref_logp = per_document_logprobs(teacher, ids)
    ref_lp, ref_ids = ref_logp.topk(8, -1)
    got_ids = torch.tensor(undelta(np.array(table.column("topk_ids").to_pylist())))
    lp = torch.tensor(np.array(table.column("topk_logprobs").to_pylist(), dtype=np.float32))
    assert (got_ids[train].diff(dim=-1) > 0).all()  # ascending within a position
    order = ref_ids.argsort(-1)  # the reference's top K in id order, log-probs alongside
    assert torch.equal(got_ids[train], ref_ids.gather(-1, order)[train])
    assert torch.allclose(lp[train], ref_lp.gather(-1, order)[train], atol=2e-2)
    assert (got_ids[~train] == 0).all() and (lp[~train] == 0).all()  # stage one skips the head where nothing trains
    tail = torch.tensor(table.column("tail_mass").to_pylist())
    assert torch.allclose(tail[train], 1 - ref_lp[train].exp().sum(-1), atol=1e-5)
    label_lp = torch.tensor(np.array(table.column("label_logprob").to_pylist(), dtype=np.float32))
    entropy = torch.tensor(np.array(table.column("entropy").to_pylist(), dtype=np.float32))
    ref_label = ref_logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_entropy = -(ref_logp.exp() * ref_logp).sum(-1)
    assert torch.allclose(label_lp[train], ref_label[train], atol=2e-3, rtol=2e-3)  # float16
    assert torch.allclose(entropy[train], ref_entropy[train], atol=2e-3, rtol=2e-3)
    assert (label_lp[~train] == 0).all() and (entropy[~train] == 0).all()
    samples = table.column("sample_ids").to_pylist()
    counts = table.column("sample_counts").to_pylist()
    for w in range(len(samples)):
        for t in range(16):
            drawn = undelta(np.array(samples[w][t])).tolist() if samples[w][t] else []
            assert sum(counts[w][t]) == (6 if train[w, t] else 0)
            assert drawn == sorted(set(drawn)) and not set(drawn) & set(ref_ids[w, t].tolist())
    stats = manifest.stats
    assert 0 < stats.mean_tail_mass < 1 and stats.mean_teacher_entropy > 0
    assert stats.bytes_per_token == pytest.approx(sum(s.bytes for s in manifest.shards) / manifest.tokens)
    assert 0 < stats.target_bytes_per_token < stats.bytes_per_token
    assert (cache / "tokenizer.model").read_bytes() == (work / "teacher" / "tokenizer.model").read_bytes()


def test_manifest_statistics_and_histograms_match_the_shards(cache):
    """The teacher's mean loss and the selection histograms in the manifest, against the stored signals read
    back with plain pyarrow (trained positions: where the entropy is nonzero, as stage one stores zeros)."""
    from pipeline.select import HIST_STEP

    manifest = read_manifest(cache / "train", "logits")
    losses, window_means = [], []
    for shard in manifest.shards:
        table = pq.read_table(cache / "train" / shard.file)
        ids = torch.tensor(table.column("input_ids").to_pylist())
        train = trained_positions(ids, torch.tensor(table.column("continued").to_pylist())).numpy()
        loss = -np.array(table.column("label_logprob").to_pylist(), dtype=np.float32)
        losses.append(loss[train])
        window_means += [loss[w][train[w]].mean() for w in range(len(loss)) if train[w].any()]
    losses = np.concatenate(losses)
    stats = manifest.stats
    assert stats.positions == len(losses)
    assert stats.mean_teacher_loss == pytest.approx(losses.mean(), rel=1e-3)
    hist = stats.histograms
    assert hist["step"] == HIST_STEP
    assert sum(hist["position_loss"]) == len(losses) == sum(hist["position_entropy"])
    assert sum(hist["window_loss"]) == len(window_means)
    # Each bin holds the values in [b·step, (b+1)·step).
    for name, values in (("position_loss", losses), ("window_loss", np.array(window_means))):
        expected = np.bincount((values / HIST_STEP).astype(int), minlength=len(hist[name]))
        assert expected.tolist()[: len(hist[name])] == hist[name] and expected[len(hist[name]):].sum() == 0


@pytest.mark.parametrize("coding", ["probability", "ascending", "q8"])
def test_every_encoding_decodes_to_the_same_targets(work, cache, tmp_path, coding):
    """Other encodings of the same teacher: `decode` gives the same top K (as sets with their log-probs), tail,
    draws and signals as the default cache's; 8-bit log-probs within a step of the float16 ones, rescaled so
    that the top K and the exact tail mass sum to 1."""
    from dataclasses import replace

    from schemas.logits import decode

    cfg = replace(CFG, id_coding="ascending" if coding == "q8" else coding, logprob_coding="q8" if coding == "q8"
                  else "float16")
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, cfg)
    columns = ("label_mask", "topk_ids", "topk_logprobs", "tail_mass", "sample_ids", "sample_counts", "label_logprob",
               "entropy")
    name = read_manifest(cache / "val", "logits").shards[0].file
    got_meta = validate_logits_shard(out / "val" / name)
    ref_meta = validate_logits_shard(cache / "val" / name)
    got = decode(pq.read_table(out / "val" / name), columns, got_meta)
    ref = decode(pq.read_table(cache / "val" / name), columns, ref_meta)
    train = ref["label_mask"]

    def by_id(a):
        order = np.argsort(a["topk_ids"], -1, kind="stable")
        return np.take_along_axis(a["topk_ids"], order, -1), np.take_along_axis(a["topk_logprobs"], order, -1)

    (ids_g, lp_g), (ids_r, lp_r) = by_id(got), by_id(ref)
    assert np.array_equal(ids_g, ids_r)
    if coding == "q8":
        assert got_meta.logprob_step == 1 / 16
        assert np.abs(lp_g - lp_r)[train].max() <= 1 / 16 + 1e-3
        total = np.exp(lp_g.astype(np.float64)).sum(-1) + got["tail_mass"]
        assert np.abs(total[train] - 1).max() < 1e-5  # the tail is kept exact and the top K rescaled to it
        assert (lp_g[~train] == 0).all()
    else:
        assert np.array_equal(lp_g, lp_r)
    if coding == "probability":
        assert (np.diff(got["topk_logprobs"], axis=-1) <= 0).all()  # most likely first, as older caches
    for column in ("tail_mass", "sample_ids", "sample_counts", "label_logprob", "entropy"):
        assert np.array_equal(got[column], ref[column]), column


def test_decode_reads_the_metadata_as_plain_pyarrow_users_have_it(cache):
    """`decode(table, columns, json.loads(metadata[b"distill"]))` — the README's way — decodes the default
    delta-coded cache as the typed metadata does (a dict read as "no encoding" would give gaps, not ids)."""
    from schemas.logits import decode

    path = cache / "val" / read_manifest(cache / "val", "logits").shards[0].file
    table = pq.read_table(path)
    columns = ("topk_ids", "topk_logprobs", "tail_mass", "sample_ids")
    raw = json.loads(table.schema.metadata[b"distill"])
    assert raw["id_coding"] == "delta"
    got, ref = decode(table, columns, raw), decode(table, columns, validate_logits_shard(path))
    for column in columns:
        assert np.array_equal(got[column], ref[column]), column
    stored = np.array(table["topk_ids"][0][1].as_py())
    assert np.array_equal(np.cumsum(stored), ref["topk_ids"][0, 1])  # the README's plain-pyarrow decoding


def test_pure_sampling_cache_draws_from_the_whole_distribution(work, tmp_path):
    """K = 0: no top-K columns, tail mass 1 where a position trains, N draws (unique ids ascending, counts)
    whose frequencies over many draws follow the teacher's full distribution (run on each document alone)."""
    from dataclasses import replace

    from schemas.logits import decode

    n = 4000
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, replace(CFG, topk=TopKConfig(topk=0, samples=n, sampling="stratified"),
                                                            cache_tokens=1))
    name = read_manifest(out / "val", "logits").shards[0].file
    table = pq.read_table(out / "val" / name)
    assert "topk_ids" not in table.column_names and "topk_logprobs" not in table.column_names
    meta = validate_logits_shard(out / "val" / name)
    got = decode(table.slice(0, 2), ("input_ids", "label_mask", "topk_ids", "tail_mass", "sample_ids",
                                     "sample_counts"), meta)
    train = got["label_mask"]
    assert got["topk_ids"].shape == (2, 16, 0)
    assert (got["tail_mass"][train] == 1).all() and (got["tail_mass"][~train] == 0).all()
    ref = per_document_logprobs(load_model(work / "teacher"), torch.from_numpy(got["input_ids"].astype(np.int64)))
    for w, t in zip(*np.nonzero(train)):
        freq = np.zeros(ref.shape[-1])
        np.add.at(freq, got["sample_ids"][w, t], got["sample_counts"][w, t])  # padding: id 0, count 0
        assert freq.sum() == n
        p = ref[w, t].double().exp().numpy()
        se = np.sqrt(p * (1 - p) / n) + 1e-12
        assert (np.abs(freq / n - p) <= 5 * se + 1e-9).all()


def test_a_cache_preset_sets_defaults_that_flags_override(tmp_path):
    from pipeline.capture import CACHE_PRESETS
    from stages.teacher_logits import parse_with_preset

    compact = CACHE_PRESETS["compact"]
    args = parse_with_preset(["--cache-preset", "compact"])
    assert (args.topk, args.samples, args.id_coding, args.logprob_coding) == (
        compact["topk"], compact["samples"], compact["id_coding"], compact["logprob_coding"])
    assert parse_with_preset(["--cache-preset", "compact", "--samples", "7"]).samples == 7
    config = tmp_path / "c.toml"
    config.write_text("[teacher_logits]\ntopk = 32\nsamples = 4\ncache_preset = \"compact\"\n")
    args = parse_with_preset(["--config", str(config)])
    assert (args.topk, args.samples) == (compact["topk"], compact["samples"])  # the preset over the table's values
    assert parse_with_preset(["--config", str(config), "--topk", "2"]).topk == 2
    assert parse_with_preset([]).topk == 64 and parse_with_preset([]).cache_preset == "none"


def test_rerun_skips_complete_shards_and_redoes_the_rest(work, cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    names = [r.file for r in read_manifest(cache / "train", "logits").shards]
    victim = out / "train" / names[2]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated: must be redone
    (out / "val" / "manifest.json").unlink()
    kept = out / "train" / names[0]
    mtime = kept.stat().st_mtime_ns
    capture(work / "teacher", work / "tokens", out, CFG)
    assert kept.stat().st_mtime_ns == mtime
    for split in ("train", "val"):
        for path in (cache / split).iterdir():
            assert (out / split / path.name).read_bytes() == path.read_bytes(), path.name


def test_changed_settings_redo_shards(work, cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4), batch_size=5, overwrite=True))
    assert read_manifest(out / "train", "logits").meta.topk == 4


def test_batch_size_does_not_change_the_cache(work, cache, tmp_path):
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(CFG.topk, batch_size=7, background_writes=False))
    shard = read_manifest(cache / "train", "logits").shards[1].file
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


def test_shards_are_assigned_by_tokens():
    from pipeline.capture import assign_by_tokens

    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 8):
        tokens = [int(t) for t in rng.integers(1, 1000, size=37)]
        owners = assign_by_tokens(tokens, world)
        assert owners == assign_by_tokens(list(tokens), world)  # the same plan on every rank
        assert set(owners) <= set(range(world)) and len(owners) == len(tokens)
        load = [sum(t for t, o in zip(tokens, owners) if o == r) for r in range(world)]
        assert max(load) - min(load) <= max(tokens)  # ranks finish within one shard of each other
    # Round-robin would give rank 0 both large shards; by tokens, they go to different ranks.
    assert assign_by_tokens([100, 1, 100, 1], 2) in ([0, 1, 1, 0], [0, 0, 1, 1])
    assert assign_by_tokens([100, 1, 100, 1], 2)[0] != assign_by_tokens([100, 1, 100, 1], 2)[2]


def test_temperature_and_dtype_are_recorded(work, tmp_path):
    from dataclasses import replace

    from schemas.common import from_json
    from schemas.logits import LogitsMeta

    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, replace(CFG, topk=TopKConfig(topk=4, temperature=2.0)))
    manifest = read_manifest(out / "val", "logits")
    assert (manifest.meta.temperature, manifest.meta.capture_dtype) == (2.0, "float32")
    assert manifest.stats.positions > 0
    shard = validate_logits_shard(out / "val" / manifest.shards[0].file)
    assert (shard.temperature, shard.capture_dtype) == (2.0, "float32")
    # Older caches lack both fields: they read as τ = 1 and an unknown dtype.
    raw = {k: v for k, v in dataclasses.asdict(manifest.meta).items() if k not in ("temperature", "capture_dtype")}
    old = from_json(LogitsMeta, raw, "old")
    assert (old.temperature, old.capture_dtype) == (1.0, None)


def test_float16_is_refused_unless_forced(work, tmp_path):
    from dataclasses import replace

    with pytest.raises(PipelineError, match="--dtype float16: Gemma 2's activations overflow float16 .* pass "
                                            "--allow-float16"):
        capture(work / "teacher", work / "tokens", tmp_path / "out", replace(CFG, dtype="float16"))
    assert not (tmp_path / "out").exists()  # refused before anything is written
    forced = replace(CaptureConfig(TopKConfig(topk=4)), dtype="float16", allow_float16=True, cache_tokens=1)
    capture(work / "teacher", work / "tokens", tmp_path / "forced", forced)
    assert read_manifest(tmp_path / "forced" / "train", "logits").meta.capture_dtype == "float16"


def _nan_teacher(work, folder):
    """The debug teacher with a NaN in its final norm: every position's logits are NaN."""
    teacher = load_model(work / "teacher")
    with torch.no_grad():
        teacher.model.norm.weight[3] = float("nan")
    save_model(teacher, folder, tokenizer=work / "teacher" / "tokenizer.model")
    return folder


def test_non_finite_teacher_stops_before_the_shard_is_written(work, tmp_path):
    teacher = _nan_teacher(work, tmp_path / "teacher")
    out = tmp_path / "logits"
    name = read_manifest(work / "tokens" / "train", "tokens").shards[0].file  # the first shard processed
    table = pq.read_table(work / "tokens" / "train" / name)
    train = trained_positions(torch.tensor(table.column("input_ids").to_pylist()),
                              torch.tensor(table.column("continued").to_pylist()))
    row = int(train.any(1).int().argmax())  # the first window with a position that trains
    window, position = table.column("window")[row].as_py(), int(train[row].int().argmax())
    with pytest.raises(PipelineError) as e:
        capture(teacher, work / "tokens", out, CFG)
    message = str(e.value)
    assert message.startswith(f"{out / 'train' / name}: window {window}, position {position}: ")
    assert "not finite" in message and "\n" not in message
    assert not (out / "train" / name).exists() and not list(out.rglob(".*.tmp-*"))
    assert _no_manifest(out)


def opened_for_hashing(monkeypatch):
    """Names of the files that pipeline.fsutil opens (sha256_file is its only reader) from now on."""
    import builtins

    import pipeline.fsutil as fsutil

    names = []
    monkeypatch.setattr(fsutil, "open", lambda path, *a, **k: names.append(Path(path).name) or builtins.open(path, *a, **k),
                        raising=False)
    return names


def test_fingerprint_is_remembered_per_file_and_a_changed_file_is_detected(work, tmp_path, monkeypatch):
    import os

    import pipeline.fsutil as fsutil
    from pipeline.capture import HASH_CACHE
    from pipeline.checkpoint import model_fingerprint

    teacher = tmp_path / "teacher"
    shutil.copytree(work / "teacher", teacher)
    reference = model_fingerprint(teacher)  # plain sha256 of every file
    hashed = opened_for_hashing(monkeypatch)
    cached = fsutil.cached_sha256(tmp_path / "out" / HASH_CACHE)
    assert model_fingerprint(teacher, file_hash=cached) == reference and hashed == ["model.safetensors"]
    assert model_fingerprint(teacher, file_hash=fsutil.cached_sha256(tmp_path / "out" / HASH_CACHE)) == reference
    assert hashed == ["model.safetensors"]  # a restart: nothing hashed again
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, other content, a later mtime
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = model_fingerprint(teacher, file_hash=cached)
    assert len(hashed) == 2 and changed != reference
    (tmp_path / "out" / HASH_CACHE).write_text("{not json")  # a damaged cache is only a cache
    assert model_fingerprint(teacher, file_hash=cached) == changed == model_fingerprint(teacher)


def test_capture_restart_does_not_rehash_the_teacher(work, cache, tmp_path, monkeypatch):

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    hashed = opened_for_hashing(monkeypatch)
    capture(work / "teacher", work / "tokens", out, CFG)
    assert "model.safetensors" not in hashed  # the fixture's run remembered the teacher's hash beside the teacher
    assert hashed == []  # nor is any shard hashed again: the manifests stand on the writers' records
    for split in ("train", "val"):
        assert same_bytes(out / split, cache / split)


def same_bytes(a, b):
    return all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir())


def test_a_failed_rank_leaves_a_record_that_rank_0_reports(work, cache, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from pipeline.capture import failure_record
    from pipeline.runtime import Runtime

    teacher = _nan_teacher(work, tmp_path / "teacher")
    out = tmp_path / "logits"
    fast = replace(CFG, poll_s=0.01)
    # Both ranks of one run at once (rank 1 waits for rank 0's plan): rank 1's teacher gives NaNs, rank 0 finishes
    # its own shards, then reports rank 1's line instead of waiting.
    with ThreadPoolExecutor(1) as pool:
        one = pool.submit(capture, teacher, work / "tokens", out, fast, Runtime(rank=1, world=2), "run-a")
        with pytest.raises(PipelineError, match=r"^rank 1 failed: .*window \d+, position \d+: the teacher's logits "
                                                r"are not finite"):
            capture(work / "teacher", work / "tokens", out, fast, Runtime(rank=0, world=2), run="run-a")
        with pytest.raises(PipelineError, match="not finite"):
            one.result()
    record = json.loads(failure_record(out, 1).read_text())
    assert record["run"] == "run-a" and "not finite" in record["error"]
    assert _no_manifest(out)


def test_rank_0_ignores_an_older_runs_failure_and_cleans_every_stale_temporary(work, cache, tmp_path):
    """Rank 1's shards are already complete; a failure record of another run is stale; rank 0 removes the
    stale temporary files of every shard before it publishes the plan (no rank writes before that)."""
    from dataclasses import replace

    from pipeline.capture import assign_by_tokens, failure_record
    from pipeline.fsutil import write_json
    from pipeline.runtime import Runtime

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    shards = [(s, r) for s in ("train", "val") for r in read_manifest(work / "tokens" / s, "tokens").shards]
    owners = assign_by_tokens([r.tokens for _, r in shards], 2)
    mine = next(out / s / r.file for (s, r), o in zip(shards, owners) if o == 0)
    theirs = next(out / s / r.file for (s, r), o in zip(shards, owners) if o == 1)
    stale = [p.with_name(f".{p.name}.tmp-99999") for p in (mine, theirs)]
    for path in stale:
        path.write_bytes(b"partial")
    mine.unlink()  # rank 0 must redo this one
    write_json(failure_record(out, 1), {"run": "older", "error": "from another run"})
    manifests = capture(work / "teacher", work / "tokens", out, replace(CFG, poll_s=0.01), Runtime(rank=0, world=2),
                        run="run-b")
    assert manifests is not None and not failure_record(out, 1).exists()
    assert not stale[0].exists() and not stale[1].exists()
    for split in ("train", "val"):
        assert read_manifest(out / split, "logits", verify_sha=True).shards == read_manifest(cache / split, "logits").shards


def _nested(values, *sizes):
    import pyarrow as pa

    arr = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _draw_lists(values, counts, t, value_type):
    """Padded [rows, T, W] draws → fixed_size_list<list<…>>[T] of the drawn entries (count > 0)."""
    import pyarrow as pa

    width = values.shape[-1]
    lists = [[int(v) for v, c in zip(vs, cs) if c > 0]
             for vs, cs in zip(values.reshape(-1, width), counts.reshape(-1, width))]
    return pa.FixedSizeListArray.from_arrays(pa.array(lists, type=pa.list_(value_type)), t)


def write_v1_cache(cache, out):
    """A version 1 cache of the same targets, written by hand as the first release wrote it: window and
    input_ids only (no `continued`), ids most likely first, float16 log-probs, absolute draw ids, and metadata
    without any of the later fields."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 (pa.compute)

    from schemas.logits import decode

    v1_fields = ("kind", "seq_len", "vocab_size", "topk", "samples", "sample_seed", "tokenizer_fingerprint",
                 "teacher_fingerprint", "split", "corpus", "format")
    for split in ("train", "val"):
        manifest = json.loads((cache / split / "manifest.json").read_text())
        (out / split).mkdir(parents=True)
        for record in manifest["shards"]:
            path = cache / split / record["file"]
            meta = validate_logits_shard(path)
            table = pq.read_table(path)
            # Version 1 had no continued windows (every position but <bos>/<pad> labels trained): keep the others.
            table = table.filter(pa.compute.invert(table.column("continued")))
            a = decode(table, ("window", "input_ids", "topk_ids", "topk_logprobs", "tail_mass", "sample_ids",
                               "sample_counts"), meta)
            order = np.argsort(-a["topk_logprobs"], -1, kind="stable")
            ids, lp = np.take_along_axis(a["topk_ids"], order, -1), np.take_along_axis(a["topk_logprobs"], order, -1)
            t, k = meta.seq_len, meta.topk
            schema = pa.schema([
                pa.field("window", pa.int64(), nullable=False),
                pa.field("input_ids", pa.list_(pa.int32(), t + 1), nullable=False),
                pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k), t), nullable=False),
                pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), k), t), nullable=False),
                pa.field("tail_mass", pa.list_(pa.float32(), t), nullable=False),
                pa.field("sample_ids", pa.list_(pa.list_(pa.int32()), t), nullable=False),
                pa.field("sample_counts", pa.list_(pa.list_(pa.uint16()), t), nullable=False),
            ])
            raw = {key: getattr(meta, key) for key in v1_fields}
            raw.update(schema_version=1, source_shard=meta.source_shard, source_sha256=meta.source_sha256)
            table = pa.table([pa.array(a["window"]), _nested(a["input_ids"].astype(np.int32), t + 1),
                              _nested(ids.astype(np.int32), t, k), _nested(lp.astype(np.float16), t, k),
                              _nested(a["tail_mass"].astype(np.float32), t),
                              _draw_lists(a["sample_ids"], a["sample_counts"], t, pa.int32()),
                              _draw_lists(a["sample_counts"], a["sample_counts"], t, pa.uint16())],
                             schema=schema.with_metadata({b"distill": json.dumps(raw).encode()}))
            target = out / split / record["file"]
            pq.write_table(table, target)
            record["bytes"], record["sha256"] = target.stat().st_size, hashlib.sha256(target.read_bytes()).hexdigest()
            record["rows"], record["tokens"] = table.num_rows, table.num_rows * t
        manifest["rows"] = sum(r["rows"] for r in manifest["shards"])
        manifest["tokens"] = sum(r["tokens"] for r in manifest["shards"])
        manifest["meta"] = {key: manifest["meta"][key] for key in v1_fields} | {"schema_version": 1}
        manifest["stats"] = {key: manifest["stats"][key] for key in ("bytes_per_token", "mean_tail_mass",
                                                                      "mean_teacher_entropy")}
        (out / split / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(cache / "tokenizer.model", out / "tokenizer.model")


def test_a_v1_cache_still_verifies_and_trains(cache, tmp_path):
    """A version 1 cache (the first release's format, written by hand) passes `verify`, and a student trains
    from it with every KD target; `--select` is refused (no signals), in one line."""
    from pipeline.losses import LossConfig
    from pipeline.train import OptimConfig, TrainConfig, train
    from pipeline.verify import VerifyConfig, verify_cache

    v1 = tmp_path / "v1"
    write_v1_cache(cache, v1)
    meta = validate_logits_shard(v1 / "train" / read_manifest(v1 / "train", "logits").shards[0].file)
    assert (meta.schema_version, meta.id_coding, meta.signals) == (1, "probability", False)
    assert verify_cache(v1, VerifyConfig()).problems == []
    fast = TrainConfig(max_tokens=16 * 8 * 12, batch_size=8, save_every_minutes=0, log_every=1, eval_windows=16)
    for target in ("sampled", "tail", "renorm"):
        final = train(target, "debug", v1, tmp_path / target, LossConfig(target=target), OptimConfig(lr=1e-2), fast)
        losses = [json.loads(x)["loss"] for x in (tmp_path / target / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)]
        assert np.isfinite(final["val_ce"]) and losses[-1] < losses[0], target
    with pytest.raises(PipelineError, match=r"--select 'windows:loss:\.\.q0\.9' needs the teacher's label log-probs"):
        train("sel", "debug", v1, tmp_path / "sel", LossConfig(), OptimConfig(),
              dataclasses.replace(fast, select="windows:loss:..q0.9"))


def _flip_a_byte(path):
    """The same size, other bytes, a later mtime (as any rewrite gives)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_rerun_on_a_finished_cache_reads_and_stats_no_shard(work, cache, tmp_path, monkeypatch):
    """A finished cache: the rerun lists folders and changes nothing; no shard is opened, hashed or stat'ed
    (any of these would raise here), no teacher loaded, every manifest left as it was."""
    import os

    import pipeline.capture as capture_module
    import pipeline.fsutil as fsutil

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    before = {p: p.read_bytes() for p in out.glob("*/manifest.json")}
    shards = {str(p) for p in out.glob("*/*.parquet")}

    def refuse(*args, **kwargs):
        raise AssertionError(f"read shard data: {args[:1]}")

    real_stat = os.stat

    def stat(path, *args, **kwargs):
        assert str(path) not in shards, f"stat of {path}"
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(fsutil, "sha256_file", refuse)
    monkeypatch.setattr(capture_module, "sha256_file", refuse)
    monkeypatch.setattr(capture_module, "validate_logits_shard", refuse)
    monkeypatch.setattr(capture_module, "load_model", refuse)
    monkeypatch.setattr(capture_module.pq, "read_metadata", refuse)
    monkeypatch.setattr(capture_module.pq, "read_table", refuse)
    monkeypatch.setattr(os, "stat", stat)
    manifests = capture(work / "teacher", work / "tokens", out, CFG)
    monkeypatch.undo()
    assert manifests is not None and set(manifests) == {"train", "val"}
    assert {p: p.read_bytes() for p in out.glob("*/manifest.json")} == before


def test_a_shard_changed_after_capture_is_captured_again_never_reblessed(work, cache, tmp_path):
    """A shard whose bytes changed after its writer recorded them: `verify` names it even when its sample
    does not draw it; a rerun on the finished cache keeps the manifest's (the writer's) sha256; a rerun with
    work to do captures the shard again, byte-identical to the original."""
    from pipeline.verify import VerifyConfig, verify_cache

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    name = read_manifest(cache / "train", "logits").shards[1].file
    victim = out / "train" / name
    _flip_a_byte(victim)
    problems = verify_cache(out, VerifyConfig(sample="0")).problems
    assert problems == [f"{victim}: sha256 differs from the manifest's; the file changed after it was written: delete "
                        "it and rerun `make teacher-logits`"]
    capture(work / "teacher", work / "tokens", out, CFG)  # finished: nothing to do, nothing re-blessed
    assert (out / "train" / "manifest.json").read_bytes() == (cache / "train" / "manifest.json").read_bytes()
    with pytest.raises(PipelineError, match=f"{victim}: size or sha256 differs"):
        read_manifest(out / "train", "logits", verify_sha=True)
    (out / "val" / "manifest.json").unlink()  # work to do: the restart checks every shard against its record
    capture(work / "teacher", work / "tokens", out, CFG)
    assert victim.read_bytes() == (cache / "train" / name).read_bytes()
    for split in ("train", "val"):
        assert read_manifest(out / split, "logits", verify_sha=True) == read_manifest(cache / split, "logits")
    assert verify_cache(out, VerifyConfig(full=1)).problems == []


def test_a_shard_changed_during_the_run_stops_the_manifest_by_name(work, cache, tmp_path, monkeypatch):
    """At the end rank 0 checks the shards written in this run against their records: one changed since its
    writer recorded it stops the stage naming it, no manifest vouches for it, and its record is dropped (the
    next run captures it again)."""
    import pipeline.capture as capture_module

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    victim = out / "val" / read_manifest(cache / "val", "logits").shards[0].file
    victim.unlink()  # one shard to redo; it is damaged right after it is written
    real = capture_module._run_jobs

    def run_jobs(*args, **kwargs):
        real(*args, **kwargs)
        _flip_a_byte(victim)

    monkeypatch.setattr(capture_module, "_run_jobs", run_jobs)
    with pytest.raises(PipelineError, match=f"^{victim}: changed on disk after it was captured"):
        capture(work / "teacher", work / "tokens", out, CFG)
    monkeypatch.undo()
    assert not (out / "val" / "manifest.json").exists()
    capture(work / "teacher", work / "tokens", out, CFG)
    assert victim.read_bytes() == (cache / "val" / victim.name).read_bytes()


def test_stale_temporaries_are_found_with_one_listing_per_folder(work, cache, tmp_path, monkeypatch):
    """Temporary files that killed writers left (shards and records) are removed at the start, found by one
    listing of each folder: no glob, no listing per shard."""
    import os

    from schemas.manifest import RECORDS

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    (out / "val" / "manifest.json").unlink()
    names = [r.file for r in read_manifest(cache / "train", "logits").shards]
    stale = [out / "train" / f".{names[0]}.tmp-12345", out / "val" / f".{names[0]}.tmp-7",
             out / RECORDS / "train" / f".{names[1]}.0123456789abcdef.json.tmp-99"]
    for path in stale:
        path.write_bytes(b"partial")
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.path.relpath(path, out)) or real(path))
    monkeypatch.setattr(type(out), "glob", lambda *a, **k: pytest.fail("a glob"))
    capture(work / "teacher", work / "tokens", out, CFG)
    monkeypatch.undo()
    assert not any(path.exists() for path in stale)
    assert sorted(listed) == sorted(["train", "val", f"{RECORDS}/train", f"{RECORDS}/val"]), listed


def test_a_restart_plans_only_the_incomplete_shards_and_shares_them_out(work, cache, tmp_path, monkeypatch):
    """Two shards left, both of which rank 1 held in the first run's plan (a slow rank's backlog): the restart
    plans those two only, one for each rank, and the cache ends as the uninterrupted one."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    import pipeline.capture as capture_module
    from pipeline.capture import PLAN, assign_by_tokens
    from pipeline.runtime import Runtime

    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    shards = [(s, r) for s in ("train", "val") for r in read_manifest(work / "tokens" / s, "tokens").shards]
    owners = assign_by_tokens([r.tokens for _, r in shards], 2)
    backlog = [out / s / r.file for (s, r), owner in zip(shards, owners) if owner == 1][:2]
    for path in backlog:
        path.unlink()
    ran, real = {}, capture_module._run_jobs

    def run_jobs(teacher, jobs, cfg, runtime, *args):
        ran[runtime.rank] = [j.target for j in jobs]
        real(teacher, jobs, cfg, runtime, *args)

    monkeypatch.setattr(capture_module, "_run_jobs", run_jobs)
    fast = replace(CFG, poll_s=0.01)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(capture, work / "teacher", work / "tokens", out, fast, Runtime(rank=1, world=2), "run-c")
        capture(work / "teacher", work / "tokens", out, fast, Runtime(rank=0, world=2), run="run-c")
        other.result()
    assert len(json.loads((out / PLAN).read_text())["todo"]) == 2
    assert sorted(ran[0] + ran[1]) == sorted(backlog) and len(ran[0]) == len(ran[1]) == 1
    for split in ("train", "val"):
        assert read_manifest(out / split, "logits", verify_sha=True).shards == read_manifest(cache / split, "logits").shards
