"""Peak memory of stage one's head for one chunk of positions (pipeline/topk.py `teacher_targets`: logits →
top-K log-probs, tail mass, entropy and, with --samples, the tail draws), as a multiple of one float32
[chunk × vocab] buffer; the head as it was before issue #11 (`naive`: full-size temporaries, a float64
cumulative sum over the whole chunk) alongside for comparison.

Each measurement runs in a fresh process on a debug-size Gemma 2 with the given vocabulary, after one
warm-up call: CUDA: torch.cuda.max_memory_allocated above the allocation before the call; CPU: the peak
resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before it, with
MALLOC_MMAP_THRESHOLD_=65536 so that large blocks come straight from mmap and the resident set tracks the
live tensors. The windows are short (128 positions) so that attention is negligible beside the head.

    python -m benchmarks.head_memory                      # CPU: V = 256000, chunk 512
    python -m benchmarks.head_memory --vocab 256000 --chunk 2048   # what benchmarks/gpu.sh runs on CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import device, table
from pipeline.model import Gemma2, preset
from pipeline.topk import TopKConfig, teacher_targets, unique_counts, window_uniforms

WINDOW = 128
MODES = ("ours", "naive")


def naive_targets(model: Gemma2, ids: torch.Tensor, windows: list[int], cfg: TopKConfig) -> Any:
    """The head before issue #11, for comparison only: log_softmax, exp and the entropy product at full size,
    the tail as a new tensor and its float64 CDF over the whole chunk."""
    b, t = ids.shape[0], ids.shape[1] - 1
    hidden = model.hidden_states(ids[:, :t]).reshape(b * t, -1)
    logp = torch.log_softmax(model.logits(hidden), dim=-1)
    top_lp, top_i = logp.topk(cfg.topk, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1)
    tail_probs = probs.scatter(-1, top_i, 0.0)
    tail = tail_probs.sum(-1)
    if cfg.samples:
        u = torch.cat([window_uniforms(w, t, cfg.samples, cfg.sample_seed) for w in windows]).to(hidden.device)
        cdf = tail_probs.double().cumsum(-1)
        picks = torch.searchsorted(cdf, u * cdf[:, -1:] * (1 - 1e-12), right=True).sort(-1).values
        unique_counts(picks.cpu().numpy(), tail.cpu().numpy())
    return top_lp.cpu(), top_i.cpu(), entropy.cpu()


def worker(mode: str, vocab: int, chunk: int, samples: int, topk: int) -> dict[str, float]:
    dev = device()
    torch.manual_seed(0)
    model = Gemma2(preset("debug", vocab_size=vocab), "math")
    model.init_weights(0, dev)
    model = model.to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    rows = max(1, chunk // WINDOW)
    ids = torch.randint(0, vocab, (rows, WINDOW + 1), device=dev)
    cfg = TopKConfig(topk=topk, samples=samples, head_chunk=rows * WINDOW)
    fn = teacher_targets if mode == "ours" else naive_targets

    def call() -> None:
        with torch.no_grad():
            fn(model, ids, list(range(rows)), cfg)

    call()  # warm-up: allocator pools, kernels, thread workspaces
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS:")
        call()
        peak = _status("VmHWM:") - before
    buffer = rows * WINDOW * vocab * 4
    return {"peak_mb": peak / 2**20, "buffer_mb": buffer / 2**20, "ratio": peak / buffer}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def run(vocab: int, chunk: int, samples: int, topk: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for mode in MODES:
        for n in sorted({0, samples}):
            out = subprocess.run([sys.executable, "-m", "benchmarks.head_memory", "--worker", mode, "--vocab",
                                  str(vocab), "--chunk", str(chunk), "--samples", str(n), "--topk", str(topk)],
                                 capture_output=True, text=True, env=env)
            row: dict[str, Any] = {"head": mode, "samples": n}
            if out.returncode != 0:
                row["note"] = (out.stderr.strip().splitlines() or ["failed"])[-1][:100]
            else:
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append(row)
    chunk = max(1, chunk // WINDOW) * WINDOW
    print(table(f"Head memory: vocab {vocab:,}, chunk {chunk} positions, top-{topk} ({device()}); ratio = peak / "
                f"one float32 [chunk × vocab] buffer", rows))
    return {"vocab": vocab, "chunk": chunk, "topk": topk, "device": str(device()), "rows": rows}


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--chunk", type=int, default=512, help=f"positions per head chunk (a multiple of {WINDOW})")
    p.add_argument("--samples", type=int, default=16, help="tail draws per position (also measured with 0)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.vocab, a.chunk, a.samples, a.topk)))
    else:
        result = run(a.vocab, a.chunk, a.samples, a.topk)
        if a.json:
            a.json.write_text(json.dumps(result, indent=2) + "\n")
