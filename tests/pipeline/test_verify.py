"""`verify`: a sound cache passes; each kind of damage is one line naming the file (and window); the teacher
re-run tells the same teacher from another one, another dtype and shifted labels."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file
from pipeline.topk import TopKConfig
from pipeline.verify import VerifyConfig, check_same_cache, verify_cache
from schemas.logits import decode
from schemas.manifest import read_manifest
from tests.conftest import trained_positions

CFG = CaptureConfig(TopKConfig(topk=8, samples=6, head_chunk=24), batch_size=3)


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "logits"
    capture(work / "teacher", work / "tokens", out, CFG)
    return out


@pytest.fixture(scope="module")
def other_teacher(work, tmp_path_factory):
    """Another random debug teacher with the same tokenizer and shapes."""
    folder = tmp_path_factory.mktemp("other") / "teacher"
    model = load_model(work / "teacher")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, folder, tokenizer=work / "teacher" / "tokenizer.model")
    return folder


@pytest.fixture
def copy(cache, tmp_path):
    out = tmp_path / "logits"
    shutil.copytree(cache, out)
    return out


def shard(cache, split="train", index=1):
    return cache / split / read_manifest(cache / split, "logits").shards[index].file


def rewrite(path, edit):
    """Rewrites one shard with `edit(rows)` applied to its rows (python lists), keeping its schema and
    metadata, and updates the manifest's size and sha256: only the values are wrong afterwards."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    manifest_path = path.parent / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    for record in raw["shards"]:
        if record["file"] == path.name:
            record["bytes"], record["sha256"] = path.stat().st_size, sha256_file(path)
    manifest_path.write_text(json.dumps(raw))


def positions(path, label_in_top_k=None):
    """(row, trained position, untrained position) of a row that has both, and its window id; with
    `label_in_top_k`, a trained position whose label is (or is not) among its top-K ids (undone by hand from
    the delta coding)."""
    table = pq.read_table(path, columns=["window", "input_ids", "continued", "topk_ids"])
    ids = torch.tensor(table.column("input_ids").to_pylist())
    train = trained_positions(ids, torch.tensor(table.column("continued").to_pylist()))
    top = torch.tensor(table.column("topk_ids").to_pylist()).cumsum(-1)  # delta coding: first id, then gaps
    wanted = train
    if label_in_top_k is not None:
        has = (top == ids[:, 1:, None]).any(-1)
        wanted = train & (has if label_in_top_k else ~has)
    row = int(((~train).any(1) & wanted.any(1)).int().argmax())
    t_on, t_off = int(wanted[row].int().argmax()), int((~train[row]).int().argmax())
    assert wanted[row, t_on] and not train[row, t_off]
    return row, t_on, t_off, table.column("window")[row].as_py()


def test_a_sound_cache_passes(work, cache):
    report = verify_cache(cache, VerifyConfig())
    assert report.problems == []
    manifests = [read_manifest(cache / s, "logits") for s in ("train", "val")]
    assert report.shards == sum(len(m.shards) for m in manifests)
    assert report.rows == sum(m.rows for m in manifests)
    assert report.positions == sum(m.stats.positions for m in manifests)
    assert "sound" in report.summary(cache)


def _set(rows, row, t, column, index, value):
    rows[row][column][t][index] = value


