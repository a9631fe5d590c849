"""Cache v2 storage at a 256k vocabulary: bytes per token vs fidelity vs write speed, on a synthetic teacher
whose distributions look like a real one's where storage is concerned (benchmarks/fidelity.py measures the
same settings on the demo teacher, with students trained from them).

The synthetic teacher (`SyntheticTeacher`):
- V = 256,000 ids, roughly frequency-ordered as in real tokenizers: log-frequency −1.2·log(rank + 20) with
  rank = id·e^N(0, 0.5), so neighbouring ids have similar, not equal, frequencies;
- per position: that unigram prior, Gaussian noise (σ 1; one of 16 noise vectors rolled by a random offset, so
  every position has another tail shape) and a context — 3 strong candidates (boost N(10, 2)) and 40 weak
  ones (N(6, 1.5)) drawn in proportion to frequency^0.8, their boosts scaled by a per-position sharpness
  e^N(0, 0.3) — then Gemma's final soft-cap 30·tanh(z/30);
- which gives (printed with each run) a mean entropy ≈ 2.5 nats (10/50/90%: ≈ 0.3/1.8/5.9, max ≈ 9), top-1
  probability ≈ 0.56, mass outside the top 8 ≈ 0.17 and the top 64 ≈ 0.12, top-8 ids mostly below 1000.
The labels (for `label_logprob`) are drawn from the teacher itself.

Students for the gradient cosine, taken w.r.t. the student's logits: z_s = a·z_t + N(0, σ²), soft-capped:
`far` (a 0.3, σ 2; early in training), `mid` (0.8, 1; KL(p‖q) ≈ 0.6 nats, about what the demo's students
reach) and `near` (0.95, 0.4). A sampled target's per-logit noise does not average out over positions here
(it does in a parameter gradient, benchmarks/fidelity.py), so the closer the student, the lower the cosine of
any stochastic target.

Write speed: `encode` (sort, delta, quantise, Arrow) plus Parquet/zstd on one thread, what stage one's
background thread does per rank, against the GPU capture rates to beat (shared/reference/distillation.md:
one H100, 2B shape 43k, 27B 8.3k tokens/s).

    python -m benchmarks.run --only storage      # or: python -m benchmarks.storage
"""

from __future__ import annotations

import io
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import table
from pipeline.losses import LossConfig, loss_and_grad
from pipeline.shards import parquet_options
from pipeline.topk import head_targets, unique_counts, window_uniforms
from schemas.logits import (
    SIGNAL_COLUMNS,
    TARGET_COLUMNS,
    Encoding,
    Targets,
    decode,
    encode,
    leaf_path,
    logits_schema,
    to_torch,
    write_options,
)

VOCAB = 256_000
T = 128  # positions per synthetic window (one head chunk)
CAPTURE_RATES = {"2B": 43_000, "27B": 8_300}  # tokens/s per H100, forward + top-K (distillation.md)
# (K, N): top-K exact + N draws (outside the top K; K = 0: from the whole distribution).
SETTINGS = [(64, 0), (64, 16), (16, 0), (8, 16), (4, 16), (2, 16), (1, 32), (0, 32), (0, 40), (0, 64), (0, 80)]
V1 = Encoding()  # what version 1 wrote: ids most likely first, float16, no signals
V2 = Encoding("delta", signals=True)
V2_Q8 = Encoding("delta", "q8", 1 / 16, signals=True)
STUDENTS = {"far": (0.3, 2.0), "mid": (0.8, 1.0), "near": (0.95, 0.4)}


def setting_keys() -> list[tuple[int, int, str]]:
    """Each setting with its default sampling (stratified for pure sampling, i.i.d. with a top K), then the
    other sampling for two of them."""
    return [(k, n, "stratified" if k == 0 else "iid") for k, n in SETTINGS] + [(8, 16, "stratified"), (0, 64, "iid")]


@dataclass(frozen=True)
class Meta:
    """What `decode` reads from a cache's metadata."""

    seq_len: int
    topk: int
    samples: int
    id_coding: str
    logprob_coding: str
    logprob_step: float | None
    signals: bool


