"""Training from the cache: students learn, save in the HF format, and refuse mismatched caches; the
evaluation metrics agree with direct computation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma2ForCausalLM

import pipeline.train as train_module
from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.losses import LossConfig
from pipeline.model import Gemma2, preset
from pipeline.reader import ShardStream
from pipeline.runtime import Runtime
from pipeline.tokenizer import Tokenizer
from pipeline.topk import TopKConfig
from pipeline.train import FINISHED, OptimConfig, TrainConfig, grad_accum_for, lr_at, train, unfinished
from tests.conftest import CORPUS_TEXTS, per_document_logprobs, tiny_config, trained_positions

FAST = TrainConfig(max_tokens=16 * 8 * 40, batch_size=8, save_every=1000, save_every_minutes=0, log_every=5)
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


# --- the recipe's settings ------------------------------------------------------------------------------


def test_warmup_fraction_and_batch_tokens():
    cfg = OptimConfig(lr=1.0, warmup_steps=3, warmup_fraction=0.1)
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    assert lrs[19] == pytest.approx(1.0) and lrs[18] == pytest.approx(19 / 20)  # 10% of 200 steps, not 3
    assert lrs[20] == pytest.approx(1.0) and lrs[21] < 1.0  # then the cosine
    assert grad_accum_for(TrainConfig(batch_size=2, batch_tokens=4096 * 2 * 8 * 16), 8, 4096) == 16
    assert grad_accum_for(TrainConfig(batch_size=2, batch_tokens=4096 * 2 * 4 * 16), 8, 4096) == 8
    with pytest.raises(PipelineError, match="not a multiple of .* use 65536"):
        grad_accum_for(TrainConfig(batch_size=2, batch_tokens=70_000), 8, 4096)


def test_checkpoint_cadence_by_tokens_and_by_wall_time(cache, tmp_path, monkeypatch):
    saved = []
    real = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda run: saved.append(run.step) or real(run))
    tokens_per_step = 16 * 8
    base = dataclasses.replace(FAST, max_tokens=tokens_per_step * 7, save_every_minutes=0)
    train("a", "debug", cache, tmp_path / "a", LossConfig(), OPTIM, dataclasses.replace(base, save_every_tokens=3 * tokens_per_step))
    assert saved == [3, 6, 7]  # every 3 steps' worth of tokens, and at the end
    saved.clear()
    train("b", "debug", cache, tmp_path / "b", LossConfig(), OPTIM, dataclasses.replace(base, save_every_minutes=1e-9))
    assert saved == [1, 2, 3, 4, 5, 6, 7]  # the clock says every step
    assert [p.name for p in (tmp_path / "b" / "checkpoint").iterdir()] == ["latest.json", "step-00000007"] or \
        sorted(p.name for p in (tmp_path / "b" / "checkpoint").iterdir()) == ["latest.json", "step-00000007"]


def test_a_step_takes_each_micro_batch_when_it_trains_and_equals_the_mean_over_the_step(cache, tmp_path, monkeypatch):
    """grad_accum 4: the step asks the reader for a micro-batch only when the one before has been trained
    (so the prefetch reads the rest meanwhile), and its gradient is the mean over every trained position of
    the step, scaled before the norm: the same as one batch of 4× the rows (checked against a plain
    backward of the summed loss over the whole step's rows, divided by their count)."""
    cfg = dataclasses.replace(FAST, batch_size=2, grad_accum=4)
    run = prepared(cache, tmp_path / "s", cfg)
    events = []
    real_next, real_forward = ShardStream.next_batch, type(run.wrapped).forward
    seen = []

    def next_batch(self):
        events.append("read")
        batch = real_next(self)
        seen.append(batch)
        return batch

    def forward(self, batch, denominator, evaluate=None):
        events.append("train")
        return real_forward(self, batch, denominator, evaluate)

    monkeypatch.setattr(ShardStream, "next_batch", next_batch)
    monkeypatch.setattr(type(run.wrapped), "forward", forward)
    clip = dataclasses.replace(OPTIM, clip=0.0)
    run.optim = clip
    ref = train_module.StudentWithLoss(train_module.Gemma2(run.model.config), run.loss)
    ref.load_state_dict(run.wrapped.state_dict())
    step_loss, norm, _ = train_module.train_step(run)
    assert events == ["read", "train"] * 4
    whole = {k: np.concatenate([b[k] for b in seen]) for k in seen[0]}  # the step's 8 rows as one batch
    positions = int(whole["label_mask"].sum())
    loss = ref(train_module.to_torch(whole, torch.device("cpu")), float(positions))
    loss.backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters() if p.grad is not None])
    assert step_loss == pytest.approx(loss.item(), rel=1e-5)
    assert norm == pytest.approx(want.item(), rel=1e-4)
    run.stream.close()


