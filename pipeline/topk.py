"""The teacher's next-token targets, computed in token chunks so [batch, seq, vocab] float32 never exists.

Per position: log-softmax of the soft-capped logits in float32, the K most likely ids with their
log-probabilities, the exact mass outside them (summed from the full distribution, not from rounded
log-probs) and, optionally, N draws from the distribution restricted to the ids outside the top K.
Draws use uniforms seeded per window, so they do not depend on batch size, chunking or rank count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model import Gemma2
from pipeline.settings import setting
from schemas.logits import Targets
from schemas.tokens import document_ids


@dataclass(frozen=True)
class TopKConfig:
    topk: int = setting(64, "the teacher's K most likely next tokens kept per position")
    samples: int = setting(0, "draws per position from the distribution outside the top K (0: none)")
    head_chunk: int = setting(2048, "positions per head/softmax chunk: bounds memory at chunk × vocab floats")
    sample_seed: int = setting(0, "seed of the tail draws")


def window_uniforms(window: int, positions: int, samples: int, seed: int) -> torch.Tensor:
    """[T, N] float64 uniforms in [0, 1) that depend only on (seed, window)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{window}".encode()).digest()[:8], "little") >> 1
    return torch.rand(positions, samples, generator=torch.Generator().manual_seed(key), dtype=torch.float64)


@torch.no_grad()
def teacher_targets(model: Gemma2, input_ids: torch.Tensor, windows: list[int], cfg: TopKConfig,
                    mask: torch.Tensor | None = None) -> Targets:
    """input_ids [B, T+1] (window rows, documents masked by their `<bos>`); targets for the T positions that
    have a label. With `mask` [B, T], the head runs only where it is true; other positions hold zeros."""
    b, t = input_ids.shape[0], input_ids.shape[1] - 1
    inputs = input_ids[:, :t]
    hidden = model.hidden_states(inputs, document_ids(inputs)).reshape(b * t, -1)
    keep = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    if keep is not None:
        hidden = hidden[keep]
    uniforms = (torch.cat([window_uniforms(w, t, cfg.samples, cfg.sample_seed) for w in windows])
                if cfg.samples else None)
    if uniforms is not None and keep is not None:
        uniforms = uniforms[keep.cpu()]
    ids, lps, tails, ents, draws = [], [], [], [], []
    for start in range(0, hidden.shape[0], cfg.head_chunk):
        h = hidden[start : start + cfg.head_chunk]
        logp = torch.log_softmax(model.logits(h), dim=-1)
        top_lp, top_i = logp.topk(cfg.topk, dim=-1)
        probs = logp.exp()
        ents.append(-(probs * logp).sum(-1))
        tail_probs = probs.scatter(-1, top_i, 0.0)
        tails.append(tail_probs.sum(-1))
        ids.append(top_i)
        lps.append(top_lp)
        if uniforms is not None:
            draws.append(_draw(tail_probs, uniforms[start : start + h.shape[0]].to(h.device)))
    rows = np.arange(b * t) if keep is None else keep.cpu().numpy()

    def full(parts: list[torch.Tensor], dtype: type, *shape: int) -> np.ndarray:
        out = np.zeros((b * t, *shape), dtype=dtype)
        if parts:
            out[rows] = torch.cat(parts).cpu().numpy()
        return out.reshape(b, t, *shape)

    out = Targets(
        topk_ids=full(ids, np.int32, cfg.topk),
        topk_logprobs=full(lps, np.float16, cfg.topk),
        tail_mass=full(tails, np.float32),
        entropy=full(ents, np.float32),
    )
    if uniforms is not None:
        out.sample_ids, out.sample_counts, out.sample_offsets = unique_counts(
            full(draws, np.int64, cfg.samples).reshape(b * t, cfg.samples), out.tail_mass.reshape(-1))
    return out


def _draw(tail_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from each row of `tail_probs` (unnormalised); ids of zero probability (the top K)
    are never drawn because the CDF does not rise there."""
    cdf = tail_probs.double().cumsum(-1)
    total = cdf[:, -1:]
    # Just under the total: u·total can round up to it for u close to 1.
    picks = torch.searchsorted(cdf, u * total * (1 - 1e-12), right=True)
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

