"""Storage vs fidelity on the demo teacher's val cache: for K and tail draws N, bytes/token on disk, the KL
from the full teacher distribution to the stored target (the tail spread uniformly when there are no draws),
and the cosine between a student's parameter gradient from that target and from the full distribution.
Then the compression choices (id sorting, byte-stream-split, dictionary, zstd level) with write speed."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import table
from pipeline.checkpoint import load_model
from pipeline.losses import LossConfig, row_losses
from pipeline.model import Gemma2
from pipeline.reader import ReaderConfig, ShardStream
from pipeline.shards import parquet_options
from pipeline.topk import TopKConfig, teacher_targets
from schemas.logits import TOPK_COLUMNS, decode, encode, logits_schema, to_torch

KS = (8, 16, 32, 64, 128)
NS = (0, 16, 64)
TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "tail_mass", "sample_ids", "sample_counts")


def _bytes(table: pa.Table, **options: Any) -> tuple[int, float]:
    buf = io.BytesIO()
    start = time.perf_counter()
    pq.write_table(table, buf, **options)
    return buf.tell(), time.perf_counter() - start


def _student_grad(student: Gemma2, ids: torch.Tensor, targets: dict[str, torch.Tensor] | None, full: torch.Tensor | None,
                  cfg: LossConfig) -> torch.Tensor:
    student.zero_grad(set_to_none=True)
    t = ids.shape[1] - 1
    h = student.hidden_states(ids[:, :t]).reshape(-1, student.config.hidden_size)
    z = student.logits(h)
    if full is not None:
        loss = -(full * torch.log_softmax(z, -1)).sum(-1).mean()
    else:
        loss = row_losses(z, targets, cfg).mean()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters()])


def run(teacher_dir: Path, val: Path, student_dir: Path | None, windows: int = 16) -> dict[str, Any]:
    teacher = load_model(teacher_dir, dtype=torch.float32)
    ids_np = ShardStream(val, ("input_ids",), ReaderConfig(windows), shuffle=False).next_batch()["input_ids"]
    ids = torch.as_tensor(ids_np).long()
    if student_dir is not None and (student_dir / "config.json").is_file():
        student = load_model(student_dir, dtype=torch.float32)
    else:
        from pipeline.model import preset

        student = Gemma2(preset("demo-student-s", vocab_size=teacher.config.vocab_size))
        student.init_weights(0)
    with torch.no_grad():
        full = torch.softmax(teacher(ids[:, :-1]).float(), -1).reshape(-1, teacher.config.vocab_size)
    g_full = _student_grad(student, ids, None, full, LossConfig())
    positions = full.shape[0]
    rows = []
    for k in KS:
        for n in NS:
            tt = teacher_targets(teacher, ids, list(range(windows)), TopKConfig(topk=k, samples=n))
            full_table = encode(tt, np.arange(windows), ids_np, logits_schema(ids.shape[1] - 1, k, n))
            table_ = full_table.drop(["window", "input_ids"])
            size, _ = _bytes(table_, **parquet_options(table_.schema))
            columns = TOPK_COLUMNS + ("tail_mass",) + (("sample_ids", "sample_counts") if n else ())
            batch = {name: t.reshape(positions, *t.shape[2:])
                     for name, t in to_torch(decode(full_table, columns, n), torch.device("cpu")).items()}
            row: dict[str, Any] = {"K": k, "N": n, "bytes_per_token": size / positions}
            if n == 0:
                p_s = batch["topk_logprobs"].exp()
                recon = (batch["tail_mass"] / (full.shape[1] - k))[:, None].expand_as(full).clone()
                recon.scatter_(1, batch["topk_ids"], p_s)
                row["kl_full_to_target"] = (full * (full.clamp_min(1e-30).log() - recon.clamp_min(1e-30).log())).sum(-1).mean().item()
                for mode in ("renorm", "tail"):
                    g = _student_grad(student, ids, batch, None, LossConfig(target=mode))
                    row[f"cos_{mode}"] = torch.nn.functional.cosine_similarity(g, g_full, dim=0).item()
                row["cos_sampled"] = None
            else:
                g = _student_grad(student, ids, batch, None, LossConfig(target="sampled"))
                row.update(kl_full_to_target=None, cos_renorm=None, cos_tail=None,
                           cos_sampled=torch.nn.functional.cosine_similarity(g, g_full, dim=0).item())
            rows.append(row)
    print(table(f"Storage vs fidelity ({positions} val positions, vocab {full.shape[1]:,}; gradient cosine of the "
                f"student's parameters vs the full-distribution gradient)", rows))
    return {"rows": rows, "compression": compression(teacher, ids, ids_np, windows)}


def compression(teacher: Gemma2, ids: torch.Tensor, ids_np: np.ndarray, windows: int) -> list[dict[str, Any]]:
    k, n = 64, 16
    tt = teacher_targets(teacher, ids, list(range(windows)), TopKConfig(topk=k, samples=n))
    schema = logits_schema(ids.shape[1] - 1, k, n)
    base = encode(tt, np.arange(windows), ids_np, schema).drop(["window", "input_ids"])
    order = np.argsort(tt.topk_ids, axis=-1, kind="stable")
    tt_sorted = type(tt)(**{**tt.__dict__, "topk_ids": np.take_along_axis(tt.topk_ids, order, -1),
                            "topk_logprobs": np.take_along_axis(tt.topk_logprobs, order, -1)})
    sorted_ = encode(tt_sorted, np.arange(windows), ids_np, schema).drop(["window", "input_ids"])
    positions = tt.tail_mass.size
    default = parquet_options(base.schema)
    variants = [("default: zstd 3, byte-stream-split floats", base, default),
                ("ids sorted within a position", sorted_, default),
                ("no byte-stream-split", base, {**default, "use_byte_stream_split": False}),
                ("dictionary encoding", base, {**default, "use_dictionary": True}),
                ("zstd 1", base, {**default, "compression_level": 1}),
                ("zstd 9", base, {**default, "compression_level": 9}),
                ("zstd 19", base, {**default, "compression_level": 19}),
                ("uncompressed", base, {**{k: v for k, v in default.items() if k != "compression_level"},
                                        "compression": "none"})]
    rows = []
    for label, tbl, opts in variants:
        size, seconds = _bytes(tbl, **opts)
        rows.append({"variant": label, "bytes_per_token": size / positions, "write_MB_s": tbl.nbytes / seconds / 2**20})
    print(table(f"Compression choices (K={k}, N={n}; target columns only)", rows))
    return rows
