"""Teacher targets against a full log_softmax + torch.topk reference."""

from __future__ import annotations

import numpy as np
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
