"""GPU checks that print numbers; benchmarks/gpu.sh runs them on one GPU, `--toy` runs the same code at toy
sizes on the CPU (to check the script, not to measure anything).

1. student: one training step of a gemma-2-2b-shape student (V = 256000) on B × T packed document rows:
   bf16 autocast over float32 weights, flex attention compiled forward + backward, gradient checkpointing,
   the chunked KD loss, AdamW. Tokens/s and peak memory; the first step (compilation) is reported apart.
2. mask: the document block mask of B = 8 rows × T = 4096 built as the model builds it on CUDA (compiled
   create_block_mask) and eagerly: time, peak memory, and whether the two are equal.
3. capture: stage one's targets (top-K ids, float16 log-probs, tail mass, tail draws) for 8 windows computed
   at batch 8 and as 8 batches of 1, compared byte for byte. A bf16 GPU matmul may pick another kernel (and
   summation order) for another shape, so this need not hold there; the result is printed as measured.
4. graphs: compiled graphs after capture batches of 1 .. CAPTURE_BATCH + 1 windows (each padded to
   CAPTURE_BATCH as stage one pads a shard's last batch): one set of graphs below CAPTURE_BATCH.
5. head: stage one's head at the 27B's shape (V 256,000, H 4608, bf16, 4 chunks of 8192) before issue 21's
   fix and after: peak memory as a multiple of one float32 chunk buffer (target ≤ 1.8).
6. data_wait (`--only data_wait`; gpu.sh runs it as its own part): real optimizer steps of the gemma-2-2b-shape
   student at grad_accum 16 × batch 2 × T 4096 (2^17 tokens a GPU, the 2B recipe's 2^20 over 8 GPUs) fed
   by the streaming reader (`pipeline.reader.ShardStream`, default prefetch and shuffle) from a synthetic
   cache of the recipe's shape (K 64, N 16 tail draws), each micro-batch taken when its turn comes and
   trained through the trainer's own module (`StudentWithLoss`): the time per step spent waiting for data,
   as a share of the step (target ≤ 1%).

    python -m benchmarks.gpu_checks [--toy] [--only student mask capture] [--work runs/gpu]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import device, save, sync, table, timed
from pipeline.losses import LossConfig, chunked_loss
from pipeline.model import Gemma2, make_block_mask, preset
from pipeline.runtime import teacher_dtype
from pipeline.tokenizer import BOS
from pipeline.topk import TopKConfig, teacher_targets
from schemas.tokens import document_ids


@dataclass(frozen=True)
class Sizes:
    model: str  # preset of the student and of the capture's teacher
    vocab: int
    batch: int  # student step rows
    seq: int  # tokens per row (student step, block mask, capture)
    steps: int  # timed student steps after the compiling one
    mask_batch: int
    windows: int  # capture windows (batch N vs N × batch 1)
    mean_doc: int  # mean document length in the packed rows
    accum: int = 16  # micro-batches per optimizer step in the data-wait check


GPU = Sizes("gemma-2-2b", 256000, batch=2, seq=4096, steps=3, mask_batch=8, windows=8, mean_doc=1200)
TOY = Sizes("debug", 512, batch=2, seq=96, steps=2, mask_batch=8, windows=8, mean_doc=30, accum=4)


def packed_rows(rows: int, length: int, vocab: int, mean_doc: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """Random token rows in the window format: `<bos>` first, documents of geometric lengths each starting
    with `<bos>`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(rows, length))
    starts = rng.random((rows, length)) < 1 / mean_doc
    starts[:, 0] = True
    ids[starts] = BOS
    return torch.from_numpy(ids).to(dev)


def random_model(name: str, vocab: int, dev: torch.device, dtype: torch.dtype = torch.float32) -> Gemma2:
    """Random weights made on the device (a 2B initialised on the CPU takes minutes)."""
    with torch.device("meta"):
        model = Gemma2(preset(name, vocab_size=vocab)).to(dtype)
    model.init_weights(0, dev)
    return model