# Damage to the stored values of the default encoding (delta-coded ids: the first id, then the gaps).
VALUE_DAMAGE = {
    "top-K ids not ascending": lambda r, i, t, u: _set(r, i, t, "topk_ids", 1, -1),
    "tail mass outside [0, 1]": lambda r, i, t, u: r[i]["tail_mass"].__setitem__(t, 1.5),
    "Σ exp(top-K log-probs) + tail mass ≠ 1 beyond their rounding":
        lambda r, i, t, u: r[i]["tail_mass"].__setitem__(t, r[i]["tail_mass"][t] * 0.5 + 0.01),
    "log-probs above 0": lambda r, i, t, u: _set(r, i, t, "topk_logprobs", 0, 0.5),
    "non-finite log-probs or tail mass": lambda r, i, t, u: _set(r, i, t, "topk_logprobs", 3, float("nan")),
    "top-K ids outside the vocabulary": lambda r, i, t, u: _set(r, i, t, "topk_ids", 7, 10**6),
    "a top-K id repeated within the position": lambda r, i, t, u: _set(r, i, t, "topk_ids", 1, 0),
    "targets at a position that does not train (stage one stores zeros there)":
        lambda r, i, t, u: _set(r, i, u, "topk_ids", 0, 5),
    "a tail draw inside the top K": lambda r, i, t, u: (r[i]["sample_ids"].__setitem__(t, [r[i]["topk_ids"][t][0]]),
                                                         r[i]["sample_counts"].__setitem__(t, [6])),
    "tail draw counts not summing to N = 6 (0 where nothing trains or no tail)":
        lambda r, i, t, u: _set(r, i, t, "sample_counts", 0, r[i]["sample_counts"][t][0] + 1),
    "draw ids not unique and ascending": lambda r, i, t, u: (r[i]["sample_ids"].__setitem__(t, [7, -2]),
                                                              r[i]["sample_counts"].__setitem__(t, [3, 3])),
    "label log-prob above 0": lambda r, i, t, u: r[i]["label_logprob"].__setitem__(t, 0.25),
    "entropy outside the bounds its top K and tail mass allow": lambda r, i, t, u: r[i]["entropy"].__setitem__(t, 40.0),
    "signals at a position that does not train (stage one stores zeros there)":
        lambda r, i, t, u: r[i]["entropy"].__setitem__(u, 1.0),
    "non-finite label log-prob or entropy": lambda r, i, t, u: r[i]["entropy"].__setitem__(t, float("inf")),
}
# Damage that needs a position whose label is in its top K (True) or outside it (False).
LABEL_DAMAGE = {
    "label log-prob unlike its top-K entry (targets shifted against their labels?)":
        (True, lambda r, i, t, u: r[i]["label_logprob"].__setitem__(t, r[i]["label_logprob"][t] - 0.5)),
    "label outside the top K more likely than the K-th id or than the tail mass":
        (False, lambda r, i, t, u: r[i]["label_logprob"].__setitem__(t, -0.01)),
}


@pytest.mark.parametrize("what", list(VALUE_DAMAGE) + list(LABEL_DAMAGE))
def test_each_broken_invariant_is_one_line_naming_file_window_and_position(copy, what):
    path = shard(copy)
    in_top_k, damage = LABEL_DAMAGE.get(what, (None, VALUE_DAMAGE.get(what)))
    row, t_on, t_off, window = positions(path, in_top_k)
    rewrite(path, lambda rows: damage(rows, row, t_on, t_off))
    problems = verify_cache(copy, VerifyConfig()).problems
    position = t_off if "does not train" in what else t_on
    assert f"{path}: 1 position(s) with {what}; first: window {window}, position {position}" in problems, problems
    assert all(line.startswith(str(path)) for line in problems), problems  # nothing else is blamed


def test_file_damage_is_named(work, cache, copy, tmp_path):
    flipped, missing = shard(copy, "train", 0), shard(copy, "val", 0)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing.unlink()
    (copy / "tokenizer.model").unlink()
    problems = verify_cache(copy, VerifyConfig()).problems
    assert f"{flipped}: sha256 differs from the manifest's; the file changed after it was written: delete it and " \
           "rerun `make teacher-logits`" in problems
    assert f"{missing}: listed in the manifest but missing; rerun `make teacher-logits`" in problems
    assert any(line.startswith(f"{copy / 'tokenizer.model'}: missing") for line in problems)
    assert len(problems) == 3, problems


