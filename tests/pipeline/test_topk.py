"""Teacher targets against a full log_softmax + torch.topk reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import Gemma2, preset
from pipeline.topk import TopKConfig, _draw, teacher_targets, unique_counts, window_uniforms


def peaked_model(vocab: int = 200) -> Gemma2:
    model = Gemma2(preset("debug", vocab_size=vocab), "math")
    model.init_weights(3)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5)
    return model.eval()


def test_topk_and_tail_match_full_softmax():
    model = peaked_model()
    ids = torch.randint(0, 200, (3, 13), generator=torch.Generator().manual_seed(0))
    got = teacher_targets(model, ids, [0, 1, 2], TopKConfig(topk=8, head_chunk=5))  # chunks cut windows
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :12]).float(), dim=-1)
    ref_lp, ref_ids = logp.topk(8, dim=-1)
    assert np.array_equal(got.topk_ids, ref_ids.numpy())
    assert np.allclose(got.topk_logprobs.astype(np.float32), ref_lp.numpy(), atol=2e-2, rtol=1e-3)  # float16
    ref_tail = 1 - ref_lp.exp().sum(-1)
    assert np.allclose(got.tail_mass, ref_tail.numpy(), atol=1e-6)
    assert 0.01 < got.tail_mass.mean() < 0.99  # both parts carry mass in this test
    ref_entropy = -(logp.exp() * logp).sum(-1)
    assert np.allclose(got.entropy, ref_entropy.numpy(), atol=1e-4)
    ref_label = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p of the realised next token
    assert np.allclose(got.label_logprob, ref_label.numpy(), atol=1e-5)


def test_pure_sampling_keeps_no_top_k_and_a_tail_of_exactly_one():
    model = peaked_model()
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 3] = False
    got = teacher_targets(model, ids, [0, 1], TopKConfig(topk=0, samples=12), mask)
    assert got.topk_ids.shape == (2, 8, 0) and got.topk_logprobs.shape == (2, 8, 0)
    assert (got.tail_mass[mask.numpy()] == 1.0).all() and got.tail_mass[1, 3] == 0  # the RS-KD estimator's weight
    position = np.repeat(np.arange(16), np.diff(got.sample_offsets))  # which position each (id, count) is of
    counts = np.bincount(position, weights=got.sample_counts, minlength=16)
    assert (counts.reshape(2, 8)[mask.numpy()] == 12).all() and counts.reshape(2, 8)[1, 3] == 0


def test_a_cache_needs_top_k_or_draws():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="--topk 0 --samples 0: a cache needs top-K ids, draws or both"):
        TopKConfig(topk=0)
    with pytest.raises(PipelineError, match="--sampling 'sobol'"):
        TopKConfig(samples=4, sampling="sobol")


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_draws_are_unbiased_and_stratified_ones_vary_less(sampling):
    """Many positions of one distribution, N = 8 draws each: the mean count of every id is N·p (within 5
    standard errors); stratified draws give each likely id ⌊N·p⌋ or ⌈N·p⌉ draws, far below the binomial
    variance N·p·(1 − p) that i.i.d. draws have."""
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(30) * 1.5, -1)
    rows, n = 20_000, 8
    u = torch.cat([window_uniforms(w, 100, n, seed=0, sampling=sampling) for w in range(rows // 100)])
    draws = _draw(probs.expand(rows, 30).contiguous(), u)
    counts = torch.zeros(rows, 30).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float)).double()
    p = probs.double()
    mean, var = counts.mean(0), counts.var(0)
    binomial = n * p * (1 - p)
    assert ((mean - n * p).abs() <= 5 * (binomial / rows).sqrt() + 1e-9).all()  # unbiased either way
    likely = p * n > 0.5
    if sampling == "stratified":
        assert (var[likely] < 0.5 * binomial[likely]).all()
        floor = (n * p).floor()
        assert ((counts >= floor - 1) & (counts <= floor + 2)).all()  # never far from N·p
    else:
        assert (var[likely] > 0.8 * binomial[likely]).all()


def test_k_equal_vocab_has_zero_tail():
    model = peaked_model(vocab=50)
    got = teacher_targets(model, torch.randint(0, 50, (1, 6)), [0], TopKConfig(topk=50, samples=4))
    assert np.all(got.tail_mass == 0)
    assert got.sample_offsets is not None and got.sample_offsets[-1] == 0  # nothing to draw


def test_tail_draws_are_unbiased_and_avoid_the_top_k():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 30) * 2, dim=-1)
    top = probs.topk(5, dim=-1).indices
    tail = probs.scatter(-1, top, 0.0)
    n = 200_000
    draws = _draw(tail, torch.rand(2, n, dtype=torch.float64))
    for row in range(2):
        assert not set(draws[row].tolist()) & set(top[row].tolist())
        freq = torch.bincount(draws[row], minlength=30).double() / n
        expected = tail[row].double() / tail[row].sum()
        # each frequency within 5 standard errors of its probability
        se = (expected * (1 - expected) / n).sqrt() + 1e-12
        assert ((freq - expected).abs() <= 5 * se + 1e-9).all()


def test_samples_are_seeded_per_window_not_per_batch():
    model = peaked_model()
    ids = torch.randint(0, 200, (4, 9), generator=torch.Generator().manual_seed(1))
    cfg = TopKConfig(topk=4, samples=16, head_chunk=7)
    whole = teacher_targets(model, ids, [10, 11, 12, 13], cfg)
    parts = [teacher_targets(model, ids[i : i + 1], [10 + i], cfg) for i in range(4)]
    assert np.array_equal(whole.sample_ids, np.concatenate([p.sample_ids for p in parts]))
    assert np.array_equal(whole.sample_counts, np.concatenate([p.sample_counts for p in parts]))
    assert whole.sample_counts.sum() == 4 * 8 * 16
    assert not torch.equal(window_uniforms(1, 8, 4, 0), window_uniforms(2, 8, 4, 0))


def test_unique_counts_matches_numpy_unique():
    rng = np.random.default_rng(0)
    draws = np.sort(rng.integers(0, 6, size=(7, 10)), axis=1)
    tail = np.ones(7)
    tail[3] = 0
    values, counts, offsets = unique_counts(draws, tail)
    for row in range(7):
        got_v = values[offsets[row] : offsets[row + 1]]
        got_c = counts[offsets[row] : offsets[row + 1]]
        if row == 3:
            assert len(got_v) == 0
            continue
        ref_v, ref_c = np.unique(draws[row], return_counts=True)
        assert np.array_equal(got_v, ref_v) and np.array_equal(got_c, ref_c)


def test_head_logits_are_model_logits_bit_for_bit():
    """The in-place head keeps the model's one cast order, in float32 and bfloat16."""
    from pipeline.topk import head_logits

    for dtype in (torch.float32, torch.bfloat16):
        model = peaked_model().to(dtype)
        h = model.hidden_states(torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(2)))
        with torch.no_grad():
            z, finite = head_logits(model, h.reshape(18, -1))
            assert torch.equal(z, model.logits(h.reshape(18, -1)))
        assert finite.all()


