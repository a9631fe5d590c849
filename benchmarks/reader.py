"""Streaming reader: rows/s and tokens/s of ShardStream over a top-K cache, against what a student consumes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import table
from pipeline.reader import ReaderConfig, ShardStream
from schemas.logits import MODE_COLUMNS


def run(cache: Path, student_tok_s: float | None, batch: int = 16, seconds: float = 10.0) -> dict[str, Any]:
    rows = []
    for columns, label in ((MODE_COLUMNS["tail"], "top-K + tail"), (MODE_COLUMNS["sampled"], "+ tail draws")):
        try:
            stream = ShardStream(cache, columns, ReaderConfig(batch_size=batch, shuffle_rows=4096))
        except Exception as e:  # a cache without samples
            rows.append({"columns": label, "rows_s": None, "tok_s": None, "vs_student": None, "note": str(e)[:60]})
            continue
        seq = stream.meta.seq_len
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += len(stream.next_batch()["input_ids"])
        rate = n / (time.perf_counter() - start)
        rows.append({"columns": label, "rows_s": rate, "tok_s": rate * seq,
                     "vs_student": rate * seq / student_tok_s if student_tok_s else None, "note": ""})
    print(table(f"Reader over {cache} (shuffled, batch {batch}; student consumes {student_tok_s or 0:,.0f} tok/s)", rows))
    return {"rows": rows, "student_tok_s": student_tok_s}