class SyntheticTeacher:
    def __init__(self, vocab: int = VOCAB, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rank = torch.arange(vocab, dtype=torch.float32)
        self.log_rank = torch.log(rank * torch.exp(torch.randn(vocab, generator=g) * 0.5) + 20)
        self.bank = torch.randn(16, vocab, generator=g)
        self.candidates = torch.softmax(-0.8 * self.log_rank, -1)
        self.vocab, self.seed = vocab, seed

    def logits(self, chunk: int, rows: int = T) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
        which, shift = torch.randint(0, 16, (rows,), generator=g), torch.randint(0, self.vocab, (rows,), generator=g)
        z = torch.empty(rows, self.vocab)
        for i in range(rows):  # a rolled noise vector per row (slices: torch.roll is 50× slower)
            w, s = int(which[i]), int(shift[i])
            z[i, : self.vocab - s], z[i, self.vocab - s :] = self.bank[w, s:], self.bank[w, :s]
        z.sub_(1.2 * self.log_rank)
        sharp = torch.exp(torch.randn(rows, 1, generator=g) * 0.3)
        for count, mean, spread in ((3, 10.0, 2.0), (40, 6.0, 1.5)):
            ids = torch.multinomial(self.candidates, rows * count, replacement=True, generator=g).view(rows, count)
            z.scatter_add_(1, ids, (torch.randn(rows, count, generator=g) * spread + mean) * sharp)
        return z.div_(30).tanh_().mul_(30)

    def labels(self, z: torch.Tensor, chunk: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + chunk)
        return torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)


def student_logits(z: torch.Tensor, name: str, chunk: int) -> torch.Tensor:
    a, sigma = STUDENTS[name]
    g = torch.Generator().manual_seed(10_000 + chunk)
    return (a * z + torch.randn(z.shape, generator=g) * sigma).div_(30).tanh_().mul_(30)


def chunk_targets(z: torch.Tensor, labels: torch.Tensor, k: int, n: int, sampling: str, window: int) -> Targets:
    """One window's targets from logits [T, V] (left intact), as stage one computes them."""
    u = window_uniforms(window, z.shape[0], n, 0, sampling) if n else None
    h = head_targets(z.clone(), k, 1.0, u, None, labels)
    rows = z.shape[0]
    out = Targets(topk_ids=h.top_ids.int().numpy().reshape(1, rows, k), topk_logprobs=h.top_lp.numpy().reshape(1, rows, k),
                  tail_mass=h.tail.numpy().reshape(1, rows), entropy=h.entropy.numpy().reshape(1, rows),
                  label_logprob=h.label.numpy().reshape(1, rows))
    if n:
        out.sample_ids, out.sample_counts, out.sample_offsets = unique_counts(h.draws.numpy(), out.tail_mass.reshape(-1))
    return out


def concat(parts: list[Targets]) -> Targets:
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    out = Targets(topk_ids=cat("topk_ids"), topk_logprobs=cat("topk_logprobs"), tail_mass=cat("tail_mass"),
                  entropy=cat("entropy"), label_logprob=cat("label_logprob"))
    if parts[0].sample_offsets is not None:
        out.sample_ids, out.sample_counts = cat("sample_ids"), cat("sample_counts")
        shifts = np.cumsum([0] + [p.sample_offsets[-1] for p in parts[:-1]])
        out.sample_offsets = np.concatenate([parts[0].sample_offsets[:1]] +
                                            [p.sample_offsets[1:] + s for p, s in zip(parts, shifts)])
    return out


def table_of(targets: Targets, k: int, n: int, encoding: Encoding) -> pa.Table:
    """The target and signal columns of a cache with this encoding (window columns dropped: the token
    shard's, stored anyway)."""
    b, t = targets.tail_mass.shape
    schema = logits_schema(t, k, n, encoding=encoding)
    full = encode(targets, np.arange(b), np.zeros((b, t + 1), np.int32), np.zeros(b, bool), schema, encoding=encoding)
    return full.select([c for c in full.column_names if c in TARGET_COLUMNS + SIGNAL_COLUMNS])


def column_bytes(data: bytes) -> dict[str, int]:
    meta = pq.read_metadata(io.BytesIO(data))
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            top = col.path_in_schema.split(".")[0]
            sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


def write(tbl: pa.Table, options: dict[str, Any]) -> tuple[bytes, float]:
    buf = io.BytesIO()
    start = time.perf_counter()
    pq.write_table(tbl, buf, **options)
    return buf.getvalue(), time.perf_counter() - start