def _tempered_reference(model, ids, tau):
    """softmax(logits / τ) of every position, the full distribution tempered by hand (plain causal attention:
    the ids hold no <bos>, so the window is one document)."""
    with torch.no_grad():
        return torch.softmax(model(ids[:, :-1]).float() / tau, -1)


def test_temperature_at_capture_matches_a_hand_tempered_softmax():
    model = peaked_model()
    ids = torch.randint(4, 200, (2, 11), generator=torch.Generator().manual_seed(4))
    got = teacher_targets(model, ids, [0, 1], TopKConfig(topk=8, head_chunk=7, temperature=2.5))
    p = _tempered_reference(model, ids, 2.5)
    ref_p, ref_ids = p.topk(8, -1)
    assert np.array_equal(got.topk_ids, ref_ids.numpy())
    assert np.allclose(got.topk_logprobs.astype(np.float32), ref_p.log().numpy(), atol=2e-2, rtol=1e-3)
    ref_tail = p.scatter(-1, ref_ids, 0.0).sum(-1)
    assert np.allclose(got.tail_mass, ref_tail.numpy(), atol=1e-6)
    plain = teacher_targets(model, ids, [0, 1], TopKConfig(topk=8))
    assert (got.tail_mass > plain.tail_mass + 0.05).mean() > 0.5  # τ > 1 flattens: the test sees the difference
    ref_entropy = -(p * p.log()).sum(-1)
    assert np.allclose(got.entropy, ref_entropy.numpy(), atol=1e-4)


