"""`make plan`'s tracer against real CPU runs, and the full-shape plans against arithmetic.

The fake trace of the real code is held to (a) the same tracer on real tensors, (b) the resident memory of
a separate process (benchmarks/head_memory.py's worker), and (c) the parameter counts and FLOPs one can
write down by hand."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pipeline.losses import LossConfig
from pipeline.model import attention_allowed, preset
from pipeline.plan import (
    GIB,
    MemoryTracer,
    PlanConfig,
    StudentJob,
    attention_pairs,
    batch_columns,
    plan_student,
    trace_capture,
    trace_student,
)
from pipeline.topk import TopKConfig
from tests.conftest import ROOT

WITHIN = 0.15


def close(traced: float, measured: float, within: float = WITHIN) -> bool:
    return abs(traced - measured) <= within * measured


def test_tracer_counts_live_storages_and_frees() -> None:
    tracer = MemoryTracer()
    with tracer:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.empty(500, dtype=torch.float64)  # 4000 more
        del a, b, c
        d = torch.empty(250, dtype=torch.int32)  # 1000, after the frees
    assert tracer.peak() == 8000
    assert tracer.live() == 1000
    del d
    assert tracer.live() == 0


@pytest.mark.parametrize("window,length", [(None, 17), (5, 17), (16, 16), (40, 17), (1, 9)])
def test_attention_pairs_match_the_mask(window: int | None, length: int) -> None:
    pos = torch.arange(length)
    assert attention_pairs(length, window) == int(attention_allowed(pos[:, None], pos[None, :], window).sum())


def test_fake_capture_trace_matches_real_tensors() -> None:
    """The fake trace of stage one's device work allocates what the real run allocates (same code, CPU math
    attention and the CPU head), forward and head, in float32 and bf16."""
    cfg = preset("demo-teacher")
    for dtype in (torch.float32, torch.bfloat16):
        topk = TopKConfig(topk=16, samples=4, head_chunk=96)
        fake = trace_capture(cfg, 128, 2, topk, dtype, [96, 256], gpu_head=False, fused=False)
        real = trace_capture(cfg, 128, 2, topk, dtype, [96, 256], gpu_head=False, fused=False, fake=False)
        assert fake.weights_bytes == real.weights_bytes == cfg.num_parameters() * dtype.itemsize
        assert close(fake.forward_peak, real.forward_peak)
        for chunk in (96, 256):
            assert close(fake.head_peaks[chunk], real.head_peaks[chunk])
        assert fake.flops_per_token == real.flops_per_token > 0


def test_traced_head_matches_resident_memory() -> None:
    """The traced peak above the weights of one capture batch against the peak resident set of a separate
    process running the same call (benchmarks/head_memory.py's worker: float32, math attention)."""
    vocab, chunk = 65536, 512
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.head_memory", "--worker", "ours", "--vocab", str(vocab),
                          "--chunk", str(chunk), "--samples", "16", "--topk", "64"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] * 2**20
    cfg = preset("debug", vocab_size=vocab)
    trace = trace_capture(cfg, 128, chunk // 128, TopKConfig(topk=64, samples=16, head_chunk=chunk), torch.float32,
                          [chunk], gpu_head=False, fused=False)
    traced = trace.peak(chunk) - trace.weights_bytes
    assert close(traced, measured), (traced / 2**20, measured / 2**20)


def columns(seq_len: int, topk: int, samples: int, target: str) -> dict:
    job = StudentJob(1, 1, "ddp", "fp32", False, LossConfig(target=target), topk, samples)
    return batch_columns(job, seq_len)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_student_trace_matches_real_tensors(checkpointing: bool) -> None:
    """One optimizer step of a demo student (forward, chunked KD loss, backward, AdamW), fake against real."""
    cfg = preset("demo-student-m")
    loss = LossConfig(target="sampled", loss_chunk=96)
    cols = columns(128, 16, 4, "sampled")
    fake = trace_student(cfg, 128, 2, 2, loss, "fp32", checkpointing, cols, fused=False)
    real = trace_student(cfg, 128, 2, 2, loss, "fp32", checkpointing, cols, fused=False, fake=False)
    assert fake.param_bytes == real.param_bytes == cfg.num_parameters() * 4
    assert fake.optim_bytes == 2 * fake.param_bytes  # AdamW's two float32 moments
    assert close(fake.world1_peak, real.world1_peak)
    for sharding in ("ddp", "fsdp"):
        assert close(fake.peak(sharding, 2), real.peak(sharding, 2))


def test_checkpointing_lowers_the_traced_activations() -> None:
    cfg = preset("demo-student-m")
    loss = LossConfig(target="tail", loss_chunk=128)
    cols = columns(256, 16, 0, "tail")
    plain = trace_student(cfg, 256, 4, 1, loss, "bf16", False, cols)
    ckpt = trace_student(cfg, 256, 4, 1, loss, "bf16", True, cols)
    assert ckpt.world1_peak < plain.world1_peak
    assert ckpt.flops_per_token > plain.flops_per_token  # the recomputed forward


