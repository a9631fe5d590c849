"""Every loss against a naive full-softmax reference: values and gradients, soft-cap on."""

from __future__ import annotations

import pytest
import torch

from pipeline.losses import LossConfig, chunked_loss

V, H, N, K, CAP = 60, 16, 23, 7, 5.0


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).requires_grad_()
    weight = (torch.randn(V, H, generator=g)).requires_grad_()
    teacher = torch.log_softmax(torch.randn(N, V, generator=g) * 2.5, -1)
    top_lp, top_ids = teacher.topk(K, -1)
    targets = {
        "labels": torch.randint(0, V, (N,), generator=g),
        "topk_ids": top_ids,
        "topk_logprobs": top_lp.half(),  # as stored in the cache
        "tail_mass": 1 - top_lp.exp().sum(-1),
    }
    return hidden, weight, teacher, targets


def naive_logq(hidden, weight, tau=1.0):
    z = CAP * torch.tanh(hidden @ weight.T / CAP)
    return torch.log_softmax(z / tau, -1)


def naive(hidden, weight, t, kind="kd", target="tail", tau=1.0, alpha=1.0):
    """Readable reference: full softmax over the vocabulary, probabilities summed directly."""
    logq = naive_logq(hidden, weight, tau)
    q = logq.exp()
    p = t["topk_logprobs"].float().exp()
    r = t["tail_mass"]
    ce = -naive_logq(hidden, weight).gather(1, t["labels"][:, None]).squeeze(1)
    if kind == "ce":
        return ce.mean()
    if tau != 1.0:
        p, r = p ** (1 / tau), r ** (1 / tau)
        z = p.sum(-1) + r
        p, r = p / z[:, None], r / z
    logq_s = logq.gather(1, t["topk_ids"])
    if target == "renorm":
        kd = -(p / p.sum(-1, keepdim=True) * logq_s).sum(-1)
    elif target == "sampled":
        frac = t["sample_counts"].float() / t["sample_counts"].float().sum(-1, keepdim=True)
        kd = -(p * logq_s).sum(-1) - r * (frac * logq.gather(1, t["sample_ids"])).sum(-1)
    else:
        q_s = q.gather(1, t["topk_ids"]).sum(-1)
        kd = -(p * logq_s).sum(-1) - r * torch.log(1 - q_s)
    return (alpha * kd * tau**2 + (1 - alpha) * ce).mean()


def compare(cfg: LossConfig, targets=None, **naive_kw):
    hidden, weight, _, t = setup()
    t = targets or t
    got = chunked_loss(hidden, weight, CAP, t, cfg)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = naive(h2, w2, t, **naive_kw)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got, ref)
    assert torch.allclose(gh, rh, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw, rw, atol=1e-5, rtol=1e-4)
    return got


@pytest.mark.parametrize("chunk", [4, 1024])
def test_tail_bucket(chunk):
    compare(LossConfig(loss_chunk=chunk))


def test_renormalised():
    compare(LossConfig(target="renorm", loss_chunk=5), target="renorm")


def test_ce():
    compare(LossConfig(kind="ce", loss_chunk=6), kind="ce")


def test_temperature_and_alpha():
    compare(LossConfig(temperature=2.0, alpha=0.7, loss_chunk=9), tau=2.0, alpha=0.7)


def test_sampled_tail():
    _, _, teacher, t = setup()
    g = torch.Generator().manual_seed(5)
    t = dict(t, sample_ids=torch.randint(0, V, (N, 4), generator=g), sample_counts=torch.randint(1, 5, (N, 4), generator=g))
    compare(LossConfig(target="sampled", loss_chunk=8), targets=t, target="sampled")


def test_chunked_equals_unchunked():
    hidden, weight, _, t = setup(1)
    a = chunked_loss(hidden, weight, CAP, t, LossConfig(loss_chunk=3))
    b = chunked_loss(hidden, weight, CAP, t, LossConfig(loss_chunk=N))
    assert torch.allclose(a, b, atol=1e-6)