def test_tail_draws_follow_the_tempered_tail():
    """Draws at τ = 2 come from softmax(logits / 2) outside the top K; the τ = 1 tail would fail the check."""
    model = peaked_model()
    ids = torch.randint(4, 200, (1, 5), generator=torch.Generator().manual_seed(6))
    n = 60_000
    got = teacher_targets(model, ids, [3], TopKConfig(topk=8, samples=n, temperature=2.0))

    def within(p_row, top, freq):
        tail = p_row.double().scatter(-1, top, 0.0)
        expected = tail / tail.sum()
        se = (expected * (1 - expected) / n).sqrt() + 1e-12
        return bool(((freq - expected).abs() <= 5 * se + 1e-9).all())

    p2, p1 = _tempered_reference(model, ids, 2.0)[0], _tempered_reference(model, ids, 1.0)[0]
    for pos in range(4):
        lo, hi = got.sample_offsets[pos], got.sample_offsets[pos + 1]
        freq = torch.zeros(200, dtype=torch.float64)
        freq[torch.from_numpy(got.sample_ids[lo:hi]).long()] = torch.from_numpy(got.sample_counts[lo:hi].astype(np.float64))
        assert freq.sum() == n
        top = torch.from_numpy(got.topk_ids[0, pos]).long()
        assert (freq[top] == 0).all()
        assert within(p2[pos], top, freq / n)
        assert not within(p1[pos], top, freq / n)


def test_cache_and_loss_at_a_temperature_match_the_full_tempered_teacher():
    """The cache captured at τ and the loss at the cache's τ give the coarsened cross-entropy between the
    full teacher distribution tempered by hand and the student at τ (× τ²), all sums over the vocabulary."""
    from pipeline.losses import LossConfig, chunked_loss, resolve_temperature

    tau = 2.0
    teacher = peaked_model()
    student = Gemma2(preset("debug", vocab_size=200), "math")
    student.init_weights(11)
    ids = torch.randint(4, 200, (2, 13), generator=torch.Generator().manual_seed(8))
    cache = teacher_targets(teacher, ids, [0, 1], TopKConfig(topk=8, temperature=tau))
    targets = {"labels": ids[:, 1:].reshape(-1), "topk_ids": torch.from_numpy(cache.topk_ids).long().reshape(24, 8),
               "topk_logprobs": torch.from_numpy(cache.topk_logprobs.astype(np.float32)).reshape(24, 8),
               "tail_mass": torch.from_numpy(cache.tail_mass).reshape(24)}
    with torch.no_grad():
        hidden = student.hidden_states(ids[:, :-1]).reshape(24, -1)
        cfg = resolve_temperature(LossConfig(), cache_temperature=tau)
        got = chunked_loss(hidden, student.head_weight, student.config.final_logit_softcapping, targets, cfg)
        p = _tempered_reference(teacher, ids, tau).reshape(24, 200)
        logq = torch.log_softmax(student(ids[:, :-1]).float().reshape(24, 200) / tau, -1)
    in_s = torch.zeros_like(p, dtype=torch.bool).scatter(1, p.topk(8, -1).indices, True)
    ref = -(torch.where(in_s, p * logq, 0.0).sum(-1)
            + torch.where(in_s, 0.0, p).sum(-1) * torch.where(in_s, 0.0, logq.exp()).sum(-1).log())
    assert torch.allclose(got, (ref * tau**2).mean(), rtol=2e-3)  # float16 log-probs in the cache


def _poison(model, row, position, value):
    """A hook that puts `value` into one element of the final hidden state of one (row, position): an inf
    there makes that row's raw logits ±inf (no NaN), which the soft-cap alone would hide."""
    def hook(module, args, out):
        out = out.clone()
        out[row, position, 0] = value
        return out
    return model.model.norm.register_forward_hook(hook)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_name_window_and_position(value):
    """NaN, and inf that the soft-cap would have turned into ±cap, stop the batch at the first such row."""
    from pipeline.errors import PipelineError
    from pipeline.topk import NonFiniteLogits

    model = peaked_model()
    ids = torch.randint(4, 200, (3, 13), generator=torch.Generator().manual_seed(0))
    handle = _poison(model, 1, 5, value)
    try:
        with pytest.raises(NonFiniteLogits, match="window 11, position 5: the teacher's logits are not finite") as e:
            teacher_targets(model, ids, [10, 11, 12], TopKConfig(topk=4, samples=3, head_chunk=7))
        assert isinstance(e.value, PipelineError) and (e.value.window, e.value.position) == (11, 5)
        mask = torch.ones(3, 12, dtype=torch.bool)
        mask[1, 5] = False  # the head skips that position: nothing non-finite reaches the cache
        teacher_targets(model, ids, [10, 11, 12], TopKConfig(topk=4, head_chunk=7), mask)
    finally:
        handle.remove()