def test_27b_capture_plan_holds_the_arithmetic() -> None:
    """The hold-out's capture properties at full shape: bf16 weights = 2 × parameters, the peak at least the
    weights and one float32 head chunk, the head within [1.0, 1.8] × that chunk, forward FLOPs/token within
    3% of 2 × parameters + attention."""
    cfg = preset("gemma-2-27b")
    seq, chunk = 4096, 8192
    trace = trace_capture(cfg, seq, 8, TopKConfig(topk=64, samples=16, head_chunk=chunk), torch.bfloat16, [chunk])
    params = cfg.num_parameters()
    buffer = chunk * cfg.vocab_size * 4
    assert trace.weights_bytes == 2 * params
    assert trace.peak(chunk) >= trace.weights_bytes + buffer
    assert 1.0 <= trace.head_peaks[chunk] / buffer <= 1.8
    attention = sum(4 * cfg.num_attention_heads * cfg.head_dim * attention_pairs(seq, layer.window_at(seq))
                    for layer in _layers(cfg)) / seq
    assert abs(trace.flops_per_token / (2 * params + attention) - 1) < 0.03
    assert trace.seconds < 120


def _layers(cfg):  # the attention modules' windows, without building the model's weights
    from pipeline.model import Attention

    with torch.device("meta"):
        return [Attention(cfg, i) for i in range(cfg.num_hidden_layers)]


def test_9b_student_needs_fsdp_on_8_h100() -> None:
    cfg = preset("gemma-2-9b")
    job = StudentJob(1, 64, "ddp", "bf16", True, LossConfig(target="tail"), 64, 0)
    plan = PlanConfig(world=8, gpu="h100-80gb")
    entry, problem = plan_student(cfg, job, plan)
    assert not entry["fits"] and "SHARDING=fsdp" in problem
    assert entry["peak_bytes_by_sharding"]["ddp"] > 80 * GIB > entry["peak_bytes_by_sharding"]["fsdp"]
    # 16 bytes a parameter of state at least, under DDP
    assert entry["peak_bytes"] >= 16 * cfg.num_parameters()


def test_real_stages_check_only_on_a_gpu(monkeypatch, tmp_path) -> None:
    """On the CPU the stages' check does nothing (not even a trace); on a GPU too small for the run it refuses
    with the plan's line, before any weights are loaded."""
    import pipeline.plan as plan
    from pipeline.errors import PipelineError
    from pipeline.train import TrainConfig

    def no_trace(*a, **k):
        raise AssertionError("traced on the CPU")

    monkeypatch.setattr(plan, "trace_capture", no_trace)
    monkeypatch.setattr(plan, "trace_student", no_trace)
    cpu = torch.device("cpu")
    plan.check_capture_run(tmp_path / "no-teacher", tmp_path / "no-tokens", None, cpu)  # reads nothing either
    meta = type("Meta", (), {"seq_len": 4096, "topk": 64, "samples": 0})()
    plan.check_training(preset("gemma-2-9b"), LossConfig(target="tail"), TrainConfig(batch_size=1), meta, cpu, 8)
    monkeypatch.undo()

    small = PlanConfig(world=8, gpu_memory_gb=80)
    monkeypatch.setattr(plan, "device_plan", lambda device, world: small)
    with pytest.raises(PipelineError, match="use SHARDING=fsdp"):
        plan.check_training(preset("gemma-2-9b"), LossConfig(target="tail"),
                            TrainConfig(batch_size=1, sharding="ddp", gradient_checkpointing=True), meta,
                            torch.device("cuda"), 8)
    with pytest.raises(PipelineError, match="HEAD_CHUNK=8192 needs .* use HEAD_CHUNK ≤ "):
        plan.check_capture(preset("demo-teacher"), 1024, 8, TopKConfig(topk=64, head_chunk=8192), torch.bfloat16,
                           PlanConfig(gpu_memory_gb=2.1))
    plan.check_capture(preset("demo-teacher"), 1024, 8, TopKConfig(topk=64, head_chunk=1024), torch.bfloat16,
                       PlanConfig(gpu_memory_gb=2.1))  # fits: no error


