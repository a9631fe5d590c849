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


# How a batch reaches the model: `forward(fn, batch)` runs `fn(model, batch)`. A trainer passes its wrapped
# (DDP/FSDP) module's forward, so sharded parameters are gathered as in training; plain calls by default.
Forward = Callable[[Callable[[Gemma2, dict[str, torch.Tensor]], torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def evaluate(model: Gemma2, val: str | Path, batch_size: int = 16, chunk_tokens: int = 1024, limit: int = 0,
             runtime: Runtime = Runtime(), forward: Forward | None = None) -> dict[str, float]:
    """The first `limit` val windows (0: all) in file order, once, on the model's device. Global batches of
    world × batch_size windows, rank r decoding and evaluating the r-th slice; every rank runs the same
    number of forwards (a sharded model gathers its layers collectively: a rank with no rows left runs one
    with every position masked) and the sums are reduced across ranks."""
    device = next(model.parameters()).device  # the training device when a trainer calls it
    was_training = model.training
    model.eval()
    columns = EVAL_COLUMNS if open_split(val).kind == "logits" else MODE_COLUMNS["ce"]
    sums = Sums()
    step = lambda m, b: _accumulate(m, b, chunk_tokens, sums)  # noqa: E731
    run = forward or (lambda fn, b: fn(model, b))
    # In file order nothing is shuffled: the smallest buffer (one row group) is enough.
    with ShardStream(val, columns, ReaderConfig(batch_size, shuffle_tokens=1), runtime, shuffle=False) as stream:
        total = min(stream.total, limit) if limit else stream.total
        per_step = batch_size * runtime.world
        for i in range(math.ceil(total / per_step)):
            rows = min(batch_size, max(0, total - i * per_step - runtime.rank * batch_size))
            batch = to_torch(stream.next_batch(), device)
            batch["label_mask"][rows:] = False  # past `limit`: evaluated by no one
            run(step, batch)
    reduced = sums.as_tensor().to(device)
    if runtime.world > 1:
        torch.distributed.all_reduce(reduced)
    model.train(was_training)
    return Sums.from_tensor(reduced.cpu()).metrics()


def _accumulate(model: Gemma2, batch: dict[str, torch.Tensor], chunk: int, sums: Sums) -> torch.Tensor:
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
        if rows and rows["topk_ids"].shape[-1]:  # a pure-sampling cache (K = 0) has no top K to compare with
            ids_k = rows["topk_ids"][s : s + chunk]
            lp = rows["topk_logprobs"][s : s + chunk]
            r = rows["tail_mass"][s : s + chunk].clamp(min=0.0)
            p = lp.exp()
            kl = (p * (lp - logq.gather(-1, ids_k))).sum(-1)
            if ids_k.shape[-1] < logq.shape[-1]:
                log_tail_q = torch.logsumexp(logq.scatter(-1, ids_k, float("-inf")), -1)
                kl = kl + torch.where(r > 0, r * (torch.log(r.clamp(min=1e-30)) - log_tail_q), torch.zeros_like(r))
            sums.kl += kl.sum().item()
            # The teacher's top-1: the most likely cached id, whatever order the cache stores its ids in; ids
            # whose stored log-probs tie at the top (float16 rounding) all count.
            at_top = lp == lp.max(-1, keepdim=True).values
            sums.top1 += ((ids_k == pred[:, None]) & at_top).any(-1).sum().item()
            sums.kd_tokens += y.numel()
    return hidden.new_zeros(())  # a tensor, as a wrapped module's forward returns