def test_a_shard_from_another_run_and_repeated_windows(work, copy, tmp_path):
    other = tmp_path / "other"
    capture(work / "teacher", work / "tokens", other, dataclasses.replace(CFG, topk=TopKConfig(topk=4)))
    foreign = shard(copy, "train", 2)
    shutil.copy(shard(other, "train", 2), foreign)
    rewrite(foreign, lambda rows: None)  # the manifest's size and sha256 now match the foreign file
    repeated = shard(copy, "train", 3)
    first_window = pq.read_table(shard(copy, "train", 0), columns=["window"]).column("window")[0].as_py()
    rewrite(repeated, lambda rows: rows[0].__setitem__("window", first_window))
    problems = verify_cache(copy, VerifyConfig()).problems
    assert any(line.startswith(f"{foreign}: metadata differs from the manifest's (topk 4 vs 8") for line in problems)
    assert f"{copy / 'train'}: 1 window id(s) appear more than once (first: window {first_window}); the split " \
           "mixes two caches" in problems, problems


def test_val_from_another_teacher_is_refused(work, cache, other_teacher, copy, tmp_path):
    other = tmp_path / "other"
    capture(other_teacher, work / "tokens", other, CFG)
    shutil.rmtree(copy / "val")
    shutil.copytree(other / "val", copy / "val")
    problems = verify_cache(copy, VerifyConfig()).problems
    assert len(problems) == 1 and "the val split was made by another teacher than the train split " \
                                  "(teacher_fingerprint" in problems[0], problems


def test_check_same_cache(cache, work):
    train, val = (read_manifest(cache / s, "logits").meta for s in ("train", "val"))
    check_same_cache(train, val, cache)
    for change in ({"teacher_fingerprint": "f" * 64}, {"temperature": 2.0}, {"topk": 4}, {"capture_dtype": "bfloat16"}):
        with pytest.raises(PipelineError, match=r"^x: the val split was made by .* than the train split \(" +
                                                next(iter(change))):
            check_same_cache(train, dataclasses.replace(val, **change), "x")
    tokens_train, tokens_val = (read_manifest(work / "tokens" / s, "tokens").meta for s in ("train", "val"))
    check_same_cache(tokens_train, tokens_val, "tokens")
    with pytest.raises(PipelineError, match="other settings than the train split \\(tokenizer_fingerprint"):
        check_same_cache(tokens_train, dataclasses.replace(tokens_val, tokenizer_fingerprint="0" * 64), "tokens")
    with pytest.raises(PipelineError, match="the train split holds logits shards, the val split tokens shards"):
        check_same_cache(train, tokens_val, "x")


# --- the teacher re-run ---------------------------------------------------------------------------------


def rerun(cache, teacher, **kw):
    return verify_cache(cache, VerifyConfig(windows=6, **kw), teacher, torch.device("cpu"))


def test_rerun_of_the_same_teacher_matches_exactly(work, cache, copy):
    report = rerun(cache, work / "teacher")
    assert report.problems == [] and report.rechecked == 6 and report.max_diff == 0.0
    # Run-to-run noise: other batch and head-chunk shapes than stage one's stay far below the tolerance.
    for split in ("train", "val"):
        raw = json.loads((copy / split / "manifest.json").read_text())
        raw["stats"]["capture_config"].update(batch_size=1, topk={**raw["stats"]["capture_config"]["topk"],
                                                                  "head_chunk": 5})
        (copy / split / "manifest.json").write_text(json.dumps(raw))
    report = rerun(copy, work / "teacher", tolerance=1e-5)
    assert report.problems == [] and report.max_diff < 1e-5


def test_rerun_catches_another_teacher(cache, other_teacher):
    report = rerun(cache, other_teacher)
    assert report.problems[0].startswith(f"{other_teacher}: teacher fingerprint ")
    windows = [p for p in report.problems[1:] if "the re-run teacher differs from the cache" in p]
    assert len(windows) == 6 and report.max_diff > 0.1, report.problems


