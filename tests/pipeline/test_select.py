"""Data selection from the cache's teacher signals: the spec, quantiles from the manifest's histograms, the
reader keeping exactly the windows (or positions) the spec names — every kept window once per epoch, a
resumed stream and several ranks seeing what one uninterrupted process sees — and training with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.errors import PipelineError
from pipeline.losses import LossConfig
from pipeline.reader import Cursor, ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from pipeline.select import HIST_STEP, Selection, histogram, quantile, resolve
from pipeline.topk import TopKConfig
from pipeline.train import OptimConfig, TrainConfig, train
from schemas.manifest import read_manifest
from tests.conftest import trained_positions


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("select") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=4, samples=3), batch_size=5))
    return out


def signals(split):
    """{window: (trained mask, teacher loss, entropy)} read with plain pyarrow (float16 values as stored)."""
    out = {}
    for path in sorted(split.glob("*.parquet")):
        t = pq.read_table(path, columns=["window", "input_ids", "continued", "label_logprob", "entropy"])
        train = trained_positions(torch.tensor(t.column("input_ids").to_pylist()),
                                  torch.tensor(t.column("continued").to_pylist())).numpy()
        loss = -np.array(t.column("label_logprob").to_pylist(), dtype=np.float64)
        entropy = np.array(t.column("entropy").to_pylist(), dtype=np.float64)
        for i, w in enumerate(t.column("window").to_pylist()):
            out[w] = (train[i], loss[i], entropy[i])
    return out


def window_means(split):
    return {w: (v[1][v[0]].mean() if v[0].any() else math.nan) for w, v in signals(split).items()}


def test_spec_grammar_and_one_line_errors():
    s = Selection.parse("drop:windows:loss:q0.9..")
    assert (s.unit, s.signal, s.drop, s.lo.value, s.lo.quantile, s.hi) == ("windows", "loss", True, 0.9, True, None)
    s = Selection.parse("positions:entropy:0.5..2")
    assert (s.unit, s.drop, s.lo.value, s.lo.quantile, s.hi.value, s.hi.quantile) == ("positions", False, 0.5, False,
                                                                                       2.0, False)
    assert Selection.parse("windows:loss:..q0.95").hi.value == 0.95
    assert Selection.parse("") is None
    for bad, message in (("windows:loss", "expected \\[drop:\\]UNIT:SIGNAL:LO..HI"),
                         ("rows:loss:1..", "UNIT is one of windows, positions"),
                         ("windows:perplexity:1..", "UNIT is one of windows, positions, SIGNAL one of loss, entropy"),
                         ("windows:loss:..", "give at least one bound"),
                         ("windows:loss:q1.5..", "bound 'q1.5' out of range"),
                         ("windows:loss:abc..", "bound 'abc' is neither a number of nats nor qF")):
        with pytest.raises(PipelineError, match=f"^--select '{bad}': {message}"):
            Selection.parse(bad)


def test_quantiles_from_a_histogram_are_within_a_bin():
    values = np.random.default_rng(0).gamma(2.0, 1.5, size=20_000)
    counts = histogram(values)
    for q in (0.05, 0.5, 0.9, 0.99):
        # Linear within a bin: a tenth of a bin off here (a bin's lower edge would be up to a whole bin off).
        assert abs(quantile(counts, q) - np.quantile(values, q)) <= HIST_STEP / 10
    assert counts.sum() == len(values) and histogram(np.array([np.nan, 1.0])).sum() == 1


def test_a_window_without_trained_positions_is_always_kept():
    from pipeline.select import Thresholds

    t = Thresholds(Selection.parse("windows:loss:..1"), 0.0, 1.0, 1.0)
    label_logprob = np.full((3, 4), -5.0, dtype=np.float16)  # loss 5: outside the range
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    label_logprob[2] = -0.5
    assert t.keep_windows(label_logprob, mask).tolist() == [False, True, True]
    dropping = Thresholds(Selection.parse("drop:windows:loss:..1"), 0.0, 1.0, 1.0)
    assert dropping.keep_windows(label_logprob, mask).tolist() == [True, True, False]


def test_quantile_bounds_resolve_from_the_manifest(cache):
    manifest = read_manifest(cache / "train", "logits")
    means = np.array([m for m in window_means(cache / "train").values() if not math.isnan(m)])
    t = resolve(Selection.parse("drop:windows:loss:q0.9.."), manifest.meta, manifest.stats, "x")
    assert abs(t.lo - np.quantile(means, 0.9)) <= HIST_STEP + 0.02  # a bin, and the float32 vs float64 mean
    assert t.hi == math.inf and abs(t.expected_kept - 0.9) < 0.03
    with pytest.raises(PipelineError, match="keeps no window"):
        resolve(Selection.parse("windows:loss:79..80"), manifest.meta, manifest.stats, "x")
    with pytest.raises(PipelineError, match="the range is empty"):
        resolve(Selection.parse("windows:loss:3..2"), manifest.meta, manifest.stats, "x")


def kept_windows(split, lo, hi, drop):
    out = set()
    for w, m in window_means(split).items():
        inside = lo <= m <= hi
        if math.isnan(m) or inside != drop:
            out.add(w)
    return out


def test_each_kept_window_once_per_epoch_and_no_dropped_one(cache):
    manifest = read_manifest(cache / "train", "logits")
    t = resolve(Selection.parse("drop:windows:loss:q0.75.."), manifest.meta, manifest.stats, "x")
    expected = kept_windows(cache / "train", t.lo, t.hi, drop=True)
    assert 0.6 * manifest.rows < len(expected) < 0.9 * manifest.rows  # the selection does something
    cfg = ReaderConfig(batch_size=1, shuffle_tokens=16 * 30, seed=3, prefetch=2)
    with ShardStream(cache / "train", ("window", "label_mask"), cfg, select=t) as stream:
        epoch = [int(stream.next_batch()["window"][0]) for _ in range(len(expected))]
        assert stream.cursor.epoch == 0
        again = [int(stream.next_batch()["window"][0]) for _ in range(len(expected))]
    assert sorted(epoch) == sorted(expected) and sorted(again) == sorted(expected)
    assert epoch != again  # the next epoch's order differs


def test_a_resumed_stream_and_two_ranks_see_what_one_process_sees(cache):
    manifest = read_manifest(cache / "train", "logits")
    t = resolve(Selection.parse("windows:entropy:..q0.6"), manifest.meta, manifest.stats, "x")
    columns = ("window", "input_ids", "label_mask", "topk_ids")
    cfg = ReaderConfig(batch_size=6, shuffle_tokens=16 * 40, seed=1, prefetch=3)
    whole = ShardStream(cache / "train", columns, cfg, select=t)
    for _ in range(7):
        whole.next_batch()
    cursor = whole.cursor
    expected = [whole.next_batch() for _ in range(whole.total // 6 + 5)]  # past the end of the epoch
    whole.close()
    resumed = ShardStream(cache / "train", columns, cfg, cursor=Cursor(cursor.epoch, cursor.offset), select=t)
    half = ReaderConfig(batch_size=3, shuffle_tokens=16 * 40, seed=1, prefetch=0)
    ranks = [ShardStream(cache / "train", columns, half, Runtime(rank=r, world=2), Cursor(cursor.epoch, cursor.offset),
                         select=t) for r in range(2)]
    for want in expected:
        got = resumed.next_batch()
        parts = [r.next_batch() for r in ranks]
        for name in columns:
            assert np.array_equal(got[name], want[name]), name
            assert np.array_equal(np.concatenate([p[name] for p in parts]), want[name]), name
    resumed.close()


def test_position_selection_clears_the_label_mask_of_dropped_positions(cache):
    manifest = read_manifest(cache / "train", "logits")
    t = resolve(Selection.parse("positions:entropy:q0.3.."), manifest.meta, manifest.stats, "x")
    reference = signals(cache / "train")
    cfg = ReaderConfig(batch_size=8, shuffle_tokens=16 * 30, seed=0, prefetch=0)
    stream = ShardStream(cache / "train", ("window", "label_mask"), cfg, select=t)
    plain = ShardStream(cache / "train", ("window", "label_mask"), cfg)
    dropped = 0
    for _ in range(10):
        batch, same = stream.next_batch(), plain.next_batch()
        assert np.array_equal(batch["window"], same["window"])  # positions only: the same windows
        for w, mask in zip(batch["window"], batch["label_mask"]):
            train, _, entropy = reference[int(w)]
            assert np.array_equal(mask, train & (entropy >= t.lo))
            dropped += int((train & (entropy < t.lo)).sum())
    assert dropped > 0.1 * 10 * 8 * 16  # about 30% of the trained positions


def test_training_with_a_selection_logs_it_and_refuses_what_it_cannot_do(work, cache, tmp_path):
    fast = TrainConfig(max_tokens=16 * 8 * 10, batch_size=8, save_every_minutes=0, log_every=1, eval_windows=16,
                       select="drop:windows:loss:q0.9..")
    final = train("s", "debug", cache, tmp_path / "s", LossConfig(), OptimConfig(lr=1e-2), fast)
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    selection = next(x["selection"] for x in lines if "selection" in x)
    assert selection["select"] == "drop:windows:loss:q0.9.." and abs(selection["expected_kept"] - 0.9) < 0.03
    assert math.isfinite(final["val_ce"]) and final["tokens"] == 16 * 8 * 10  # the budget counts kept windows
    run_config = json.loads((tmp_path / "s" / "run_config.json").read_text())
    assert run_config["train"]["select"] == "drop:windows:loss:q0.9.."
    plain = json.loads((tmp_path / "s" / "run_config.json").read_text())["train"]
    assert plain  # a run without --select records no `select` key (older runs still resume)
    train("p", "debug", cache, tmp_path / "p", LossConfig(), OptimConfig(), TrainConfig(max_tokens=16 * 8, batch_size=8))
    assert "select" not in json.loads((tmp_path / "p" / "run_config.json").read_text())["train"]
    with pytest.raises(PipelineError, match="--select 'windows:loss:1..' needs the teacher's label log-probs"):
        train("t", "debug", work / "tokens", tmp_path / "t", LossConfig(kind="ce"), OptimConfig(),
              TrainConfig(select="windows:loss:1.."))
