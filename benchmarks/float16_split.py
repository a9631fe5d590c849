"""What byte-stream-split on the float16 columns saves, and what it costs: DuckDB cannot read such a column
("BYTE_STREAM_SPLIT encoding is only supported for FLOAT, DOUBLE, INT32 or INT64"), so a default cache leaves
it off and `--float16-split` turns it on.

On benchmarks/storage.py's synthetic teacher at V = 256,000 (its docstring describes it): compressed bytes
per token of the float16 columns (`topk_logprobs`, `label_logprob`, `entropy`) and of the whole target +
signal set, with and without the split, for the default encoding (delta ids, float16 log-probs) at K 64, N 16
and K 64, N 0; and whether DuckDB reads each file.

    python -m benchmarks.float16_split
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.storage import SyntheticTeacher, T, chunk_targets, column_bytes, concat, table_of
from schemas.logits import Encoding, write_options

FLOAT16_COLUMNS = ("topk_logprobs", "label_logprob", "entropy")


def duckdb_reads(data: bytes) -> bool | None:
    try:
        import duckdb
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.parquet"
        path.write_bytes(data)
        try:
            duckdb.sql(f"select * from '{path}'").fetchall()
            return True
        except duckdb.Error:
            return False


def run(positions: int = 1536) -> list[dict[str, object]]:
    teacher = SyntheticTeacher()
    rows = []
    for k, n in ((64, 16), (64, 0)):
        parts = []
        for c in range(positions // T):
            z = teacher.logits(c)
            parts.append(chunk_targets(z, teacher.labels(z, c), k, n, "iid", c))
        targets = concat(parts)
        encoding = Encoding("delta", signals=True)
        tbl = table_of(targets, k, n, encoding)
        for split in (False, True):
            buf = io.BytesIO()
            pq.write_table(tbl, buf, **write_options(tbl.schema, float16_split=split))
            sizes = column_bytes(buf.getvalue())
            rows.append({"K": k, "N": n, "float16_split": split,
                         "float16_B_per_token": round(sum(sizes.get(c, 0) for c in FLOAT16_COLUMNS) / positions, 2),
                         "all_B_per_token": round(sum(sizes.values()) / positions, 2),
                         "duckdb_reads": duckdb_reads(buf.getvalue())})
    return rows


def main() -> None:
    rows = run()
    for r in rows:
        print(json.dumps(r))
    for k, n in ((64, 16), (64, 0)):
        off, on = (next(r for r in rows if r["K"] == k and r["N"] == n and r["float16_split"] == s) for s in (False, True))
        saved = off["all_B_per_token"] - on["all_B_per_token"]
        print(f"K {k}, N {n}: the split saves {saved:.2f} B/token ({100 * saved / off['all_B_per_token']:.1f}% of "
              f"{off['all_B_per_token']:.2f}); DuckDB reads: without {off['duckdb_reads']}, with {on['duckdb_reads']}")


if __name__ == "__main__":
    main()
