"""The teacher's next-token targets, computed in token chunks so [batch, seq, vocab] float32 never exists.

Per position: log-softmax of the soft-capped logits divided by the temperature τ, in float32, the K most
likely ids with their log-probabilities, the exact mass outside them (summed from the full distribution, not
from rounded log-probs), the entropy, the log-probability of the realised next token (the label) and,
optionally, N draws from the distribution restricted to the ids outside the top K (K = 0: from the whole
distribution, pure sampling). Draws use uniforms seeded per window, so they do not depend on batch size,
chunking or rank count. They are inverse-CDF draws, i.i.d. or stratified (draw j's uniform taken in
[j/N, (j+1)/N)): each draw still lands on id x with overall frequency p_x, so the counts stay unbiased
(E[c_x] = N·p_x), but an id with p_x ≥ 1/N gets ⌊N·p_x⌋ or ⌈N·p_x⌉ draws instead of a binomial number — far
less variance where the mass is. That pays for pure sampling (K = 0), where the head is drawn too, and not
measurably for draws from a flat tail outside a top K (benchmarks/storage.py), so i.i.d. stays the default.

Memory: one chunk's float32 logits [c, V] is the only full-size buffer, and only one exists at a time (each
is released before the next chunk's matmul; on CUDA a bf16 teacher's matmul writes float32 directly, so no
bf16 copy sits beside it). It is transformed in place (soft-cap, τ, log-softmax, then probabilities, then
the tail with the top K zeroed); whatever needs a temporary of the row width (the sum of exponentials, the
entropy, the float64 cumulative sums of the draws) walks the chunk in row sub-chunks of c/8 rows, one
sub-chunk's temporary at a time. benchmarks/head_memory.py measures the peak, `make plan` traces it.

Numerics guard: a row whose logits hold a NaN or inf raises `NonFiniteLogits` naming its window and position;
nothing of the batch is returned. The test is cheap, per-row reductions: the raw logits' max and min before
the soft-cap (tanh would turn ±inf into ±cap) and the log-sum-exp and top values after.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.model import FLOAT32_MM_DEVICES, Gemma2, float32_mm, softcap_
from pipeline.settings import setting
from schemas.logits import Targets
from schemas.tokens import document_ids

SUB_CHUNKS = 8  # row sub-chunks per head chunk: temporaries of the row width stay at c/8 rows
SAMPLINGS = ("stratified", "iid")


@dataclass(frozen=True)
class TopKConfig:
    topk: int = setting(64, "the teacher's K most likely next tokens kept per position (0: none, pure sampling: "
                            "needs --samples)")
    samples: int = setting(0, "draws per position from the distribution outside the top K (0: none; with --topk 0 "
                              "from the whole distribution)")
    head_chunk: int = setting(2048, "positions per head/softmax chunk: the head's peak memory is about 1.15 (1.25 "
                                    "with tail draws) × chunk × vocab float32 (make plan; benchmarks/head_memory.py)")
    sample_seed: int = setting(0, "seed of the tail draws")
    sampling: str = setting("iid", "how the N draws are made: iid (N independent draws) or stratified (draw j from "
                                   "the j-th N-th of the distribution: unbiased, less variance where single ids "
                                   "carry ≥ 1/N of the mass: pure sampling; the compact preset uses it)",
                            choices=SAMPLINGS)
    temperature: float = setting(1.0, "τ: the cache holds softmax(logits / τ) (top-K log-probs, tail mass, tail "
                                      "draws) and records τ; stage two then trains at that τ")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise PipelineError(f"--temperature {self.temperature}: must be a finite number > 0")
        if self.head_chunk < 1:
            raise PipelineError(f"--head-chunk {self.head_chunk}: must be >= 1")
        if self.sampling not in SAMPLINGS:
            raise PipelineError(f"--sampling {self.sampling!r}: use one of {', '.join(SAMPLINGS)}")
        if self.topk < 0 or self.samples < 0 or self.topk + self.samples == 0:
            raise PipelineError(f"--topk {self.topk} --samples {self.samples}: a cache needs top-K ids, draws or both "
                                "(--topk 0 is pure sampling and needs --samples N > 0)")


class NonFiniteLogits(PipelineError):
    """The teacher produced a NaN or inf logit for this window and position."""

    def __init__(self, window: int, position: int) -> None:
        super().__init__(f"window {window}, position {position}: the teacher's logits are not finite (NaN or inf)")
        self.window, self.position = window, position


@dataclass
class HeadTargets:
    """One head chunk's targets (torch, on the chunk's device)."""

    top_lp: torch.Tensor  # [c, K] float32
    top_ids: torch.Tensor  # [c, K] int64
    tail: torch.Tensor  # [c] float32
    entropy: torch.Tensor  # [c] float32
    finite: torch.Tensor  # [c] bool: the row's log-sum-exp and top values are finite
    label: torch.Tensor | None = None  # [c] float32: log-probability of the row's label
    draws: torch.Tensor | None = None  # [c, N] int64, sorted per row


def window_uniforms(window: int, positions: int, samples: int, seed: int, sampling: str = "iid") -> torch.Tensor:
    """[T, N] float64 uniforms in [0, 1) that depend only on (seed, window); `stratified`: the j-th of each row
    in [j/N, (j+1)/N)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{window}".encode()).digest()[:8], "little") >> 1
    u = torch.rand(positions, samples, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
    if sampling == "stratified":
        u = u.add_(torch.arange(samples, dtype=torch.float64)).div_(samples)
    return u


def float32_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weightᵀ as one float32 [c, V] buffer and nothing beside it. float32 weights: the plain matmul. On
    CUDA in bf16 the matmul writes float32 itself (`torch.mm(..., out_dtype=torch.float32)`): no bf16 copy
    of the logits, and no bf16 rounding of them before the float32 softmax. Elsewhere (a CPU in bf16) the
    bf16 product is made `SUB_CHUNKS` row blocks at a time into the float32 buffer, so the bf16 copy is an
    eighth of it (those logits are bf16-rounded)."""
    if h.dtype == torch.float32:
        return h @ weight.T
    if h.device.type in FLOAT32_MM_DEVICES:
        return float32_mm(h, weight.T)
    z = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
    sub = sub_rows(h.shape[0])
    for r in range(0, h.shape[0], sub):
        z[r : r + sub] = h[r : r + sub] @ weight.T
    return z


def head_logits(model: Gemma2, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.logits(h)`'s cast order (the tied head's matmul, float32 logits, then the final soft-cap in
    float32), the soft-cap applied in place: one float32 [c, V] buffer (`float32_logits`). The same values
    in float32; in bf16 on CUDA the logits are not rounded to bf16 first, as `model.logits`' are. Also [c]
    bool: the row was finite before the soft-cap."""
    z = float32_logits(h, model.head_weight)
    finite = torch.isfinite(z.amax(dim=-1)) & torch.isfinite(z.amin(dim=-1))  # NaN propagates through both
    return softcap_(z, model.config.final_logit_softcapping), finite


def sub_rows(rows: int) -> int:
    return max(1, -(-rows // SUB_CHUNKS))


def head_targets(z: torch.Tensor, k: int, temperature: float = 1.0, uniforms: torch.Tensor | None = None,
                 finite: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> HeadTargets:
    """Targets of float32 logits z [c, V], which this overwrites (it ends holding the tail probabilities).
    `finite`: rows already known to be finite (from `head_logits`), combined with this function's own test;
    `labels` [c]: the realised next tokens, whose log-probabilities are read while z holds log-probs."""
    if temperature != 1.0:
        z.div_(temperature)
    sub = sub_rows(z.shape[0])
    lse = _logsumexp_rows(z, sub)
    z.sub_(lse[:, None])  # log-probabilities, in place
    top_lp, top_ids = z.topk(k, dim=-1)
    label = None if labels is None else z.gather(1, labels[:, None].to(z.device)).squeeze(1)
    ok = torch.isfinite(lse) & torch.isfinite(top_lp).all(-1)
    finite = ok if finite is None else ok & finite
    entropy = torch.empty_like(lse)
    for r in range(0, z.shape[0], sub):
        logp = z[r : r + sub]
        p = logp.exp()
        # −Σ p·log p as a batched dot product: no [rows, V] product tensor.
        entropy[r : r + sub] = torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).view(-1).neg_()
        logp.copy_(p)  # z now holds probabilities
        del p  # before the next sub-chunk's exp: one row-width temporary at a time
    tail_probs = z.scatter_(-1, top_ids, 0.0)
    # With K = 0 the tail is the whole distribution: exactly 1, so the sampled loss is the RS-KD estimator.
    tail = tail_probs.sum(-1) if k else torch.ones_like(lse)
    out = HeadTargets(top_lp, top_ids, tail, entropy, finite, label)
    if uniforms is not None:
        out.draws = _draw(tail_probs, uniforms, sub)
    return out


def _logsumexp_rows(z: torch.Tensor, sub: int) -> torch.Tensor:
    """Per-row log-sum-exp; max + log Σ exp(z − max), the exponentials taken `sub` rows at a time. NaN/inf
    anywhere in a row makes its value non-finite (the guard's cheap test)."""
    m = z.amax(dim=-1)
    total = torch.empty_like(m)
    for r in range(0, z.shape[0], sub):
        total[r : r + sub] = (z[r : r + sub] - m[r : r + sub, None]).exp_().sum(-1)
    return total.log_().add_(m)


def teacher_hidden(model: Gemma2, input_ids: torch.Tensor, mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The final hidden states [P, H] and labels [P] of the positions the head runs on (those of `mask`, or
    all), and their flat indices (None: all)."""
    b, t = input_ids.shape[0], input_ids.shape[1] - 1
    inputs = input_ids[:, :t]
    hidden = model.hidden_states(inputs, document_ids(inputs)).reshape(b * t, -1)
    labels = input_ids[:, 1:].reshape(-1)
    keep = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    if keep is not None:
        hidden, labels = hidden[keep], labels[keep]
    return hidden, labels, keep


def head_chunks(model: Gemma2, hidden: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor | None,
                cfg: TopKConfig) -> list[HeadTargets]:
    """The head over `hidden` in `cfg.head_chunk` rows at a time. Each chunk's float32 [c, V] buffer is
    released before the next chunk's matmul, so one such buffer exists at a time."""
    chunks = []
    for start in range(0, hidden.shape[0], cfg.head_chunk):
        h = hidden[start : start + cfg.head_chunk]
        u = None if uniforms is None else uniforms[start : start + h.shape[0]].to(h.device)
        z, finite = head_logits(model, h)
        chunks.append(head_targets(z, cfg.topk, cfg.temperature, u, finite, labels[start : start + h.shape[0]]))
        del z  # before the next matmul: otherwise two [c, V] buffers are alive at once
    return chunks


@torch.no_grad()
def teacher_targets(model: Gemma2, input_ids: torch.Tensor, windows: list[int], cfg: TopKConfig,
                    mask: torch.Tensor | None = None, pad_to: int = 0) -> Targets:
    """input_ids [B, T+1] (window rows, documents masked by their `<bos>`); targets for the T positions that
    have a label. With `mask` [B, T], the head runs only where it is true; other positions hold zeros.
    `pad_to`: a batch of fewer rows (a shard's last) runs the forward at that many, padded with copies of
    its first row that the head skips, so a compiled forward sees one shape per stage; the targets are the B
    real rows'. Raises `NonFiniteLogits` for the first row (in order) whose logits are not finite."""
    b, t = input_ids.shape[0], input_ids.shape[1] - 1
    if b < pad_to:
        real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        mask = torch.cat([real, torch.zeros(pad_to - b, t, dtype=torch.bool, device=real.device)])
        input_ids = torch.cat([input_ids, input_ids[:1].expand(pad_to - b, -1)])
    hidden, labels, keep = teacher_hidden(model, input_ids, mask)  # padded rows are never in `keep`
    uniforms = (torch.cat([window_uniforms(w, t, cfg.samples, cfg.sample_seed, cfg.sampling) for w in windows])
                if cfg.samples else None)
    if uniforms is not None and keep is not None:
        uniforms = uniforms[keep.cpu()]
    chunks = head_chunks(model, hidden, labels, uniforms, cfg)
    rows = np.arange(b * t) if keep is None else keep.cpu().numpy()
    if chunks:
        ok = torch.cat([c.finite for c in chunks]).cpu().numpy()  # one device sync for the whole batch
        if not ok.all():
            flat = int(rows[np.argmin(ok)])
            raise NonFiniteLogits(windows[flat // t], flat % t)

    def full(name: str, dtype: type, *shape: int) -> np.ndarray:
        out = np.zeros((b * t, *shape), dtype=dtype)
        if chunks:
            out[rows] = torch.cat([getattr(c, name) for c in chunks]).cpu().numpy()
        return out.reshape(b, t, *shape)

    out = Targets(
        topk_ids=full("top_ids", np.int32, cfg.topk),
        topk_logprobs=full("top_lp", np.float32, cfg.topk),
        tail_mass=full("tail", np.float32),
        entropy=full("entropy", np.float32),
        label_logprob=full("label", np.float32),
    )
    if uniforms is not None:
        out.sample_ids, out.sample_counts, out.sample_offsets = unique_counts(
            full("draws", np.int64, cfg.samples).reshape(b * t, cfg.samples), out.tail_mass.reshape(-1))
    return out


def _draw(tail_probs: torch.Tensor, u: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Inverse-CDF draws from each row of `tail_probs` (unnormalised); ids of zero probability (the top K)
    are never drawn because the CDF does not rise there. The float64 CDF is built `rows` rows at a time."""
    rows = rows or tail_probs.shape[0]
    picks = torch.empty(u.shape, dtype=torch.long, device=tail_probs.device)
    for r in range(0, tail_probs.shape[0], rows):
        cdf = tail_probs[r : r + rows].double().cumsum_(-1)
        total = cdf[:, -1:]
        # Just under the total: u·total can round up to it for u close to 1.
        picks[r : r + rows] = torch.searchsorted(cdf, u[r : r + rows] * total * (1 - 1e-12), right=True)
        del cdf, total  # before the next block's float64 copy
    return picks.clamp_(max=tail_probs.shape[-1] - 1).sort(dim=-1).values


def unique_counts(draws: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted draws [P, N] → unique ids, counts and per-position offsets; positions with no tail mass get
    an empty list."""
    p, n = draws.shape
    starts = np.ones_like(draws, dtype=bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts[tail <= 0] = False
    flat = np.flatnonzero(starts.reshape(-1))
    values = draws.reshape(-1)[flat].astype(np.int32)
    row_of = flat // n
    ends = np.empty_like(flat)
    ends[:-1] = flat[1:]
    ends[-1:] = p * n
    # A run ends at the next run's start or at the end of its own row, whichever is first.
    ends = np.minimum(ends, (row_of + 1) * n)
    counts = (ends - flat).astype(np.uint16)
    offsets = np.zeros(p + 1, dtype=np.int32)
    np.cumsum(np.bincount(row_of, minlength=p), out=offsets[1:])
    return values, counts, offsets
