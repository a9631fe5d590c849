"""Progress bars that stay readable in logs: frequent on a terminal, every 10 s otherwise."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress(**kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.5 if interactive else 10.0, dynamic_ncols=True, **kwargs)
