"""Training from the cache: students learn, save in the HF format, and refuse mismatched caches; the
evaluation metrics agree with direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Gemma2ForCausalLM

from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import load_model
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.losses import LossConfig
from pipeline.model import Gemma2, preset
from pipeline.tokenizer import Tokenizer
from pipeline.topk import TopKConfig
from pipeline.train import OptimConfig, TrainConfig, lr_at, train
from tests.conftest import CORPUS_TEXTS, per_document_logprobs, tiny_config, trained_positions

FAST = TrainConfig(max_tokens=16 * 8 * 40, batch_size=8, save_every=1000, log_every=5)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=5)


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4)))
    return out


def untrained_metrics(cfg, cache):
    model = Gemma2(cfg)
    model.init_weights(0)
    return evaluate(model, cache / "val")


def test_two_student_sizes_learn_from_the_cache(cache, tmp_path):
    small = preset("debug", vocab_size=400)
    bigger = tiny_config(vocab_size=400, hidden_size=64, num_hidden_layers=2, sliding_window=8)
    (tmp_path / "bigger.json").write_text(json.dumps(bigger.to_hf()))
    for name, spec, cfg in (("small", "debug", small), ("bigger", str(tmp_path / "bigger.json"), bigger)):
        final = train(name, spec, cache, tmp_path / name, LossConfig(target="tail"), OPTIM, FAST)
        before = untrained_metrics(cfg, cache)
        assert final["val_ce"] < before["val_ce"] - 0.5
        assert final["kl_to_teacher"] < before["kl_to_teacher"] / 2
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in lines if "loss" in x]
        assert losses[-1] < losses[0]
        assert lines[-1]["eval"] == "final"


def test_cache_modes_all_learn_and_the_tail_keeps_the_student_calibrated(cache, tmp_path):
    """Every mode learns the task; renormalising the top-K drops the tail and leaves the student far
    from the teacher's distribution (the bias RS-KD measured), the tail bucket and tail draws do not."""
    before = untrained_metrics(preset("debug", vocab_size=400), cache)
    finals = {t: train(t, "debug", cache, tmp_path / t, LossConfig(target=t), OPTIM, FAST) for t in ("tail", "renorm", "sampled")}
    for final in finals.values():
        assert final["val_ce"] < before["val_ce"] - 0.2
    assert finals["tail"]["kl_to_teacher"] < finals["renorm"]["kl_to_teacher"] / 2
    assert finals["sampled"]["kl_to_teacher"] < finals["renorm"]["kl_to_teacher"] / 2


def test_saved_student_loads_in_transformers(cache, tmp_path):
    train("s", "debug", cache, tmp_path / "s", LossConfig(kind="ce"), OPTIM, FAST)
    ours = load_model(tmp_path / "s")
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    assert (tmp_path / "s" / "tokenizer.model").read_bytes() == (cache / "tokenizer.model").read_bytes()
    run = json.loads((tmp_path / "s" / "run_config.json").read_text())
    assert run["loss"]["kind"] == "ce" and run["cache"]["topk"] == 8


def test_vocab_mismatch_is_refused(cache, tmp_path):
    (tmp_path / "student.json").write_text(json.dumps(tiny_config(vocab_size=512).to_hf()))
    with pytest.raises(PipelineError, match="vocab_size 512 differs from the cache's 400"):
        train("s", str(tmp_path / "student.json"), cache, tmp_path / "s", LossConfig(), OPTIM, FAST)


def test_tokenizer_mismatch_is_refused(cache, tmp_path):
    other = tmp_path / "other.model"
    Tokenizer.train(CORPUS_TEXTS[:50], vocab_size=400).save(other)
    with pytest.raises(PipelineError, match="is not the one the cache .* was made with"):
        train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM, FAST, tokenizer=other)


def test_kd_on_token_shards_is_refused(work, tmp_path):
    with pytest.raises(PipelineError, match="--loss kd needs a teacher logit cache"):
        train("s", "debug", work / "tokens", tmp_path / "s", LossConfig(), OPTIM, FAST)


def test_changed_settings_are_not_resumed(cache, tmp_path):
    train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM, FAST)
    with pytest.raises(PipelineError, match="a run with other settings"):
        train("s", "debug", cache, tmp_path / "s", LossConfig(), OptimConfig(lr=1e-3), FAST)


def test_evaluate_matches_direct_computation(work, cache):
    teacher = load_model(work / "teacher")
    metrics = evaluate(teacher, cache / "val", batch_size=5, chunk_tokens=7)
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in sorted((cache / "val").glob("*.parquet"))]
    ids = torch.tensor([row for t in tables for row in t.column("input_ids").to_pylist()])
    continued = torch.tensor([c for t in tables for c in t.column("continued").to_pylist()])
    logp = per_document_logprobs(teacher, ids)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[trained_positions(ids, continued)].mean().item()
    assert metrics["val_ce"] == pytest.approx(ce, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-4)
    assert metrics["top1_agreement"] == 1.0  # the teacher agrees with its own cache
    assert abs(metrics["kl_to_teacher"]) < 1e-3  # only float16 rounding of the cached log-probs
    assert 0 <= metrics["ece"] <= 1


def test_schedule_warms_up_then_decays():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] >= 0.1


def test_gradient_accumulation_equals_the_larger_batch(cache, tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    base = dataclasses.replace(FAST, max_tokens=16 * 8 * 6)
    train("a", "debug", cache, tmp_path / "a", LossConfig(), OPTIM, base)
    train("b", "debug", cache, tmp_path / "b", LossConfig(), OPTIM, dataclasses.replace(base, batch_size=4, grad_accum=2))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_auto_target_uses_the_tail_draws_when_the_cache_has_them(cache, work, tmp_path):
    train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM, dataclasses_replace(FAST, max_tokens=16 * 8 * 2))
    assert json.loads((tmp_path / "s" / "run_config.json").read_text())["loss"]["target"] == "sampled"
    no_draws = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", no_draws, CaptureConfig(TopKConfig(topk=8)))
    train("t", "debug", no_draws, tmp_path / "t", LossConfig(), OPTIM, dataclasses_replace(FAST, max_tokens=16 * 8 * 2))
    assert json.loads((tmp_path / "t" / "run_config.json").read_text())["loss"]["target"] == "tail"


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_resume_does_not_depend_on_the_path_to_the_data(cache, tmp_path):
    first = train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM, FAST)
    (tmp_path / "link").symlink_to(cache)
    assert train("s", "debug", tmp_path / "link", tmp_path / "s", LossConfig(), OPTIM, FAST) == first
