"""Validation metrics of any Gemma 2 model on a val split, chunk by chunk:

- hard-label cross-entropy and perplexity;
- KL(teacher ‖ student) on the cached target (top-K + tail bucket: the KL of the coarsened distributions,
  a lower bound of the full KL), and top-1 agreement with the teacher;
- expected calibration error (15 equal-width confidence bins, top-1 prediction vs the actual next token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.model import Gemma2
from pipeline.reader import ReaderConfig, ShardStream, open_split
from pipeline.runtime import Runtime
from schemas.logits import EVAL_COLUMNS, MODE_COLUMNS, to_torch
from schemas.tokens import document_ids

BINS = 15


@dataclass
class Sums:
    """Additive statistics, so ranks can reduce them with one all-reduce."""

    tokens: float = 0.0
    ce: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    kd_tokens: float = 0.0

    def __post_init__(self) -> None:
        self.bin_count = torch.zeros(BINS, dtype=torch.float64)
        self.bin_conf = torch.zeros(BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(BINS, dtype=torch.float64)

    def as_tensor(self) -> torch.Tensor:
        head = torch.tensor([self.tokens, self.ce, self.kl, self.top1, self.kd_tokens], dtype=torch.float64)
        return torch.cat([head, self.bin_count, self.bin_conf, self.bin_correct])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Sums:
        s = cls(*t[:5].tolist())
        s.bin_count, s.bin_conf, s.bin_correct = t[5:].view(3, BINS).clone()
        return s

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        out = {"val_ce": self.ce / n, "val_ppl": math.exp(min(self.ce / n, 50.0)), "val_tokens": self.tokens}
        ece = (self.bin_conf - self.bin_correct).abs().sum().item() / n
        out["ece"] = ece
        if self.kd_tokens:
            out["kl_to_teacher"] = self.kl / self.kd_tokens
            out["top1_agreement"] = self.top1 / self.kd_tokens
        return out


@torch.no_grad()
def evaluate(model: Gemma2, val: str | Path, batch_size: int = 16, chunk_tokens: int = 1024, limit: int = 0,
             runtime: Runtime = Runtime(),
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """The first `limit` val windows (0: all) in file order, once; rank r takes every world-th batch and
    the sums are reduced across ranks."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    columns = EVAL_COLUMNS if open_split(val).kind == "logits" else MODE_COLUMNS["ce"]
    stream = ShardStream(val, columns, ReaderConfig(batch_size), shuffle=False)
    total = min(stream.total, limit) if limit else stream.total
    sums = Sums()
    for i in range(math.ceil(total / batch_size)):
        block = stream.next_batch()
        if i % runtime.world != runtime.rank:
            continue
        rows = min(batch_size, total - i * batch_size)
        batch = to_torch({k: v[:rows] for k, v in block.items()}, device)
        _accumulate(model, batch, chunk_tokens, sums)
    reduced = reduce(sums.as_tensor().to(device)).cpu()
    model.train(was_training)
    return Sums.from_tensor(reduced).metrics()


def _accumulate(model: Gemma2, batch: dict[str, torch.Tensor], chunk: int, sums: Sums) -> None:
    ids = batch["input_ids"]
    inputs = ids[:, :-1]
    keep = batch["label_mask"].reshape(-1)  # only the positions that train are evaluated
    hidden = model.hidden_states(inputs, document_ids(inputs)).reshape(-1, model.config.hidden_size)[keep]
    labels = ids[:, 1:].reshape(-1)[keep]
    rows = {name: batch[name].reshape(keep.shape[0], *batch[name].shape[2:])[keep]
            for name in ("topk_ids", "topk_logprobs", "tail_mass") if name in batch}
    for s in range(0, hidden.shape[0], chunk):
        z = model.logits(hidden[s : s + chunk])
        logq = torch.log_softmax(z, -1)
        y = labels[s : s + chunk]
        sums.ce += -logq.gather(-1, y[:, None]).sum().item()
        sums.tokens += y.numel()
        conf, pred = logq.max(-1)
        conf = conf.exp().double().cpu()
        correct = (pred == y).double().cpu()
        bins = (conf * BINS).long().clamp(max=BINS - 1)
        sums.bin_count.index_add_(0, bins, torch.ones_like(conf))
        sums.bin_conf.index_add_(0, bins, conf)
        sums.bin_correct.index_add_(0, bins, correct)
        if rows:
            ids_k = rows["topk_ids"][s : s + chunk]
            lp = rows["topk_logprobs"][s : s + chunk]
            r = rows["tail_mass"][s : s + chunk].clamp(min=0.0)
            p = lp.exp()
            kl = (p * (lp - logq.gather(-1, ids_k))).sum(-1)
            if ids_k.shape[-1] < logq.shape[-1]:
                log_tail_q = torch.logsumexp(logq.scatter(-1, ids_k, float("-inf")), -1)
                kl = kl + torch.where(r > 0, r * (torch.log(r.clamp(min=1e-30)) - log_tail_q), torch.zeros_like(r))
            sums.kl += kl.sum().item()
            sums.top1 += (pred == ids_k[:, 0]).sum().item()
            sums.kd_tokens += y.numel()
