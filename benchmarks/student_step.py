"""One training step of a student: our chunked KD loss vs our chunked CE vs a naive step that materialises
the full [tokens × vocab] logits — time and peak memory. Each measurement runs in a fresh process so peak
memory is its own (CUDA: max_memory_allocated; CPU: peak resident set above the resident set before the step,
with large blocks taken straight from mmap so the resident set tracks live tensors)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import device, table, timed
from pipeline.losses import LossConfig, chunked_loss
from pipeline.model import Gemma2, preset

MODES = ("ce", "kd", "kd_sampled", "naive_ce", "naive_kd")


def _targets(n: int, vocab: int, k: int, samples: int, dev: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.3
    out = {"labels": torch.randint(0, vocab, (n,), generator=g),
           "topk_ids": torch.randint(0, vocab, (n, k), generator=g),
           "topk_logprobs": lp, "tail_mass": 1 - lp.exp().sum(-1)}
    if samples:
        out["sample_ids"] = torch.randint(0, vocab, (n, samples), generator=g)
        out["sample_counts"] = torch.ones(n, samples)
    return {k_: v.to(dev) for k_, v in out.items()}


def worker(mode: str, name: str, vocab: int, seq: int, batch: int, chunk: int, measure: str) -> dict[str, float]:
    dev = device()
    cfg = preset(name, vocab_size=vocab)
    with torch.device("meta"):  # a 2B built on the CPU first would take minutes per worker
        model = Gemma2(cfg)
    model.init_weights(0, dev)
    if dev.type == "cuda":
        model.gradient_checkpointing = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), device=dev)
    n = batch * seq
    t = _targets(n, vocab, 64, 16 if mode == "kd_sampled" else 0, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    loss_cfg = LossConfig(kind="ce" if mode in ("ce", "naive_ce") else "kd",
                          target="sampled" if mode == "kd_sampled" else "tail", loss_chunk=chunk)

    def step() -> None:
        with amp:
            h = model.hidden_states(ids[:, :seq]).reshape(n, -1)
            if mode.startswith("naive"):
                z = model.logits(h)
                if mode == "naive_ce":
                    loss = F.cross_entropy(z, t["labels"])
                else:
                    logq = torch.log_softmax(z, -1)
                    p = t["topk_logprobs"].exp()
                    tail_q = 1 - logq.gather(-1, t["topk_ids"]).exp().sum(-1)
                    loss = (-(p * logq.gather(-1, t["topk_ids"])).sum(-1) - t["tail_mass"] * tail_q.clamp(min=1e-9).log()).mean()
            else:
                loss = chunked_loss(h, model.head_weight, cfg.final_logit_softcapping, t, loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if measure == "time":
        seconds = timed(step, repeats=5, warmup=1)
        return {"step_s": seconds, "tok_s": n / seconds}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")
        before = _status("VmRSS:")
    step()
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _status("VmHWM:") - before
    return {"peak_mb": peak / 2**20, "before_mb": before / 2**20}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def run(name: str, vocab: int, seq: int, batch: int, chunk: int) -> dict[str, Any]:
    rows = []
    base_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for mode in MODES:
        row: dict[str, Any] = {"mode": mode, "step_s": None, "tok_s": None, "peak_mb": None, "note": ""}
        # Time with the normal allocator; memory with large blocks straight from mmap (slower, but then the
        # resident set tracks live tensors).
        for measure, env in (("time", base_env), ("memory", {**base_env, "MALLOC_MMAP_THRESHOLD_": "65536"})):
            out = subprocess.run([sys.executable, "-m", "benchmarks.student_step", "--worker", mode, "--name", name,
                                  "--vocab", str(vocab), "--seq", str(seq), "--batch", str(batch), "--chunk", str(chunk),
                                  "--measure", measure], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                row["note"] = (out.stderr.strip().splitlines() or ["failed"])[-1][:80]
                break
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
    ce = next((r for r in rows if r["mode"] == "ce" and r["step_s"]), None)
    for r in rows:
        r["time_vs_ce"] = r["step_s"] / ce["step_s"] if ce and r["step_s"] else None
    print(table(f"Student step: {name}, vocab {vocab:,}, {batch}×{seq} tokens, loss chunk {chunk} ({device()})", rows))
    return {"rows": rows, "shape": name, "vocab": vocab, "tokens": batch * seq}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=MODES, required=True)
    p.add_argument("--name", default="demo-student-m")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--measure", choices=("time", "memory"), default="time")
    a = p.parse_args()
    print(json.dumps(worker(a.worker, a.name, a.vocab, a.seq, a.batch, a.chunk, a.measure)))