def test_collectives_wait_the_training_timeout(cache, tmp_path, monkeypatch):
    """Rank 0's checkpoint bookkeeping must not trip a collective: the process group waits --timeout-minutes."""
    got = []
    real = Runtime.from_env
    monkeypatch.setattr(Runtime, "from_env", classmethod(lambda cls, timeout_s=None: got.append(timeout_s) or real()))
    train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM,
          dataclasses.replace(FAST, max_tokens=16 * 8, timeout_minutes=90))
    assert got == [90 * 60]


# --- guards ---------------------------------------------------------------------------------------------


def poison_from(monkeypatch, first_call, last_call=10**9):
    """The train stream's batches number `first_call`… carry NaN teacher log-probs (a corrupt cache)."""
    calls = []
    real = ShardStream.next_batch

    def next_batch(self):
        batch = real(self)
        if self.folder.name == "train":
            calls.append(1)
            if first_call <= len(calls) - 1 <= last_call:
                batch = {**batch, "topk_logprobs": np.full_like(batch["topk_logprobs"], np.nan)}
        return batch

    monkeypatch.setattr(ShardStream, "next_batch", next_batch)


def prepared(cache, out, cfg=FAST):
    loss, _ = LossConfig(target="tail"), None
    manifest, loss = train_module.check_splits(cache, loss)
    model_cfg = train_module.resolve_student("debug", manifest.meta.vocab_size)
    runtime = Runtime()
    config = train_module.run_config("s", "debug", cache, loss, OPTIM, cfg, manifest, model_cfg, 1)
    return train_module.prepare("s", config, model_cfg, cache, out, loss, OPTIM, cfg, cache / "tokenizer.model",
                                runtime, resume=False)


def test_a_non_finite_loss_or_gradient_norm_skips_the_update(cache, tmp_path, monkeypatch):
    run = prepared(cache, tmp_path / "s")
    train_module.train_step(run)  # a good step: AdamW has state now
    before = {n: p.detach().clone() for n, p in run.params}
    moments = {n: run.optimizer.state[p]["exp_avg"].clone() for n, p in run.params}
    poison_from(monkeypatch, 0)
    loss, norm, finite = train_module.train_step(run)
    assert not finite and not math.isfinite(loss)
    assert all(torch.equal(p, before[n]) for n, p in run.params)
    assert all(torch.equal(run.optimizer.state[p]["exp_avg"], moments[n]) for n, p in run.params)
    assert all(p.grad is None for _, p in run.params) and run.step == 2
    monkeypatch.undo()
    handle = run.params[3][1].register_hook(lambda g: g * float("inf"))  # a finite loss, an infinite gradient
    loss, norm, finite = train_module.train_step(run)
    handle.remove()
    assert math.isfinite(loss) and not math.isfinite(norm) and not finite
    assert all(torch.equal(p, before[n]) for n, p in run.params)
    assert math.isfinite(train_module.train_step(run)[0])
    run.stream.close()


def test_bad_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(cache, tmp_path, monkeypatch):
    out = tmp_path / "s"
    cfg = dataclasses.replace(FAST, save_every=2, max_bad_steps=3)
    poison_from(monkeypatch, 5, 5)  # one bad step: skipped, and the run goes on
    final = train("s", "debug", cache, out, LossConfig(), OPTIM, cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "skipped" in x] == [6] and math.isfinite(final["val_ce"])
    assert (out / FINISHED).is_file()

    poison_from(monkeypatch, 5)  # from the 6th step on, every step
    with pytest.raises(PipelineError, match=r"3 steps in a row had a non-finite loss .*last good checkpoint \(step 4\)"):
        train("s", "debug", cache, out, LossConfig(), OPTIM, cfg, resume=False)
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["step"] == 4
    assert not (out / FINISHED).is_file() and not (out / "config.json").is_file()  # nothing looks finished
    assert unfinished(out) and "has not finished" in unfinished(out)
    state = {k: v for f in (out / "checkpoint" / "step-00000004").glob("*.safetensors") for k, v in load_file(f).items()}
    assert state and all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("param/"))


