"""Progress that stays readable in logs: tqdm bars on a terminal; when stderr is not a terminal (a log file,
a job scheduler), plain lines — one whole line per report, every 10 s and at the end, prefixed with the
bar's name (which carries the rank or worker: `tokenize[3]`) — so several workers or ranks writing to one log
never interleave carriage returns or cursor-movement escape codes."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 10.0


def progress(**kwargs: Any) -> Any:
    if sys.stderr.isatty():
        return tqdm(mininterval=0.5, dynamic_ncols=True, **kwargs)
    return LineProgress(**kwargs)


class LineProgress:
    """tqdm's interface as the stages use it (update, set_postfix, close, a context manager), printing
    plain lines."""

    def __init__(self, desc: str = "", total: float | None = None, initial: float = 0, unit: str = "it",
                 unit_scale: bool = False, disable: bool = False, every_s: float = LOG_EVERY_S,
                 **_: Any) -> None:
        self.desc, self.total, self.n, self.unit, self.scale = desc, total, initial, unit, unit_scale
        self.disable, self.every_s = disable, every_s
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.postfix = ""
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _count(self, x: float) -> str:
        if not self.scale:
            return f"{x:,.0f}"
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= factor:
                return f"{x / factor:.2f}{suffix}"
        return f"{x:.0f}"

    def _line(self) -> None:
        if self.disable:
            return
        elapsed = max(1e-9, time.monotonic() - self.start)
        done = self._count(self.n) + (f"/{self._count(self.total)}" if self.total else "")
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self._count((self.n - self.start_n) / elapsed)
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{self.unit}{share}, {rate}{self.unit}/s, {elapsed:.0f} s{extra}", file=sys.stderr,
              flush=True)
