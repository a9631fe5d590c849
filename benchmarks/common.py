"""Timing, memory and table helpers shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `fn` after warm-up (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """The device's dense peak: the datasheet figure on an H100/H200, a measured large matmul elsewhere."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if "H100" in name or "H200" in name:
            return (989e12 if dtype in (torch.bfloat16, torch.float16) else 67e12), f"{name} datasheet dense peak"
    n = 2048 if device().type == "cpu" else 8192
    a = torch.randn(n, n, device=device(), dtype=dtype)
    seconds = timed(lambda: a @ a, repeats=3)
    return 2 * n**3 / seconds, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def table(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"\n{title}\n  (nothing measured)\n"
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  " + "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([f"\n{title}", line(keys), line(["-" * w for w in widths]), *map(line, cells)]) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v) if v is not None else "-"


def save(out: Path, name: str, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
