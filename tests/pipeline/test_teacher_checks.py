"""What a new user with an outside teacher hit first (issue 22 bugs 1, 2, 3, 4, 7, 9, 10): each refusal or
message names the real problem and the real fix."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import cache_fingerprint
from pipeline.errors import PipelineError
from pipeline.losses import LossConfig
from pipeline.report import markdown
from pipeline.topk import TopKConfig
from pipeline.train import FINISHED, OptimConfig, TrainConfig, cache_note, train
from schemas.manifest import read_manifest

CFG = CaptureConfig(TopKConfig(topk=8, samples=0, head_chunk=64), batch_size=8)
FAST = TrainConfig(max_tokens=16 * 8 * 4, batch_size=8, save_every=1000, save_every_minutes=0, log_every=5,
                   eval_windows=8)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1)


def _teacher_with(work, tmp_path, **config):
    """A copy of the test teacher whose config.json has these fields changed."""
    teacher = tmp_path / "teacher"
    shutil.copytree(work / "teacher", teacher)
    raw = json.loads((teacher / "config.json").read_text())
    raw.update(config)
    (teacher / "config.json").write_text(json.dumps(raw))
    return teacher


def test_seq_len_beyond_the_teachers_positions_is_refused(work, tmp_path):
    """Bug 1: SEQ_LEN 16 against max_position_embeddings 8 was accepted (exit 0)."""
    teacher = _teacher_with(work, tmp_path, max_position_embeddings=8)
    with pytest.raises(PipelineError, match=r"SEQ_LEN 16 exceeds the teacher's max_position_embeddings 8.*SEQ_LEN=8"):
        capture(teacher, work / "tokens", tmp_path / "logits", CFG)
    assert not (tmp_path / "logits" / "train" / "manifest.json").exists()


def test_a_teacher_vocabulary_larger_than_the_tokenizer_is_refused(work, tmp_path):
    """Bug 7: ids the tokenizer has no piece for would be cached silently."""
    pieces = json.loads((work / "teacher" / "config.json").read_text())["vocab_size"]
    teacher = _teacher_with(work, tmp_path, vocab_size=pieces + 64)
    with pytest.raises(PipelineError, match=rf"vocab_size {pieces + 64} exceeds the {pieces} pieces"):
        capture(teacher, work / "tokens", tmp_path / "logits", CFG)


def test_a_missing_teacher_directory_is_named_as_missing(work, tmp_path):
    """Bug 4: a nonexistent TEACHER said the directory 'has no tokenizer.model'."""
    with pytest.raises(PipelineError, match="no such teacher directory") as e:
        capture(tmp_path / "nope", work / "tokens", tmp_path / "logits", CFG)
    assert "tokenizer.model" not in str(e.value).split(";")[0]


def test_cache_tokens_says_it_rounds_to_whole_shards(work, tmp_path, capsys):
    """Bug 9: CACHE_TOKENS=30000 cached 140,800 tokens without a word."""
    assert "rounded up to whole token shards" in CaptureConfig.__dataclass_fields__["cache_tokens"].metadata["help"]
    manifests = capture(work / "teacher", work / "tokens", tmp_path / "logits",
                        CaptureConfig(TopKConfig(topk=4, head_chunk=64), batch_size=8, cache_tokens=30))
    err = capsys.readouterr().err
    cached = manifests["train"].tokens
    assert cached > 30 and f"CACHE_TOKENS=30: caching {cached:,} train tokens" in err and "whole token shard" in err


@pytest.fixture(scope="module")
def finished(work, tmp_path_factory):
    """A cache and a student trained on it."""
    root = tmp_path_factory.mktemp("identity")
    capture(work / "teacher", work / "tokens", root / "logits", CFG)
    train("s", "debug", root / "logits", root / "students" / "s", LossConfig(target="tail"), OPTIM, FAST)
    return root


def test_a_finished_cache_with_other_settings_is_never_replaced_silently(finished, work):
    """Bug 2: TOPK=16 over a finished TOPK=32 cache recaptured it all; the students trained on it then pointed
    at a cache that was not theirs."""
    cache = finished / "logits"
    before = cache_fingerprint(cache)
    other = CaptureConfig(TopKConfig(topk=4, samples=0, head_chunk=64), batch_size=8)
    with pytest.raises(PipelineError, match=r"other settings.*topk 8 -> 4.*CACHE=.*--overwrite"):
        capture(work / "teacher", work / "tokens", cache, other)
    assert cache_fingerprint(cache) == before and read_manifest(cache / "train", "logits").meta.topk == 8
    capture(work / "teacher", work / "tokens", cache, CFG)  # the same settings: fine, nothing changes
    assert cache_fingerprint(cache) == before


def test_students_say_when_their_cache_was_replaced_or_is_gone(finished, work, tmp_path, capsys):
    student = finished / "students" / "s"
    recorded = json.loads((student / FINISHED).read_text())["cache"]
    assert recorded["fingerprint"] == cache_fingerprint(finished / "logits")
    assert cache_note(student) is None
    moved = tmp_path / "logits"
    shutil.copytree(finished / "logits", moved)
    capture(work / "teacher", work / "tokens", finished / "logits",
            CaptureConfig(TopKConfig(topk=4, samples=0, head_chunk=64), batch_size=8, overwrite=True))
    assert "was replaced" in cache_note(student)
    row = {"name": "s", "parameters": 1, "loss_mode": "kd", "cache_mode": "tail", "training_tokens": 1,
           "val_ce": 1.0, "val_ppl": 2.7, "kl_to_teacher": 0.1, "top1_agreement": 0.5, "ece": 0.01, "wall_s": 1.0,
           "student": "debug", "cache_note": cache_note(student)}
    text = markdown([row], read_manifest(moved / "train", "logits"), {}, "test")
    assert "## Students whose cache is gone or was replaced" in text and "s: the cache it was trained on" in text
    shutil.rmtree(finished / "logits")
    assert "is gone" in cache_note(student)
    shutil.copytree(moved, finished / "logits")  # the cache it was trained on, back: nothing to say
    assert cache_note(student) is None
    train("s", "debug", finished / "logits", student, LossConfig(target="tail"), OPTIM, FAST)
    assert "replaced" not in capsys.readouterr().err


def test_changed_settings_name_real_flags(finished):
    """Bug 3: the refusal recommended `--out`, which train-student does not have."""
    with pytest.raises(PipelineError, match="a run with other settings") as e:
        train("s", "debug", finished / "logits", finished / "students" / "s", LossConfig(target="tail"),
              OptimConfig(lr=5e-3, warmup_steps=1), FAST)
    assert "--out" not in str(e.value) and "--students" in str(e.value) and "--no-resume" in str(e.value)


def test_no_empty_distilled_vs_scratch_section(finished):
    """Bug 10: the report printed the heading with nothing under it when no student had a CE twin."""
    kd = {"name": "s-kd", "parameters": 1, "loss_mode": "kd", "cache_mode": "tail", "training_tokens": 8,
          "val_ce": 1.0, "val_ppl": 2.7, "kl_to_teacher": 0.1, "top1_agreement": 0.5, "ece": 0.01, "wall_s": 1.0,
          "student": "debug", "seed": 0, "lr": 0.01}
    manifest = read_manifest(finished / "logits" / "train", "logits")
    assert "Distilled vs" not in markdown([kd], manifest, {}, "test")
    ce = {**kd, "name": "s-ce", "loss_mode": "ce", "cache_mode": "-", "val_ppl": 3.0}
    assert "## Distilled vs from scratch" in markdown([kd, ce], manifest, {}, "test")