def test_report_evaluates_the_teacher_at_the_capture_batch(work, tmp_path, monkeypatch) -> None:
    """`make report` runs the teacher at the batch size its cache was captured with (item 4 of issue 21:
    the shape stage one ran it in); students keep the default."""
    import shutil

    import pipeline.report as report
    from pipeline.capture import CaptureConfig, capture

    out = tmp_path / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4), batch_size=3))
    teacher, student = tmp_path / "teacher", tmp_path / "student"  # cached_eval writes eval.json beside them
    shutil.copytree(work / "teacher", teacher)
    shutil.copytree(work / "teacher", student)
    seen = []
    monkeypatch.setattr(report, "evaluate", lambda model, val, batch_size=16, **k: seen.append(batch_size) or {})
    report.cached_eval(teacher, out / "val", teacher=True)
    report.cached_eval(student, out / "val", teacher=False)
    assert seen == [3, 16]


def test_a_recompile_limit_is_an_error_not_eager_attention() -> None:
    """Once the model compiles flex attention, dynamo's recompile-limit fallback (eager flex: [B, heads, T, T]
    scores) is an error. (Hitting the limit for real takes 9 compilations: not run here.)"""
    from pipeline.model import _compiled

    _compiled("flex")
    assert torch._dynamo.config.fail_on_recompile_limit_hit is True


GLOO_WORKER = '"""One optimizer step of a demo student under DDP or FSDP on gloo; peak resident set above the resident set\nbefore the step (MALLOC_MMAP_THRESHOLD_ makes large blocks come and go with mmap)."""\nimport json\nimport sys\n\nimport torch\n\nfrom pipeline import parallel\nfrom pipeline.losses import LossConfig\nfrom pipeline.model import Gemma2, preset\nfrom pipeline.runtime import Runtime\nfrom pipeline.train import StudentWithLoss\n\n\ndef status(key):\n    with open("/proc/self/status") as f:\n        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024\n\n\nsharding, vocab, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\ntorch.manual_seed(0)\ntorch.set_num_threads(1)\nrt = Runtime.from_env()\ncfg = preset("demo-student-m", vocab_size=vocab)\nloss = LossConfig(target="tail", loss_chunk=1024)\nwith torch.device("meta"):\n    student = StudentWithLoss(Gemma2(cfg), loss)\nwrapped = parallel.wrap(student, student.model.model.layers, sharding, rt, lambda: student.model.init_weights(0), None)\nparams = list(student.model.named_parameters())\ntrainable = [p for _, p in params]\nopt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)\ng = torch.Generator().manual_seed(rt.rank)\nlp = torch.log_softmax(torch.randn(batch, seq, 16, generator=g), -1) - 0.3\ndata = {"input_ids": torch.randint(0, vocab, (batch, seq + 1), generator=g),\n        "label_mask": torch.ones(batch, seq, dtype=torch.bool),\n        "topk_ids": torch.randint(0, vocab, (batch, seq, 16), generator=g), "topk_logprobs": lp,\n        "tail_mass": 1 - lp.exp().sum(-1)}\ndenominator = torch.tensor(float(batch * seq))\n\n\ndef step():\n    value = wrapped(dict(data), denominator)\n    value.backward()\n    norm = parallel.grad_norm(trainable)\n    parallel.clip_(trainable, 1.0, norm)\n    opt.step()\n    opt.zero_grad(set_to_none=True)\n\n\nstep()\nstep()\npeaks = []\nfor _ in range(3):\n    with open("/proc/self/clear_refs", "w") as f:\n        f.write("5")\n    before = status("VmRSS:")\n    step()\n    peaks.append(status("VmHWM:") - before)\nprint(json.dumps({"rank": rt.rank, "peak": min(peaks)}), flush=True)\ntorch.distributed.destroy_process_group()\n'


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_traced_ddp_and_fsdp_steps_match_two_gloo_ranks(sharding, tmp_path) -> None:
    """One optimizer step of a demo student (V 32,768, so the loss's buffers dominate) on 2 gloo ranks under
    DDP and FSDP: each rank's peak resident set above its resident set before the step against the plan's
    peak less what is resident before (weights and AdamW states: whole under DDP, with the gradient buckets;
    halved under FSDP). Measured here: DDP 358.0 MiB vs 358.1 traced, FSDP 374.8 vs 385.9."""
    import socket

    script = tmp_path / "worker.py"
    script.write_text(GLOO_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(script), sharding, "32768", "4", "256"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # The ranks print at once: their lines may run into each other.
    measured = [json.loads(m)["peak"] for m in re.findall(r'\{"rank": \d+, "peak": \d+\}', out.stdout)]
    assert len(measured) == 2
    cfg = preset("demo-student-m", vocab_size=32768)
    loss = LossConfig(target="tail", loss_chunk=1024)
    trace = trace_student(cfg, 256, 4, 1, loss, "fp32", False, columns(256, 16, 0, "tail"), fused=False)
    resident = trace.param_bytes + trace.optim_bytes
    resident = resident + trace.grad_bytes if sharding == "ddp" else resident / 2
    traced = trace.peak(sharding, 2) - resident
    for peak in measured:
        assert close(traced, peak), (traced / 2**20, peak / 2**20)
