"""Every loss against a naive full-softmax reference: values and gradients, soft-cap on."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses import LossConfig, chunked_loss, resolve_temperature

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
    """Readable reference: full softmax over the vocabulary, probabilities summed directly; the targets are
    taken as they are (a cache already holds its τ's distribution), the student at τ."""
    logq = naive_logq(hidden, weight, tau)
    q = logq.exp()
    p = t["topk_logprobs"].float().exp()
    r = t["tail_mass"]
    ce = -naive_logq(hidden, weight).gather(1, t["labels"][:, None]).squeeze(1)
    if kind == "ce":
        return ce.mean()
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


def tempered_teacher(teacher_logp, tau):
    """A cache captured at τ, built by hand from the full teacher distribution: top-K of softmax(l / τ) and
    the mass outside it summed over the complement."""
    p = torch.softmax(teacher_logp / tau, -1)
    top_p, top_ids = p.topk(K, -1)
    return p, top_ids, {"topk_ids": top_ids, "topk_logprobs": top_p.log(),
                        "tail_mass": p.scatter(1, top_ids, 0.0).sum(-1)}


def full_reference(hidden, weight, p_full, ids, labels, tau, alpha, renorm=False):
    """KD at τ against the full tempered teacher, coarsened to S + one tail bucket (or S renormalised): every
    sum taken over the vocabulary; the student's logits / τ, the loss × τ²; CE at τ = 1."""
    logq = naive_logq(hidden, weight, tau)
    in_s = torch.zeros_like(p_full, dtype=torch.bool).scatter(1, ids, True)
    p_s = torch.where(in_s, p_full, 0.0)
    if renorm:
        kd = -(p_s / p_s.sum(-1, keepdim=True) * logq).sum(-1)
    else:
        tail_p = torch.where(in_s, 0.0, p_full).sum(-1)
        tail_q = torch.where(in_s, 0.0, logq.exp()).sum(-1)
        kd = -(p_s * logq).sum(-1) - tail_p * tail_q.log()
    ce = -naive_logq(hidden, weight).gather(1, labels[:, None]).squeeze(1)
    return (alpha * kd * tau**2 + (1 - alpha) * ce).mean()


def compare_full(cfg, targets, p_full, ids, tau, alpha, renorm=False):
    hidden, weight, _, t = setup()
    got = chunked_loss(hidden, weight, CAP, {"labels": t["labels"], **targets}, cfg)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = full_reference(h2, w2, p_full, ids, t["labels"], tau, alpha, renorm)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got, ref)
    assert torch.allclose(gh, rh, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw, rw, atol=1e-5, rtol=1e-4)


def test_temperature_and_alpha_against_a_tempered_full_teacher():
    """A cache captured at τ = 2, trained at the cache's τ (the default): the loss is the coarsened CE
    against the full teacher distribution tempered by hand — the tail bucket as captured, never re-tempered."""
    _, _, teacher, _ = setup()
    p_full, ids, targets = tempered_teacher(teacher, 2.0)
    cfg = resolve_temperature(LossConfig(alpha=0.7, loss_chunk=9), cache_temperature=2.0)
    assert cfg.tau == 2.0
    compare_full(cfg, targets, p_full, ids, 2.0, 0.7)


def test_renorm_re_tempers_the_top_k_exactly():
    """A τ = 1 cache trained with renorm at τ = 2: the target is softmax(l / 2) restricted to S and
    renormalised, taken here from the full distribution tempered by hand."""
    _, _, teacher, _ = setup()
    _, ids, targets = tempered_teacher(teacher, 1.0)
    cfg = resolve_temperature(LossConfig(target="renorm", temperature=2.0, alpha=0.7, loss_chunk=9), 1.0)
    compare_full(cfg, targets, torch.softmax(teacher / 2.0, -1), ids, 2.0, 0.7, renorm=True)


@pytest.mark.parametrize("target", ["auto", "tail", "sampled"])
def test_another_temperature_with_the_tail_is_refused(target):
    with pytest.raises(PipelineError, match=r"--temperature 2: the cache holds the teacher at τ = 1\.5, and its "
                                            r"tail mass and draws cannot be re-tempered"):
        resolve_temperature(LossConfig(target=target, temperature=2.0), cache_temperature=1.5)
    assert resolve_temperature(LossConfig(target=target), 1.5).tau == 1.5  # the cache's τ by default
    assert resolve_temperature(LossConfig(kind="ce", temperature=2.0), 1.5).kind == "ce"
    hidden, weight, _, t = setup()  # an unresolved config reaching the loss is refused there too
    with pytest.raises(PipelineError, match="the tail cannot be re-tempered"):
        chunked_loss(hidden, weight, CAP, t, LossConfig(target="tail", temperature=2.0))


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
                                 LossConfig(kind="ce"), LossConfig(temperature=1.7, teacher_temperature=1.7, alpha=0.4),
                                 LossConfig(target="renorm", temperature=1.7, alpha=0.4)])
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