def test_rerun_catches_a_dtype_drift(work, cache):
    report = rerun(cache, work / "teacher", dtype="bfloat16")
    assert report.problems and all("the re-run teacher differs" in p for p in report.problems)
    assert report.max_diff > 1e-2  # bfloat16 against the float32 capture: ten times the tolerance and more


def test_rerun_catches_shifted_labels(work, copy):
    """Targets one position late (position t holds t+1's): the invariants may still hold, the re-run does not."""
    targets = ("topk_ids", "topk_logprobs", "tail_mass", "sample_ids", "sample_counts")
    paths = [copy / s / r.file for s in ("train", "val") for r in read_manifest(copy / s, "logits").shards]

    def shift(rows):
        for row in rows:
            for name in targets:
                row[name] = row[name][1:] + row[name][:1]

    for path in paths:
        rewrite(path, shift)
    report = rerun(copy, work / "teacher")
    reruns = [p for p in report.problems if "the re-run teacher differs from the cache" in p]
    assert len(reruns) == 6 and report.max_diff > 0.1, report.problems


def test_rerun_needs_the_teacher(cache, tmp_path):
    with pytest.raises(PipelineError, match="--windows 6 re-runs the teacher, and this is not a Hugging Face Gemma 2 "
                                            "directory; pass --teacher"):
        rerun(cache, tmp_path / "none")


def test_value_checks_are_vectorised_over_row_groups(cache):
    """The checks see whole [rows, T] arrays (no per-position loop): one call covers a row group."""
    from pipeline.verify import value_checks

    path = shard(cache)
    meta = read_manifest(cache / "train", "logits").meta
    arrays = decode(pq.read_table(path), ("window", "input_ids", "label_mask", "topk_ids", "topk_logprobs",
                                          "tail_mass", "sample_ids", "sample_counts", "label_logprob", "entropy"), meta)
    checks = value_checks(arrays, meta)
    assert all(mask.shape == arrays["tail_mass"].shape and not mask.any() for mask in checks.values())


@pytest.mark.parametrize("preset", ["q8", "pure sampling"])
def test_other_encodings_pass_and_rerun_exactly(work, tmp_path, preset):
    """8-bit log-probs (ascending ids) and a pure-sampling cache (K = 0): sound, and the same teacher re-run
    matches them exactly once rounded as they store it; another dtype still shows."""
    settings = ({"logprob_coding": "q8", "id_coding": "ascending"} if preset == "q8" else
                {"topk": TopKConfig(topk=0, samples=20)})
    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, dataclasses.replace(CFG, **settings))
    assert verify_cache(out, VerifyConfig()).problems == []
    report = rerun(out, work / "teacher")
    assert report.problems == [] and report.rechecked == 6 and report.max_diff == 0.0
    drift = rerun(out, work / "teacher", dtype="bfloat16")
    assert drift.problems and drift.max_diff > 1e-2


def test_rerun_compares_the_signals_too(work, copy):
    """Entropies off by 0.1 nats, everything else intact: only the re-run can tell (the top K agree)."""
    paths = [copy / s / r.file for s in ("train", "val") for r in read_manifest(copy / s, "logits").shards]

    def nudge(rows):
        for row in rows:
            row["entropy"] = [e + 0.1 if e else e for e in row["entropy"]]

    for path in paths:
        rewrite(path, nudge)
    report = rerun(copy, work / "teacher")
    reruns = [p for p in report.problems if "the re-run teacher differs from the cache" in p]
    assert len(reruns) == 6 and 0.09 < report.max_diff < 0.2, report.problems