def measure_bytes(targets: Targets, k: int, n: int, encoding: Encoding, options: dict[str, Any] | None = None,
                  repeats: int = 3) -> dict[str, float]:
    """Bytes per position of the target columns (as the report counts them) and of the signals; one thread's
    encode + compress + write rate (median of `repeats`)."""
    positions = targets.tail_mass.size
    times, data, raw = [], b"", 0
    for _ in range(repeats):
        start = time.perf_counter()
        tbl = table_of(targets, k, n, encoding)
        data, _ = write(tbl, options if options is not None else
                        (write_options(tbl.schema) if encoding is not V1 else parquet_options(tbl.schema)))
        times.append(time.perf_counter() - start)
        raw = tbl.nbytes
    seconds = statistics.median(times)
    sizes = column_bytes(data)
    return {"bytes": sum(v for c, v in sizes.items() if c in TARGET_COLUMNS) / positions,
            "signals": sum(v for c, v in sizes.items() if c in SIGNAL_COLUMNS) / positions,
            "tok_s": positions / seconds, "MB_s": raw / seconds / 2**20}


def decoded(targets: Targets, k: int, n: int, encoding: Encoding) -> dict[str, torch.Tensor]:
    """The targets as stage two sees them after a round trip through this encoding: [positions, ...]."""
    tbl = table_of(targets, k, n, encoding)
    meta = Meta(targets.tail_mass.shape[1], k, n, encoding.id_coding, encoding.logprob_coding, encoding.logprob_step,
                encoding.signals)
    columns = ("topk_ids", "topk_logprobs", "tail_mass") + (("sample_ids", "sample_counts") if n else ())
    arrays = {name: np.require(a, requirements="W") for name, a in decode(tbl, columns, meta).items()}
    return {name: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
            for name, t in to_torch(arrays, torch.device("cpu")).items()}


class Cosine:
    """Accumulates ⟨g, g_full⟩, |g|², |g_full|² over chunks."""

    def __init__(self) -> None:
        self.dot = self.a = self.b = 0.0

    def add(self, g: torch.Tensor, full: torch.Tensor) -> None:
        # Row sums in float32 (torch sums pairwise), rows added in float64: no float64 copies of [rows, V].
        self.dot += float((g * full).sum(-1).double().sum())
        self.a += float(g.square().sum(-1).double().sum())
        self.b += float(full.square().sum(-1).double().sum())

    @property
    def value(self) -> float:
        return self.dot / math.sqrt(self.a * self.b) if self.a and self.b else float("nan")


