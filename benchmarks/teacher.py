"""Teacher throughput: our teacher-logits stage end to end (forward + chunked head + top-K + writing) vs our
forward + top-K alone vs transformers' Gemma2ForCausalLM forward + float32 log_softmax + topk (eager, and
flex_attention on a GPU), on the same random weights."""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import device, peak_flops, sync, table, timed
from pipeline.capture import CaptureConfig
from pipeline.model import Gemma2, preset
from pipeline.shards import ShardWriter
from pipeline.tokenizer import BOS, Tokenizer
from pipeline.topk import TopKConfig, teacher_targets
from schemas.common import with_meta
from schemas.manifest import TokensStats, shard_record, write_manifest
from schemas.tokens import TokensMeta, encode, token_schema


def synthetic_tokens(folder: Path, tokenizer: Tokenizer, vocab: int, seq_len: int, windows: int) -> None:
    """Random token shards in the real format, so the real stage runs on them."""
    rng = np.random.default_rng(0)
    for split, n in (("train", windows), ("val", 1)):
        meta = TokensMeta(seq_len=seq_len, vocab_size=vocab, tokenizer_fingerprint=tokenizer.fingerprint,
                          corpus="synthetic", split=split)
        ids = rng.integers(4, vocab, size=(n, seq_len + 1), dtype=np.int32)
        ids[:, 0] = BOS  # every window starts with <bos>; one document each
        schema = token_schema(seq_len)
        path = folder / split / f"{split}-00000.parquet"
        with ShardWriter(path, with_meta(schema, meta), 1024) as w:
            w.write(encode(np.arange(n), ids, np.zeros(n, bool), schema))
        write_manifest(folder / split, meta, [shard_record(path, n, seq_len, max_id=int(ids.max()))],
                       TokensStats(max_id=int(ids.max())))


def stage_loop(model: Gemma2, tmp: Path, cfg: CaptureConfig, dev: torch.device) -> float:
    """Windows/s of the stage's own shard loop (forward, chunked head, top-K, background compression and
    writing) on a loaded teacher: the stage end to end minus the one-off model load."""
    from pipeline.capture import _capture_shard, expected_meta
    from schemas.manifest import read_manifest

    manifest = read_manifest(tmp / "tokens" / "train", "tokens")
    shard = manifest.shards[0]
    meta = expected_meta(manifest.meta, shard, "bench", model.config.vocab_size, cfg, "train")

    class _Bar:
        def update(self, n: int) -> None:
            pass

    start = time.perf_counter()
    _capture_shard(model, tmp / "tokens" / "train" / shard.file, tmp / "logits" / shard.file, meta, cfg, dev, _Bar())
    sync()
    return shard.rows / (time.perf_counter() - start)


def transformers_topk(ours: Gemma2, ids: torch.Tensor, k: int, attn: str) -> float:
    """transformers' Gemma2ForCausalLM with our weights (copied in), forward + float32 log_softmax + topk."""
    from transformers import Gemma2Config as HFConfig
    from transformers import Gemma2ForCausalLM

    raw = ours.config.to_hf()
    raw.pop("model_type"), raw.pop("architectures")
    dtype = next(ours.parameters()).dtype
    with torch.device(ids.device):
        hf = Gemma2ForCausalLM(HFConfig(**raw, attn_implementation=attn)).to(dtype).eval()
    # Tied head: transformers lists lm_head.weight as missing (it is the embedding); nothing else may be.
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers twin did not take our weights: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()

    @torch.no_grad()
    def step() -> None:
        logits = hf(ids, use_cache=False).logits  # no KV-cache bookkeeping inside the timing
        torch.log_softmax(logits.float(), -1).topk(k, -1).indices.cpu()

    rate = ids.numel() / timed(step, repeats=2)
    hf = None  # free before the next model is built
    if ids.is_cuda:
        torch.cuda.empty_cache()
    return rate


def random_model(cfg: Any, dtype: torch.dtype, dev: torch.device) -> Gemma2:
    """Random weights made on the device itself (a 9B initialised on the CPU would take minutes)."""
    with torch.device("meta"):
        model = Gemma2(cfg).to(dtype)
    model.init_weights(0, dev)
    return model.eval()


def run(shapes: list[tuple[str, int, int]], tokenizer: Tokenizer, k: int = 64) -> dict[str, Any]:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak, peak_note = peak_flops(dtype)
    rows = []
    for name, seq_len, batch in shapes:
        cfg = preset(name, vocab_size=max(preset(name).vocab_size, tokenizer.vocab_size))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ours = random_model(cfg, dtype, dev)
            ids = torch.randint(4, cfg.vocab_size, (batch, seq_len + 1), device=dev)
            top = TopKConfig(topk=k, head_chunk=2048)
            fwd = batch * seq_len / timed(partial(teacher_targets, ours, ids, list(range(batch)), top), repeats=2)
            windows = batch * (8 if dev.type == "cuda" else 16)
            synthetic_tokens(tmp / "tokens", tokenizer, cfg.vocab_size, seq_len, windows)
            e2e = stage_loop(ours, tmp, CaptureConfig(top, batch_size=batch), dev) * seq_len
            row = {"shape": name, "seq": seq_len, "batch": batch, "ours_e2e_tok_s": e2e, "ours_fwd_topk_tok_s": fwd,
                   "e2e/fwd": e2e / fwd}
            hf_ids = ids[:, :seq_len]
            if name != "gemma-2-27b":  # two copies of the 27B do not fit one 80 GB GPU
                row["hf_eager_tok_s"] = transformers_topk(ours, hf_ids, k, "eager")
                row["ours/hf_eager"] = fwd / row["hf_eager_tok_s"]
                if dev.type == "cuda":
                    row["hf_flex_tok_s"] = transformers_topk(ours, hf_ids, k, "flex_attention")
                    row["ours/hf_flex"] = fwd / row["hf_flex_tok_s"]
            row["mfu_fwd"] = 2 * cfg.num_parameters() * fwd / peak
            rows.append(row)
            ours = None  # free before the next shape
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(table(f"Teacher throughput (top-{k}; MFU against {peak_note}: {peak / 1e12:.2f} TFLOP/s)", rows))
    return {"rows": rows, "peak_flops": peak, "peak_note": peak_note}