def pure_sampling_targets(seed: int = 8, draws: int = 12):
    """A K = 0 cache's targets: no top K, tail mass 1, N draws from the whole teacher distribution."""
    _, _, teacher, t = setup(seed)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(teacher.exp(), draws, replacement=True, generator=g)
    ids, counts = [], []
    for row in drawn:
        u, c = row.unique(return_counts=True)
        ids.append(torch.nn.functional.pad(u, (0, draws - len(u))))
        counts.append(torch.nn.functional.pad(c, (0, draws - len(c))))
    return teacher, {"labels": t["labels"], "topk_ids": torch.zeros(N, 0, dtype=torch.long),
                     "topk_logprobs": torch.zeros(N, 0), "tail_mass": torch.ones(N),
                     "sample_ids": torch.stack(ids), "sample_counts": torch.stack(counts).float()}


def test_pure_sampling_is_the_rs_kd_estimator():
    """K = 0: the sampled loss is −Σ_j (c_j/N) log q_{u_j}, written out here with plain loops; values and
    gradients through the chunked path."""
    _, t = pure_sampling_targets()
    hidden, weight, _, _ = setup()
    got = chunked_loss(hidden, weight, CAP, t, LossConfig(target="sampled", loss_chunk=5))
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logq = naive_logq(h2, w2)
    rows = []
    for i in range(N):
        n = t["sample_counts"][i].sum()
        rows.append(-sum(c / n * logq[i, u] for u, c in zip(t["sample_ids"][i], t["sample_counts"][i]) if c > 0))
    ref = torch.stack(rows).mean()
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got, ref)
    assert torch.allclose(gh, rh, atol=1e-5, rtol=1e-4) and torch.allclose(gw, rw, atol=1e-5, rtol=1e-4)


def test_pure_sampling_is_unbiased():
    """Over many draws the RS-KD estimator's value is the full soft cross-entropy."""
    teacher, t = pure_sampling_targets(seed=9, draws=1)
    hidden, weight, _, _ = setup(9)
    p = teacher.exp()
    draws = torch.multinomial(p, 100_000, replacement=True, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(N, V).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float))
    t = dict(t, sample_ids=torch.arange(V).expand(N, V), sample_counts=counts)
    got = chunked_loss(hidden, weight, CAP, t, LossConfig(target="sampled"))
    ref = -(p * naive_logq(hidden, weight)).sum(-1).mean()
    assert abs(got.item() - ref.item()) / ref.item() < 2e-3


def test_a_draws_only_cache_refuses_the_top_k_targets():
    from pipeline.losses import check_target

    for target in ("tail", "renorm"):
        with pytest.raises(PipelineError, match=f"^cache: --kd-target {target} needs top-K targets and this cache "
                                                "holds only draws"):
            check_target(target, 0, "cache")
        check_target(target, 8, "cache")
    check_target("sampled", 0, "cache")


@pytest.mark.parametrize("target", ["tail", "renorm", "sampled"])
def test_uncapped_student_with_an_underflowing_probability_gives_a_finite_loss(target):
    """A student without a final soft-cap (null in its config) whose probability of a cached id underflows to
    0 in float32, where the teacher's weight is 0 too: the loss and its gradient stay finite (no 0 · log 0)."""
    from pipeline.losses import loss_and_grad

    z = torch.tensor([[30.0, 0.0, -200.0, 1.0, 2.0, -1.0]])
    targets = {"topk_ids": torch.tensor([[0, 2]]), "topk_logprobs": torch.tensor([[0.0, -200.0]]),
               "tail_mass": torch.tensor([0.0]), "labels": torch.tensor([0]),
               "sample_ids": torch.tensor([[2]]), "sample_counts": torch.tensor([[1.0]])}
    assert torch.softmax(z, -1)[0, 2] == 0 and torch.exp(targets["topk_logprobs"])[0, 1] == 0
    rows, grad = loss_and_grad(z, targets, LossConfig(target=target))
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    # the loss is the cross-entropy of the one id that carries the teacher's mass
    assert rows.item() == pytest.approx(-torch.log_softmax(z, -1)[0, 0].item(), abs=1e-5)


@pytest.mark.parametrize("gpu_path", [False, True])
def test_tied_embedding_is_cast_once_per_forward_under_autocast(gpu_path):
    """bf16 autocast, eight loss chunks: the [V, H] embedding is cast to bf16 once for the whole loss, and
    on the CUDA path (matmuls writing float32, traced on fake tensors) no [V, H] product is cast back per
    chunk either."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.plan import cuda_head, fake_mode

    vocab, hidden_size = 640, 32
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in ((vocab, hidden_size),
                                                                                   (hidden_size, vocab)):
                casts.append((args[0].dtype, kwargs.get("dtype")))
            return func(*args, **kwargs)

    with fake_mode() if gpu_path else contextlib.nullcontext(), cuda_head() if gpu_path else contextlib.nullcontext():
        weight = torch.nn.Parameter(torch.randn(vocab, hidden_size))
        h = torch.randn(64, hidden_size, requires_grad=True)
        targets = {"labels": torch.zeros(64, dtype=torch.long), "topk_ids": torch.zeros(64, 4, dtype=torch.long),
                   "topk_logprobs": torch.full((64, 4), -2.0), "tail_mass": torch.full((64,), 0.2)}
        with Casts(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_loss(h, weight, 30.0, targets, LossConfig(target="tail", loss_chunk=8))
            loss.backward()
    to_bf16 = [c for c in casts if c == (torch.float32, torch.bfloat16)]
    back = [c for c in casts if c == (torch.bfloat16, torch.float32)]
    assert len(to_bf16) == 1, casts
    if gpu_path:
        assert not back, casts
