"""The duplicate filters' decision at corpus scale (pipeline/filters.py): synthetic sketches of `documents`
documents in units of `unit_docs` (random 64-bit hashes and MinHash signatures; 10% exact copies and 5% near
copies — 10 of 128 signature values changed — of documents up to a few units back), then the steps
`make tokens` runs, here one after the other in this process:

- writing each unit's records by hash (what a sketching worker adds to its unit),
- the hash partitions (each holds at most `--memory-mb`' worth of records; the jobs are independent),
- the groups (each unit's decisions from every partition's drops),

with documents/s of each, the peak traced memory of any one job (tracemalloc: numpy's buffers included) and
its ratio to the budget, the records a partition held against its budget, and the cost at 10^9 documents
computed from the measured rates (marked computed).

`python -m benchmarks.filters --documents 1000000 --memory-mb 64`."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import filters
from pipeline.filters import NUM_PERM, FilterConfig, Layout, band_hashes, lsh_params

FLT = FilterConfig(filters="exact,near").resolve("text")


def synthetic(folder: Path, documents: int, unit_docs: int, seed: int = 0) -> dict[str, float]:
    """Writes every unit's sketch files; returns the counts and the seconds spent writing records."""
    rng = np.random.default_rng(seed)
    bands, rows = lsh_params(FLT.near_threshold or 0.8)
    pool_hash, pool_sig = np.zeros(0, np.uint64), np.zeros((0, NUM_PERM), np.uint32)  # recent documents
    records = seconds = exact = near = 0
    units = math.ceil(documents / unit_docs)
    for unit in range(units):
        n = min(unit_docs, documents - unit * unit_docs)
        hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
        sig = rng.integers(0, 2**32 - 1, (n, NUM_PERM), dtype=np.uint32)
        if len(pool_hash):
            copies = np.flatnonzero(rng.random(n) < 0.10)
            source = rng.integers(0, len(pool_hash), len(copies))
            hashes[copies], sig[copies] = pool_hash[source], pool_sig[source]
            close = np.flatnonzero(rng.random(n) < 0.05)
            close = close[~np.isin(close, copies)]
            source = rng.integers(0, len(pool_hash), len(close))
            sig[close] = pool_sig[source]
            for _ in range(10):
                sig[close, rng.integers(0, NUM_PERM, len(close))] = rng.integers(0, 2**32 - 1, len(close), np.uint32)
            exact, near = exact + len(copies), near + len(close)
        arrays = {"hash": hashes, "length": np.full(n, 1000, np.int64), "blocked": np.zeros(n, bool),
                  "nonempty": np.ones(n, bool), "sig": sig, "bands": band_hashes(sig, bands, rows)}
        start = time.perf_counter()
        records += filters.write_unit(folder, unit, arrays, FLT)["records"]
        seconds += time.perf_counter() - start
        pool_hash = np.concatenate([pool_hash, hashes])[-4 * unit_docs :]
        pool_sig = np.concatenate([pool_sig, sig])[-4 * unit_docs :]
    return {"units": units, "records": records, "write_s": seconds, "exact_planted": exact, "near_planted": near}


def run(documents: int = 100_000, unit_docs: int = 10_000, memory_mb: float = 64.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="filters-bench-") as tmp:
        folder = Path(tmp)
        made = synthetic(folder, documents, unit_docs)
        layout = Layout.plan(made["units"], made["records"], documents, memory_mb)
        tracemalloc.start()
        peaks, held, pairs = [], [], 0
        start = time.perf_counter()
        for part in range(layout.partitions):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            counts = filters.decide_partition(folder, part, layout, FLT)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            held.append(counts["held"])
            pairs += counts["pairs"]
        part_s = time.perf_counter() - start
        start, gather_peak = time.perf_counter(), 0
        for group in range(layout.groups):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            filters.gather_group(folder, group, layout)
            gather_peak = max(gather_peak, tracemalloc.get_traced_memory()[1] - base)
        gather_s = time.perf_counter() - start
        tracemalloc.stop()
        codes = np.concatenate([np.load(filters.decision_path(folder, u)) for u in range(made["units"])])
        disk = sum(p.stat().st_size for p in (folder / "sketch").glob("*.keys.npy"))
    budget = memory_mb * (1 << 20)
    per_doc = {"write": made["write_s"] / documents, "partitions": part_s / documents, "groups": gather_s / documents}
    big = 10**9
    return {
        "documents": documents, "unit_docs": unit_docs, "memory_mb": memory_mb,
        "partitions": layout.partitions, "groups": layout.groups, "records": made["records"],
        "records_budget": layout.budget, "records_held_max": max(held),
        "exact_dropped": int((codes == filters.EXACT).sum()), "near_dropped": int((codes == filters.NEAR).sum()),
        "exact_planted": made["exact_planted"], "near_planted": made["near_planted"], "pairs_verified": pairs,
        "docs_per_s": {k: round(1 / v) for k, v in per_doc.items()},
        "docs_per_s_decision": round(documents / (part_s + gather_s)),
        "peak_partition_mb": round(max(peaks) / 2**20, 2), "peak_partition_of_budget": round(max(peaks) / budget, 3),
        "peak_bytes_per_record_held": round(max(p / max(h, 1) for p, h in zip(peaks, held)), 1),
        "peak_group_mb": round(gather_peak / 2**20, 2),
        "record_bytes_on_disk_per_doc": round(disk / documents, 1),
        "computed_1e9_documents": {
            "cpu_hours": {k: round(v * big / 3600, 1) for k, v in per_doc.items()},
            "records_on_disk_gb": round(disk / documents * big / 1e9),
            "partitions_at_1024_mb": Layout.plan(1, int(made["records"] / documents * big), big, 1024.0).partitions,
            "memory_per_process_mb": memory_mb,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=100_000)
    p.add_argument("--unit-docs", type=int, default=10_000)
    p.add_argument("--memory-mb", type=float, default=64.0)
    args = p.parse_args()
    print(json.dumps(run(args.documents, args.unit_docs, args.memory_mb), indent=1))


if __name__ == "__main__":
    main()