def test_k_equal_v_with_zero_tail_is_full_soft_ce():
    hidden, weight, teacher, t = setup(2)
    lp, ids = teacher.topk(V, -1)
    full = dict(t, topk_ids=ids, topk_logprobs=lp, tail_mass=torch.zeros(N))
    got = chunked_loss(hidden, weight, CAP, full, LossConfig())
    ref = -(teacher.exp() * naive_logq(hidden, weight)).sum(-1).mean()
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.isfinite(torch.autograd.grad(got, hidden)[0]).all()


def test_sampled_tail_is_unbiased():
    """Draws from the teacher outside the top K: the estimator's mean equals the full soft CE. The loss is
    linear in the counts, so the mean over many draw sets is the loss with their counts added up."""
    hidden, weight, teacher, t = setup(3)
    p = teacher.exp()
    tail = p.scatter(1, t["topk_ids"], 0.0)
    draws = torch.multinomial(tail / tail.sum(-1, keepdim=True), 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(N, V).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float))
    t = dict(t, topk_logprobs=t["topk_logprobs"].float(), sample_ids=torch.arange(V).expand(N, V), sample_counts=counts)
    got = chunked_loss(hidden, weight, CAP, t, LossConfig(target="sampled"))
    ref = -(p * naive_logq(hidden, weight)).sum(-1).mean()
    assert abs(got.item() - ref.item()) / ref.item() < 2e-3


def test_no_grad_path_returns_the_same_value():
    hidden, weight, _, t = setup(4)
    with torch.no_grad():
        a = chunked_loss(hidden, weight, CAP, t, LossConfig(loss_chunk=5))
    assert torch.allclose(a, chunked_loss(hidden, weight, CAP, t, LossConfig(loss_chunk=5)))


PEAK_SCRIPT = """
import sys, torch
from pipeline.losses import LossConfig, chunked_loss
rows, chunk, vocab, dim = map(int, sys.argv[1:])
g = torch.Generator().manual_seed(0)
hidden = torch.randn(rows, dim, generator=g).requires_grad_()
weight = torch.randn(vocab, dim, generator=g).requires_grad_()
t = {"labels": torch.randint(0, vocab, (rows,), generator=g)}
chunked_loss(hidden[:8], weight, 5.0, {"labels": t["labels"][:8]}, LossConfig(kind="ce")).backward()  # warm up
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident set
before = status("VmRSS:")
chunked_loss(hidden, weight, 5.0, t, LossConfig(kind="ce", loss_chunk=chunk)).backward()
print(status("VmHWM:") - before)
"""


def test_peak_memory_follows_chunk_not_tokens_times_vocab():
    """The largest temporary is one chunk of logits: the process's peak memory grows with the chunk size,
    not with the number of rows (a fresh process per measurement; peak RSS above the resident set)."""
    import subprocess
    import sys

    from tests.stages.helpers import ENV, ROOT

    def peak(rows: int, chunk: int) -> int:
        # Large blocks straight from mmap, so the resident set tracks live tensors, not malloc's caches.
        env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(chunk), "32768", "16"],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    full = 4096 * 32768 * 4  # one [rows × vocab] float32 tensor: 512 MiB
    small = peak(rows=4096, chunk=128)
    assert small < full / 4
    assert peak(rows=16384, chunk=128) < small * 1.5 + (16 << 20)  # 4× the rows, about the same peak
    assert peak(rows=4096, chunk=2048) > 4 * small  # 16× the chunk, a much larger peak


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(target="renorm"), LossConfig(target="sampled"),
                                 LossConfig(kind="ce"), LossConfig(temperature=1.7, alpha=0.4)])
def test_closed_form_gradient_equals_autograd_of_the_plain_loss(cfg):
    from pipeline.losses import loss_and_grad, row_losses

    _, _, _, t = setup(6)
    g = torch.Generator().manual_seed(7)
    t = dict(t, sample_ids=torch.randint(0, V, (N, 3), generator=g), sample_counts=torch.randint(0, 4, (N, 3), generator=g))
    z = (torch.randn(N, V, generator=g) * 3).requires_grad_()
    rows = row_losses(z, t, cfg)
    (ref,) = torch.autograd.grad(rows.sum(), z)
    got_rows, got = loss_and_grad(z.detach(), t, cfg)
    assert torch.allclose(got_rows, rows.detach(), atol=1e-5)
    assert torch.allclose(got, ref, atol=1e-5)