def coarse_kl(exact: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """KL between the top-K + tail-bucket distributions of two versions of the same targets (the effect of
    an encoding's rounding; the tail mass is exact in both)."""
    if exact["topk_ids"].shape[-1] == 0:
        return 0.0
    order_e, order_g = exact["topk_ids"].argsort(-1), got["topk_ids"].argsort(-1)
    lp_e, lp_g = exact["topk_logprobs"].gather(-1, order_e).double(), got["topk_logprobs"].gather(-1, order_g).double()
    return float((lp_e.exp() * (lp_e - lp_g)).sum(-1).mean())


def run(positions: int = 1536, cosine_positions: int = 384) -> dict[str, Any]:
    teacher = SyntheticTeacher()
    chunks = positions // T
    per_setting: dict[tuple[int, int, str], list[Targets]] = {}
    cos: dict[tuple[Any, ...], Cosine] = {}
    kl_uniform: dict[tuple[int, int], list[float]] = {}
    stats: dict[str, list[torch.Tensor]] = {"entropy": [], "top1": [], "tail8": [], "tail64": [], "kl": []}
    keys = setting_keys()
    for c in range(chunks):
        z = teacher.logits(c)
        labels = teacher.labels(z, c)
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        top = logp.topk(64, -1).values.exp()
        stats["entropy"].append(-(p * logp).sum(-1))
        stats["top1"].append(top[:, 0])
        stats["tail8"].append(1 - top[:, :8].sum(-1))
        stats["tail64"].append(1 - top.sum(-1))
        with_grad = c * T < cosine_positions
        students = {}
        if with_grad:
            for name in STUDENTS:
                zs = student_logits(z, name, c)
                q = torch.softmax(zs, -1)
                students[name] = (zs, q - p)  # the full-KD gradient w.r.t. the student's logits: q − p
                if name == "mid":
                    stats["kl"].append((p * (logp - torch.log_softmax(zs, -1))).sum(-1))
        for key in keys:
            k, n, sampling = key
            targets = chunk_targets(z, labels, k, n, sampling, c)
            per_setting.setdefault(key, []).append(targets)
            if n == 0:
                kl_uniform.setdefault((k, n), []).append(_kl_to_uniform_tail(logp, targets, k))
            if with_grad:
                for enc_name, enc in (("v2", V2), ("q8", V2_Q8)):
                    batch = decoded(targets, k, n, enc)
                    for name, (zs, g_full) in students.items():
                        if enc_name == "q8" and name != "mid":
                            continue
                        _, g = loss_and_grad(zs.clone(), batch, LossConfig(target="sampled" if n else "tail"))
                        cos.setdefault((key, enc_name, name), Cosine()).add(g, g_full)
    shape = {name: torch.cat(v) for name, v in stats.items()}
    print(f"\nSynthetic teacher, V = {VOCAB:,}, {positions} positions: entropy mean "
          f"{shape['entropy'].mean():.2f} nats (10/50/90%: "
          f"{', '.join(f'{x:.2f}' for x in torch.quantile(shape['entropy'], torch.tensor([0.1, 0.5, 0.9])).tolist())}; "
          f"max {shape['entropy'].max():.2f}), top-1 p {shape['top1'].mean():.3f}, tail mass outside the top 8 "
          f"{shape['tail8'].mean():.3f}, top 64 {shape['tail64'].mean():.3f}; student 'mid' KL(p‖q) "
          f"{shape['kl'].mean():.2f} nats")
    rows = []
    for key in keys:
        k, n, sampling = key
        targets = concat(per_setting[key])
        v1, v2, q8 = (measure_bytes(targets, k, n, enc) for enc in (V1, V2, V2_Q8))
        exact = decoded(targets, k, n, Encoding("probability", signals=True))
        uniq = len(targets.sample_ids) / targets.tail_mass.size if n else 0.0
        rows.append({"K": k, "N": n, "sampling": sampling if n else "-", "v1_B": v1["bytes"], "v2_B": v2["bytes"],
                     "v2_q8_B": q8["bytes"], "unique_draws": uniq,
                     "KL_full": statistics.fmean(kl_uniform[(k, n)]) if (k, n) in kl_uniform else None,
                     "KL_q8": coarse_kl(exact, decoded(targets, k, n, V2_Q8)),
                     **{f"cos_{s}": cos[(key, "v2", s)].value for s in STUDENTS},
                     "cos_mid_q8": cos[(key, "q8", "mid")].value,
                     "q8_tok_s": q8["tok_s"], "q8_MB_s": q8["MB_s"], "signals_B": q8["signals"]})
    print(table(f"Storage vs fidelity at V = {VOCAB:,} (bytes of the target columns per token: v1 = ids by probability, "
                f"float16, the old Parquet options; v2 = delta ids + byte-stream-split; v2_q8 = + 8-bit log-probs; "
                f"KL_full: full teacher → top K + tail spread uniformly; KL_q8: float32 → 8-bit top K; cosine of the "
                f"gradient w.r.t. the student's logits with full KD's; q8_tok_s: one thread's encode + zstd + write)",
                rows))
    ablation = encodings(concat(per_setting[(64, 16, "iid")]), 64, 16) + \
        encodings(concat(per_setting[(0, 40, "stratified")]), 0, 40)
    print(table("Encodings, one at a time (bytes of the target columns per token; one thread)", ablation))
    arithmetic = storage_arithmetic(rows)
    print("\n".join(arithmetic))
    return {"settings": rows, "encodings": ablation, "arithmetic": arithmetic,
            "teacher": {name: float(v.mean()) for name, v in shape.items()}, "positions": positions}


def _kl_to_uniform_tail(logp: torch.Tensor, targets: Targets, k: int) -> float:
    """KL from the full teacher distribution to the top K with the tail mass spread uniformly."""
    p = logp.exp()
    ids = torch.from_numpy(targets.topk_ids.reshape(-1, k)).long()
    tail = torch.from_numpy(targets.tail_mass.reshape(-1))
    log_recon = (tail / (p.shape[1] - k)).clamp_min(1e-38).log()[:, None].expand(p.shape).clone()
    log_recon.scatter_(1, ids, logp.gather(1, ids))
    return float((p * (logp - log_recon)).sum(-1).double().mean())


def encodings(targets: Targets, k: int, n: int) -> list[dict[str, Any]]:
    """Each encoding choice alone, from version 1's to version 2's and beyond."""
    def options(schema: pa.Schema, split: str = "all", **extra: Any) -> dict[str, Any]:
        base = write_options(schema)
        if split == "floats":
            base["use_byte_stream_split"] = [leaf_path(f) for f in schema if pa.types.is_floating(_leaf_type(f))]
        elif split == "none":
            base["use_byte_stream_split"] = False
        return {**base, **extra}

    ids_leaf = "topk_ids.list.element.list.element" if k else "sample_ids.list.element.list.element"
    variants = [
        ("v1: ids by probability, float16, old options", V1, lambda s: parquet_options(s)),
        ("ids ascending", Encoding("ascending", signals=True), lambda s: options(s, "none")),
        ("delta ids", Encoding("delta", signals=True), lambda s: options(s, "none")),
        ("delta + byte-stream-split floats", V2, lambda s: options(s, "floats")),
        ("delta + byte-stream-split all (v2)", V2, lambda s: options(s)),
        ("v2 + 8-bit log-probs", V2_Q8, lambda s: options(s)),
        ("ascending + DELTA_BINARY_PACKED ids", Encoding("ascending", signals=True), lambda s: dbp(s, ids_leaf)),
        ("v2 + dictionary", V2, lambda s: options(s, "none", use_dictionary=True)),
        ("v2, zstd 1", V2, lambda s: options(s, compression_level=1)),
        ("v2, zstd 9", V2, lambda s: options(s, compression_level=9)),
        ("v2, zstd 19", V2, lambda s: options(s, compression_level=19)),
    ]
    rows = []
    for label, enc, make in variants:
        tbl = table_of(targets, k, n, enc)
        tbl = tbl.select([c for c in tbl.column_names if c in TARGET_COLUMNS])
        opts = make(tbl.schema)
        times = []
        for _ in range(3):
            data, seconds = write(tbl, opts)
            times.append(seconds)
        positions = targets.tail_mass.size
        rows.append({"K": k, "N": n, "encoding": label, "bytes": sum(column_bytes(data).values()) / positions,
                     "write_tok_s": positions / statistics.median(times)})
    return rows


def dbp(schema: pa.Schema, ids_leaf: str) -> dict[str, Any]:
    """Parquet's DELTA_BINARY_PACKED for the ids, byte-stream-split for the rest (per-column encodings exclude
    the global byte-stream-split option)."""
    base = write_options(schema)
    split = base.pop("use_byte_stream_split") or []
    return {**base, "column_encoding": {**{leaf: "BYTE_STREAM_SPLIT" for leaf in split if leaf != ids_leaf},
                                        ids_leaf: "DELTA_BINARY_PACKED"}}


def _leaf_type(field: pa.Field) -> pa.DataType:
    t = field.type
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


def storage_arithmetic(rows: list[dict[str, Any]]) -> list[str]:
    """Cache sizes from the measured bytes per token (target columns; the token ids, ≈2 B/token compressed,
    and the signals come on top)."""
    lines = ["\nStorage arithmetic at V = 256,000 (measured bytes/token × tokens; 1B tokens at B bytes/token = B GB):"]
    for r in rows:
        if (r["K"], r["N"], r["sampling"]) in ((64, 16, "iid"), (64, 0, "-"), (8, 16, "iid"), (0, 40, "stratified"),
                                               (0, 80, "stratified")):
            lines.append(f"  K={r['K']:>2} N={r['N']:>2}: v2 {r['v2_B']:.1f} B/token → {r['v2_B']:.0f} GB per 1B tokens, "
                         f"{2 * r['v2_B']:.0f} TB per 2T; with 8-bit log-probs {r['v2_q8_B']:.1f} B/token → "
                         f"{2 * r['v2_q8_B']:.0f} TB per 2T (v1 {r['v1_B']:.1f} B/token, {2 * r['v1_B']:.0f} TB); "
                         f"one thread writes {r['q8_tok_s']:,.0f} tokens/s "
                         f"({r['q8_tok_s'] / CAPTURE_RATES['2B']:.1f}× the 2B capture rate, "
                         f"{r['q8_tok_s'] / CAPTURE_RATES['27B']:.1f}× the 27B's)")
    return lines


if __name__ == "__main__":
    torch.set_num_threads(2)
    run()
