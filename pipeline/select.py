"""Data selection from the cache: keep or drop positions or windows by the teacher's loss on the realised next
token (−`label_logprob`, nats) or its entropy (nats), two numbers stage one stores per position.

The spec (`train-student --select SPEC`, `make train-student SELECT=SPEC`) is `[drop:]UNIT:SIGNAL:RANGE`:
- UNIT `windows` (a window's value is the mean over its trained positions) or `positions`;
- SIGNAL `loss` or `entropy`;
- RANGE `LO..HI` (either side may be left out), each bound a number of nats or `qF`, the F-quantile of the
  train split's values (over trained positions, or over windows for `windows`);
- what is in the range is kept, or dropped with `drop:`.
Examples: `drop:windows:loss:q0.9..` drops the 10% of windows the teacher finds hardest (the same as
`windows:loss:..q0.9`); `positions:entropy:0.5..` trains only where the teacher's entropy is at least 0.5 nats;
`windows:loss:q0.05..q0.95` keeps the middle 90%. A window with no trained position is always kept (it trains
nothing either way); val is never filtered.

Quantiles come from histograms stage one writes into the manifest's statistics (bins of 1/32 nat, from the
stored float16 values): resolved once at the start, no pass over the cache, exact to within a bin.

Deterministic and resumable: whether a window or position is kept depends only on its own stored values and
the resolved thresholds. Dropped positions have their `label_mask` cleared (the loss is normalised by the
positions that remain); dropped windows are skipped by the reader, whose cursor still counts rows of its fixed
order (kept or not), so a resumed run continues with exactly the rows an uninterrupted one would see, and every
global batch holds `world × batch_size` kept windows (the token budget counts trained windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

HIST_STEP = 1.0 / 32  # nats per histogram bin
HIST_BINS = 2560  # up to 80 nats (a soft-capped teacher's log-probs stay above −2·cap − log V ≈ −72.5); the last
# bin also holds anything beyond
HIST_KEYS = ("position_loss", "position_entropy", "window_loss", "window_entropy")
SIGNALS = {"loss": "label_logprob", "entropy": "entropy"}  # signal → the cache column it is read from
UNITS = ("windows", "positions")
HELP = ("keep or drop training data by the teacher's signals: [drop:]UNIT:SIGNAL:LO..HI with UNIT windows or "
        "positions, SIGNAL loss (−log p_teacher(next token)) or entropy, bounds in nats or qF (F-quantile of the "
        "train split, from the manifest's histograms), either bound optional; e.g. drop:windows:loss:q0.9.. drops "
        "the tenth of the windows the teacher finds hardest (see pipeline/select.py; empty: no selection)")


# --- histograms (written by stage one, summed into the manifest) -------------------------------------------


def histogram(values: np.ndarray) -> np.ndarray:
    """Counts of `values` (nats, ≥ 0) in HIST_BINS bins of HIST_STEP; NaN values are not counted."""
    v = values[~np.isnan(values)].astype(np.float64)
    bins = np.clip(np.floor(v / HIST_STEP), 0, HIST_BINS - 1).astype(np.int64)
    return np.bincount(bins, minlength=HIST_BINS)


def position_values(signal: np.ndarray, signal_name: str) -> np.ndarray:
    """The selection value of each position from its stored column (float16 values, as the reader sees them)."""
    values = signal.astype(np.float16).astype(np.float32)
    return -values if signal_name == "loss" else values


def window_values(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, T] → [B] float32: the mean over each window's trained positions; NaN for a window with none."""
    count = mask.sum(-1)
    total = np.where(mask, values, 0.0).sum(-1, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def batch_histograms(label_logprob: np.ndarray, entropy: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The four histograms of one batch [B, T] (only trained positions count)."""
    out = {}
    for name, column in (("loss", label_logprob), ("entropy", entropy)):
        values = position_values(column, name)
        out[f"position_{name}"] = histogram(values[mask])
        out[f"window_{name}"] = histogram(window_values(values, mask))
    return out


def histograms_to_json(hists: dict[str, np.ndarray]) -> dict[str, Any]:
    """Trailing empty bins dropped."""
    out: dict[str, Any] = {"step": HIST_STEP}
    for key, counts in hists.items():
        nonzero = np.flatnonzero(counts)
        out[key] = counts[: nonzero[-1] + 1 if len(nonzero) else 0].tolist()
    return out


def histograms_from_json(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    if raw.get("step") != HIST_STEP:
        raise PipelineError(f"histogram bins of {raw.get('step')} nats, this version reads {HIST_STEP}; recapture")
    out = {}
    for key in HIST_KEYS:
        counts = np.zeros(HIST_BINS, dtype=np.int64)
        stored = np.asarray(raw.get(key, []), dtype=np.int64)
        counts[: len(stored)] = stored
        out[key] = counts
    return out


def add_histograms(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: a.get(key, 0) + b[key] for key in b}


def quantile(counts: np.ndarray, q: float) -> float:
    """The q-quantile of histogram `counts`, linear within its bin."""
    total = counts.sum()
    if total == 0:
        raise PipelineError("the cache's histogram is empty (no trained positions); nothing to select from")
    cum = np.cumsum(counts)
    target = q * total
    b = int(np.searchsorted(cum, target, side="left"))
    b = min(b, len(counts) - 1)
    before = cum[b - 1] if b else 0
    inside = (target - before) / counts[b] if counts[b] else 0.0
    return float((b + min(max(inside, 0.0), 1.0)) * HIST_STEP)


def fraction_in(counts: np.ndarray, lo: float, hi: float) -> float:
    """The share of the histogram's mass within [lo, hi] (bins split linearly)."""
    edges = np.arange(len(counts) + 1) * HIST_STEP
    overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, HIST_STEP) / HIST_STEP
    return float((counts * overlap).sum() / max(1, counts.sum()))


# --- the spec -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    value: float
    quantile: bool  # value is a fraction F of a quantile qF

    @classmethod
    def parse(cls, text: str, spec: str) -> Bound | None:
        if not text:
            return None
        is_q = text.startswith("q")
        try:
            value = float(text[1:] if is_q else text)
        except ValueError:
            raise PipelineError(f"--select {spec!r}: bound {text!r} is neither a number of nats nor qF") from None
        if (is_q and not 0.0 <= value <= 1.0) or not math.isfinite(value) or value < 0:
            raise PipelineError(f"--select {spec!r}: bound {text!r} out of range (nats ≥ 0, quantiles q0..q1)")
        return cls(value, is_q)


@dataclass(frozen=True)
class Selection:
    """A parsed `--select` spec."""

    spec: str
    unit: str
    signal: str
    lo: Bound | None
    hi: Bound | None
    drop: bool

    @classmethod
    def parse(cls, spec: str) -> Selection | None:
        if not spec:
            return None
        parts = spec.strip().split(":")
        drop = parts[0] == "drop"
        parts = parts[1:] if drop else parts
        if len(parts) != 3 or ".." not in parts[2]:
            raise PipelineError(f"--select {spec!r}: expected [drop:]UNIT:SIGNAL:LO..HI, e.g. drop:windows:loss:q0.9..")
        unit, signal, bounds = parts
        if unit not in UNITS or signal not in SIGNALS:
            raise PipelineError(f"--select {spec!r}: UNIT is one of {', '.join(UNITS)}, SIGNAL one of "
                                f"{', '.join(SIGNALS)}")
        lo_text, _, hi_text = bounds.partition("..")
        lo, hi = Bound.parse(lo_text, spec), Bound.parse(hi_text, spec)
        if lo is None and hi is None:
            raise PipelineError(f"--select {spec!r}: give at least one bound (LO.., ..HI or LO..HI)")
        return cls(spec, unit, signal, lo, hi, drop)

    @property
    def column(self) -> str:
        return SIGNALS[self.signal]

    @property
    def histogram_key(self) -> str:
        return f"{'window' if self.unit == 'windows' else 'position'}_{self.signal}"


@dataclass(frozen=True)
class Thresholds:
    """A selection with its bounds in nats (quantiles resolved against the train split)."""

    selection: Selection
    lo: float
    hi: float
    expected_kept: float  # share of windows (or trained positions) kept, from the histograms

    def keep(self, values: np.ndarray) -> np.ndarray:
        """Which values are kept (NaN, a window without trained positions, always is)."""
        inside = (values >= self.lo) & (values <= self.hi)
        return np.isnan(values) | (~inside if self.selection.drop else inside)

    def keep_windows(self, signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[B, T] stored signal column and label mask → [B] windows kept."""
        return self.keep(window_values(position_values(signal, self.selection.signal), mask))

    def keep_positions(self, signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[B, T] → the label mask with the dropped positions cleared."""
        return mask & self.keep(position_values(signal, self.selection.signal))

    def summary(self) -> dict[str, Any]:
        return {"select": self.selection.spec, "unit": self.selection.unit, "signal": self.selection.signal,
                "lo_nats": self.lo, "hi_nats": self.hi if math.isfinite(self.hi) else None,
                "expected_kept": round(self.expected_kept, 4)}


def resolve(selection: Selection | None, meta: Any, stats: Any, where: Any) -> Thresholds | None:
    """Bounds in nats from the train split's histograms; refuses caches without the signals."""
    if selection is None:
        return None
    if not getattr(meta, "signals", False):
        raise PipelineError(f"{where}: --select {selection.spec!r} needs the teacher's label log-probs and entropies, "
                            "which this cache does not hold (token shards, or a cache made before they were stored); "
                            "recapture it with `make teacher-logits`")
    raw = getattr(stats, "histograms", None)
    if raw is None:
        raise PipelineError(f"{where}: the manifest has no signal histograms; recapture with `make teacher-logits`")
    counts = histograms_from_json(raw)[selection.histogram_key]

    def nats(bound: Bound | None, default: float) -> float:
        if bound is None:
            return default
        return quantile(counts, bound.value) if bound.quantile else bound.value

    lo, hi = nats(selection.lo, 0.0), nats(selection.hi, math.inf)
    if lo > hi:
        raise PipelineError(f"--select {selection.spec!r}: the range is empty ({lo:.3g} > {hi:.3g} nats)")
    inside = fraction_in(counts, lo, hi)
    kept = 1.0 - inside if selection.drop else inside
    if selection.unit == "windows" and kept <= 0.0:
        raise PipelineError(f"--select {selection.spec!r}: keeps no window of {where}; widen the range")
    return Thresholds(selection, lo, hi, kept)