def test_a_kill_in_the_middle_of_the_checkpoint_swap_leaves_a_complete_checkpoint(cache, tmp_path, monkeypatch):
    cfg = dataclasses.replace(FAST, max_tokens=16 * 8 * 6, save_every=2)
    train("whole", "debug", cache, tmp_path / "whole", LossConfig(), OPTIM, cfg)
    real = train_module.write_json

    def killed_at_the_switch(path, obj):
        if path.name == "latest.json" and obj["step"] == 4:
            raise KeyboardInterrupt  # killed after step-4/ is complete, before latest.json names it
        real(path, obj)

    monkeypatch.setattr(train_module, "write_json", killed_at_the_switch)
    with pytest.raises(KeyboardInterrupt):
        train("whole", "debug", cache, tmp_path / "killed", LossConfig(), OPTIM, cfg)
    monkeypatch.undo()
    ckpt = tmp_path / "killed" / "checkpoint"
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 2  # the old one, still complete
    assert (ckpt / "step-00000002" / "state.json").is_file()
    train("whole", "debug", cache, tmp_path / "killed", LossConfig(), OPTIM, cfg)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-00000006"]  # the orphan cleaned up


def test_no_resume_leaves_nothing_of_the_old_run_to_resume(cache, tmp_path, monkeypatch):
    out = tmp_path / "s"
    cfg = dataclasses.replace(FAST, max_tokens=16 * 8 * 4, save_every=1)
    train("s", "debug", cache, out, LossConfig(), OPTIM, cfg)
    assert (out / FINISHED).is_file() and (out / "checkpoint" / "latest.json").is_file()

    def killed(run):
        raise KeyboardInterrupt  # the new run dies before its first checkpoint

    monkeypatch.setattr(train_module, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train("s", "debug", cache, out, LossConfig(), OptimConfig(lr=1e-3), cfg, resume=False)
    assert not (out / "checkpoint").exists() and not (out / FINISHED).exists() and not (out / "config.json").exists()
    assert json.loads((out / "run_config.json").read_text())["optim"]["lr"] == 1e-3


def test_the_final_evaluation_is_bounded_and_the_marker_comes_last(cache, tmp_path, monkeypatch):
    seen = []
    real = train_module.save_model
    monkeypatch.setattr(train_module, "save_model",
                        lambda model, out, **kw: seen.append((out / FINISHED).exists()) or real(model, out, **kw))
    final = train("s", "debug", cache, tmp_path / "s", LossConfig(), OPTIM, dataclasses.replace(FAST, eval_windows=3))
    assert seen == [False]  # exported before the marker
    expected = evaluate(load_model(tmp_path / "s"), cache / "val", limit=3)
    assert final["val_tokens"] == expected["val_tokens"] < evaluate(load_model(tmp_path / "s"), cache / "val")["val_tokens"]
    assert final["val_ce"] == pytest.approx(expected["val_ce"], rel=1e-5)
    marker = json.loads((tmp_path / "s" / FINISHED).read_text())
    assert marker["final"] == final and unfinished(tmp_path / "s") is None


def test_export_in_files_of_bounded_size_loads_everywhere(tmp_path):
    model = Gemma2(preset("debug", vocab_size=400))
    model.init_weights(3)
    save_model(model, tmp_path / "m", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "m" / "model.safetensors").exists()
    assert all((tmp_path / "m" / f).stat().st_size < 60_000 + 200_000 for f in files)  # one large tensor may be alone
    ours = load_model(tmp_path / "m")
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(ids), model(ids)) and (hf(ids).logits - model(ids)).abs().max() <= 1e-4
    save_model(model, tmp_path / "m")  # again as one file: the old layout goes
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == ["model.safetensors"]