HEAD_RATIO_LIMIT = 2.5


@pytest.mark.parametrize("samples", [0, 16])
def test_head_memory_stays_within_the_budget(samples):
    """Peak memory of one head chunk (fresh process, peak resident set above the resident set before; see
    benchmarks/head_memory.py) is at most 2.5 float32 [chunk × vocab] buffers, with or without tail draws."""
    import json
    import subprocess
    import sys

    from tests.stages.helpers import ENV, ROOT

    out = subprocess.run([sys.executable, "-m", "benchmarks.head_memory", "--worker", "ours", "--vocab", "32768",
                          "--chunk", "512", "--samples", str(samples), "--topk", "64"], cwd=ROOT,
                         env={**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True, check=True)
    ratio = json.loads(out.stdout.strip().splitlines()[-1])["ratio"]
    assert 0.9 < ratio <= HEAD_RATIO_LIMIT, ratio  # at least the logits buffer itself: the measurement sees it


@pytest.mark.parametrize("samples", [0, 16])
def test_head_peak_in_the_bf16_several_chunks_regime(samples):
    """A bf16 teacher, four head chunks per batch (stage one's regime on a GPU): the head's own buffers stay
    within 1.8 × one float32 [chunk × vocab] buffer, counted storage by storage on real tensors: each
    chunk's buffer is released before the next matmul, and no bf16 copy of the logits sits beside it."""
    from pipeline.plan import MemoryTracer
    from pipeline.topk import head_chunks

    vocab, chunk = 8192, 64
    model = Gemma2(preset("debug", vocab_size=vocab), "math")
    model.init_weights(0)
    model = model.to(torch.bfloat16).eval()
    hidden = torch.randn(4 * chunk, model.config.hidden_size, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (4 * chunk,))
    uniforms = torch.rand(4 * chunk, samples, dtype=torch.float64) if samples else None
    tracer = MemoryTracer()
    with torch.no_grad(), tracer:
        out = head_chunks(model, hidden, labels, uniforms, TopKConfig(topk=16, samples=samples, head_chunk=chunk))
    assert len(out) == 4
    ratio = tracer.peak() / (chunk * vocab * 4)
    assert 1.0 <= ratio <= 1.8, ratio


def test_float32_logits_of_a_bf16_head_match_the_rounded_product():
    """The CPU's bf16 path (row blocks into one float32 buffer) gives the bf16 product's values."""
    from pipeline.topk import float32_logits

    h = torch.randn(37, 24, dtype=torch.bfloat16)
    w = torch.randn(50, 24, dtype=torch.bfloat16)
    z = float32_logits(h, w)
    assert z.dtype == torch.float32 and torch.allclose(z, (h @ w.T).float(), rtol=1e-2, atol=1e-2)


def test_a_padded_last_batch_gives_the_unpadded_targets():
    """A shard's last batch padded to the capture batch: the forward runs at 5 rows, the head skips the
    padding, and the targets of the 2 real rows are those computed without padding, byte for byte."""
    from tests.conftest import tiny_config

    model = Gemma2(tiny_config(), "math")
    model.init_weights(1)
    model.eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    cfg = TopKConfig(topk=5, samples=6, head_chunk=7)
    shapes = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    plain = teacher_targets(model, ids, [7, 9], cfg, mask)
    padded = teacher_targets(model, ids, [7, 9], cfg, mask, pad_to=5)
    hook.remove()
    assert shapes[0][0] == 2 and shapes[1][0] == 5
    for name in ("topk_ids", "topk_logprobs", "tail_mass", "entropy", "label_logprob", "sample_ids", "sample_counts",
                 "sample_offsets"):
        a, b = getattr(plain, name), getattr(padded, name)
        assert a.shape == b.shape and np.array_equal(a, b), name
    full = teacher_targets(model, ids, [7, 9], cfg, None, pad_to=4)  # no mask: every real position
    assert full.tail_mass.shape == (2, 10) and (full.tail_mass > 0).all()