def peak_bytes(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def student_step(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """The training step at a real student shape: compiled flex on CUDA (the math path on the CPU, where flex
    has no backward)."""
    model = random_model(s.model, s.vocab, dev)
    model.gradient_checkpointing = True
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    ids = packed_rows(s.batch, s.seq + 1, s.vocab, s.mean_doc, dev)
    inputs, n = ids[:, :-1], s.batch * s.seq
    docs = document_ids(inputs)
    g = torch.Generator(device="cpu").manual_seed(0)
    lp = torch.log_softmax(torch.randn(n, 64, generator=g), -1) - 0.3
    targets = {"labels": ids[:, 1:].reshape(-1), "topk_ids": torch.randint(0, s.vocab, (n, 64), generator=g).to(dev),
               "topk_logprobs": lp.to(dev), "tail_mass": (1 - lp.exp().sum(-1)).to(dev)}
    loss_cfg = LossConfig(kind="kd", target="tail", loss_chunk=1024)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            hidden = model.hidden_states(inputs, docs).reshape(n, -1)
            loss = chunked_loss(hidden, model.head_weight, model.config.final_logit_softcapping, targets, loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # compiles flex forward and backward (CUDA) and allocates the AdamW state
    sync()
    first = time.perf_counter() - start
    reset_peak(dev)
    seconds = timed(step, repeats=s.steps, warmup=0)
    row = {"shape": f"{s.model} V={s.vocab}", "tokens": n, "first_step_s": first, "step_s": seconds,
           "tok_s": n / seconds, "peak_gib": gib(peak_bytes(dev)),
           "params_b": model.config.num_parameters() / 1e9}
    attention = "compiled flex" if model.masks(s.seq, docs, dev).compiled else "math"
    print(table(f"Student step: bf16 autocast, {attention} attention forward + backward, gradient checkpointing, "
                "chunked KD loss, AdamW (peak: torch.cuda.max_memory_allocated)", [row]))
    return row


def block_mask_cost(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """The document block mask, compiled (the model's CUDA path) vs eager create_block_mask."""
    docs = document_ids(packed_rows(s.mask_batch, s.seq, s.vocab, s.mean_doc, dev, seed=1))
    rows, masks = [], {}
    for name, compiled in (("compiled", True), ("eager", False)):
        start = time.perf_counter()
        masks[name] = make_block_mask(s.seq, None, docs, dev, compiled)
        sync()
        first = time.perf_counter() - start
        reset_peak(dev)
        before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        seconds = timed(lambda c=compiled: make_block_mask(s.seq, None, docs, dev, c), repeats=3)
        peak = peak_bytes(dev)
        rows.append({"build": name, "B": s.mask_batch, "T": s.seq, "first_s": first, "ms": seconds * 1e3,
                     "peak_extra_gib": gib(None if peak is None else peak - before)})
    same = bool(torch.equal(masks["compiled"].to_dense(), masks["eager"].to_dense())
                and torch.equal(masks["compiled"].full_kv_num_blocks, masks["eager"].full_kv_num_blocks))
    print(table(f"Document block mask (causal + documents): compiled == eager: {same}", rows))
    return {"rows": rows, "equal": same}


def capture_invariance(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """Stage one's targets for the same windows at batch N and at batch 1, compared byte for byte."""
    dtype = teacher_dtype(dev)
    model = random_model(s.model, s.vocab, dev, dtype).eval()
    with torch.no_grad():  # a peaked distribution, as a trained teacher's (random weights are near uniform)
        model.model.embed_tokens.weight.mul_(5)
    ids = packed_rows(s.windows, s.seq + 1, s.vocab, s.mean_doc, dev, seed=2)
    cfg = TopKConfig(topk=64, samples=16)
    together = teacher_targets(model, ids, list(range(s.windows)), cfg)
    alone = [teacher_targets(model, ids[i : i + 1], [i], cfg) for i in range(s.windows)]
    rows = []
    for field in ("topk_ids", "topk_logprobs", "tail_mass", "sample_ids", "sample_counts"):
        a = getattr(together, field)
        b = np.concatenate([getattr(t, field) for t in alone])
        row: dict[str, Any] = {"field": field, "dtype": str(a.dtype), "bytes_equal": a.tobytes() == b.tobytes()}
        if a.shape == b.shape:  # per position ([B, T, ...] fields) or per draw (flat fields)
            differ = (a != b).reshape(a.shape[0] * a.shape[1], -1).any(-1) if a.ndim > 1 else a != b
            row["differing"] = f"{int(differ.sum())}/{len(differ)}"
            if a.dtype.kind == "f":
                row["max_abs_diff"] = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        else:  # draws: the number per position may differ once the distributions do
            row["differing"] = f"lengths {len(a)} vs {len(b)}"
        rows.append(row)
    same = all(r["bytes_equal"] for r in rows)
    note = ("identical" if same else "NOT identical: batch size changes the bits (kernel choice / summation order); "
            "a cache is reproducible only at the batch size it was made with")
    print(table(f"Capture, {s.windows} windows × {s.seq} tokens, {s.model} teacher in {str(dtype).removeprefix('torch.')}"
                f" on {dev.type}: batch {s.windows} vs batch 1: {note}", rows))
    return {"rows": rows, "identical": same, "dtype": str(dtype)}


def capture_graphs(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """Compiled graphs after stage one's batches of 1 .. CAPTURE_BATCH + 1 windows, each padded to CAPTURE_BATCH
    as the stage pads a shard's last batch: the count should stop growing after the first batch (one graph
    per layer kind and block-mask build) until CAPTURE_BATCH + 1, a shape the stage never runs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    capture_batch = max(2, s.windows // 2)
    model = random_model(s.model, s.vocab, dev, teacher_dtype(dev)).eval()
    model.attn_implementation, model.compile_flex = "flex", True  # the CUDA path (forward only on the CPU)
    cfg = TopKConfig(topk=64, samples=16)
    rows = []
    for b in range(1, capture_batch + 2):
        ids = packed_rows(b, s.seq + 1, s.vocab, s.mean_doc, dev, seed=b)
        start = time.perf_counter()
        teacher_targets(model, ids, list(range(b)), cfg, pad_to=capture_batch)
        sync()
        rows.append({"batch": b, "padded_to": max(b, capture_batch), "graphs": counters["stats"]["unique_graphs"],
                     "s": time.perf_counter() - start})
    steady = len({r["graphs"] for r in rows[:-1]}) == 1
    print(table(f"Capture graphs, {s.model} at {s.seq} tokens, CAPTURE_BATCH={capture_batch}: "
                f"{'one set of graphs for every batch ≤ CAPTURE_BATCH' if steady else 'RECOMPILED below CAPTURE_BATCH'}",
                rows))
    torch._dynamo.reset()
    return {"rows": rows, "steady": steady}


def head_regime(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """Stage one's head at the 27B's shape (V = 256,000, H = 4608, bf16 on a GPU), four chunks of 8192
    positions per batch: the head before issue 21 (each chunk's bf16 product beside its float32 copy, the
    previous chunk's buffer alive during the next matmul) against `pipeline.topk.head_chunks`. Peak above
    the weights and hidden states, as a multiple of one float32 [chunk × V] buffer."""
    from types import SimpleNamespace

    from pipeline.model import softcap_
    from pipeline.plan import MemoryTracer
    from pipeline.topk import head_chunks, head_targets

    vocab, hidden_size, chunk = (256000, 4608, 8192) if s.model != "debug" else (s.vocab, 64, 256)
    dtype = teacher_dtype(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, generator=g, device=dev) * 0.05).to(dtype)
    model = SimpleNamespace(head_weight=weight, config=SimpleNamespace(final_logit_softcapping=30.0))
    hidden = torch.randn(4 * chunk, hidden_size, generator=g, device=dev).to(dtype)
    labels = torch.randint(0, vocab, (4 * chunk,), device=dev)
    cfg = TopKConfig(topk=64, samples=0, head_chunk=chunk)

    def before() -> None:
        out = []
        for start in range(0, hidden.shape[0], chunk):
            z = softcap_((hidden[start : start + chunk] @ weight.T).float(), 30.0)
            out.append(head_targets(z, cfg.topk, labels=labels[start : start + chunk]))

    def after() -> None:
        head_chunks(model, hidden, labels, None, cfg)

    rows = []
    for name, fn in (("before (issue 21)", before), ("after", after)):
        with torch.no_grad():
            fn()  # warm-up
            if dev.type == "cuda":
                sync()
                reset_peak(dev)
                base = torch.cuda.memory_allocated()
                fn()
                sync()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                tracer = MemoryTracer()
                with tracer:
                    fn()
                peak = tracer.peak()
        rows.append({"head": name, "peak_gib": peak / 2**30, "buffer_gib": chunk * vocab * 4 / 2**30,
                     "ratio": peak / (chunk * vocab * 4)})
    print(table(f"Head at V={vocab}, H={hidden_size}, {str(dtype).removeprefix('torch.')}, 4 chunks of {chunk}; "
                "ratio = peak / one float32 chunk buffer (target ≤ 1.8)", rows))
    return {"rows": rows}


def data_wait(s: Sizes, dev: torch.device) -> dict[str, Any]:
    """Optimizer steps of grad_accum micro-batches read by the streaming reader as the trainer reads them
    (each when its turn comes, while the prefetch thread reads ahead): the wait per step, and its share."""
    import tempfile

    from benchmarks.reader import write_cache
    from pipeline.reader import ReaderConfig, ShardStream
    from pipeline.train import StudentWithLoss
    from schemas.logits import MODE_COLUMNS, to_torch

    topk, samples = (64, 16) if s.model != "debug" else (8, 4)
    steps = s.steps + 1  # the first compiles
    with tempfile.TemporaryDirectory(prefix="data_wait_") as tmp:
        start = time.perf_counter()
        split = write_cache(Path(tmp), (steps + 1) * s.accum * s.batch, s.seq, s.vocab, topk, samples, shard_windows=32)
        written = time.perf_counter() - start
        model = random_model(s.model, s.vocab, dev)
        model.gradient_checkpointing = True
        model.train()
        wrapped = StudentWithLoss(model, LossConfig(kind="kd", target="sampled", loss_chunk=1024))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
        stream = ShardStream(split, MODE_COLUMNS["sampled"], ReaderConfig(batch_size=s.batch))
        unit = torch.ones((), device=dev)
        rows = []
        for step in range(steps):
            wait, begin = 0.0, time.perf_counter()
            for _ in range(s.accum):
                t = time.perf_counter()
                batch = to_torch(stream.next_batch(), dev)
                wait += time.perf_counter() - t
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    value = wrapped(batch, unit)
                value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            seconds = time.perf_counter() - begin
            rows.append({"step": step, "step_s": seconds, "wait_s": wait, "wait_pct": 100 * wait / seconds,
                         "tok_s": s.accum * s.batch * s.seq / seconds})
        stream.close()
    steady = rows[1:]
    pct = 100 * sum(r["wait_s"] for r in steady) / sum(r["step_s"] for r in steady)
    print(table(f"Data wait: {s.model} student, grad_accum {s.accum} × batch {s.batch} × T {s.seq}, K {topk}, "
                f"N {samples}, streaming reader (cache written in {written:.0f} s); after the first (compiling) step "
                f"{pct:.2f}% of the step waits for data (target ≤ 1%)", rows))
    return {"rows": rows, "wait_pct": pct}


CHECKS = {"student": student_step, "mask": block_mask_cost, "capture": capture_invariance, "graphs": capture_graphs,
          "head": head_regime, "data_wait": data_wait}
DEFAULT = ("student", "mask", "capture", "graphs", "head")  # gpu.sh runs data_wait as its own part


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="toy sizes (debug preset, short rows): runs on the CPU")
    p.add_argument("--only", nargs="+", choices=tuple(CHECKS), default=list(DEFAULT))
    p.add_argument("--work", type=Path, default=Path("runs/gpu"))
    args = p.parse_args()
    dev = device()
    if dev.type != "cuda" and not args.toy:
        p.error("no GPU here: run with --toy for the CPU at toy sizes")
    sizes = TOY if args.toy else GPU
    machine = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    print(f"gpu_checks on {machine}, torch {torch.__version__}, sizes {sizes}")
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "sizes": sizes.__dict__}
    for name in args.only:
        start = time.perf_counter()
        results[name] = CHECKS[name](sizes, dev)
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        reset_peak(dev)
    name = "gpu_checks" + ("" if args.only == list(DEFAULT) else "_" + "_".join(args.only)) + ("_toy" if args.toy else "")
    save(args.work / "bench", name, results)  # gpu.sh's data_wait part writes beside the rest, not over it


if __name__ == "__main__":
    main()