def _damage_keeping_size_and_mtime(path):
    """Other bytes, the same size and nanosecond mtime: only a sha256 of the file can tell."""
    import os

    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_sample_is_seeded_and_full_checks_every_shard(cache, copy):
    """Every footer is checked; sha256 and values on VERIFY_SAMPLE shards (a count or a fraction) drawn by the
    seed, on all with VERIFY_FULL. Damage that keeps size and mtime is found exactly when its shard is drawn."""
    import math

    from pipeline.verify import pick_shards

    total = sum(len(read_manifest(cache / s, "logits").shards) for s in ("train", "val"))
    for cfg, deep in ((VerifyConfig(sample="2", seed=1), 2), (VerifyConfig(sample="0.5"), math.ceil(total / 2)),
                      (VerifyConfig(sample="0", full=1), total), (VerifyConfig(sample="0"), 0)):
        report = verify_cache(cache, cfg)
        assert report.problems == [] and (report.footers, report.shards) == (total, deep), cfg
    assert pick_shards(total, "3", 7) == pick_shards(total, "3", 7) and len(pick_shards(total, "3", 7)) == 3
    assert len({frozenset(pick_shards(total, "3", seed)) for seed in range(10)}) > 1
    victim = shard(copy, "train", 1)  # the second shard in manifest order (train first)
    _damage_keeping_size_and_mtime(victim)
    named = f"{victim}: sha256 differs from the manifest's; the file changed after it was written: delete it and " \
            "rerun `make teacher-logits`"
    drawn = next(seed for seed in range(100) if 1 in pick_shards(total, "2", seed))
    missed = next(seed for seed in range(100) if 1 not in pick_shards(total, "2", seed))
    assert verify_cache(copy, VerifyConfig(sample="2", seed=drawn)).problems == [named]
    assert verify_cache(copy, VerifyConfig(sample="2", seed=missed)).problems == []
    assert verify_cache(copy, VerifyConfig(sample="0", full=1)).problems == [named]
    for bad in ("x", "1.5", "-1", "2.5e3", "nan"):
        with pytest.raises(PipelineError, match=f"--sample '{bad}' \\(VERIFY_SAMPLE\\): a count of shards"):
            VerifyConfig(sample=bad)


def test_a_shard_changed_since_its_capture_record_is_always_checked(copy):
    """A shard rewritten after its writer recorded it (new mtime) is hashed whatever the sample; a manifest
    whose sha256 is not the writer's is named too."""
    victim = shard(copy, "val", 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_cache(copy, VerifyConfig(sample="0")).problems == [
        f"{victim}: sha256 differs from the manifest's; the file changed after it was written: delete it and rerun "
        "`make teacher-logits`"]
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))  # the original bytes again (a later mtime: hashed, and found sound)
    edited = shard(copy, "train", 0)
    rewrite(edited, lambda rows: None)  # other bytes (pyarrow's writer), and the manifest edited to vouch for them
    problems = verify_cache(copy, VerifyConfig(sample="0")).problems
    assert len(problems) == 1 and problems[0].startswith(f"{edited}: the manifest's sha256 is not the one its writer "
                                                         "recorded"), problems


def test_ranks_split_the_shards_and_rank_0_reports_for_all(cache, copy):
    """Two ranks (threads here; processes under LAUNCH): each checks its own shards, rank 0's report holds
    both, and damage in a shard of rank 1 is named by rank 0."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.capture import assign_by_tokens
    from pipeline.runtime import Runtime

    records = [(s, r) for s in ("train", "val") for r in read_manifest(copy / s, "logits").shards]
    owners = assign_by_tokens([r.bytes for _, r in records], 2)
    split, record = next(x for x, owner in zip(records, owners) if owner == 1)
    victim = copy / split / record.file
    _damage_keeping_size_and_mtime(victim)
    cfg = VerifyConfig(full=1, poll_s=0.01)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(verify_cache, copy, cfg, runtime=Runtime(rank=1, world=2), run="r")
        report = verify_cache(copy, cfg, runtime=Runtime(rank=0, world=2), run="r")
        mine = other.result()
    assert (report.footers, report.shards) == (len(records), len(records) - 1)
    assert 0 < mine.footers < len(records)
    assert report.problems == [f"{victim}: sha256 differs from the manifest's; the file changed after it was written: "
                               "delete it and rerun `make teacher-logits`"]
