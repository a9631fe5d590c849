"""All benchmarks; each prints a table and writes JSON under <work>/bench/.

CPU (`make bench`): the demo shapes. GPU (`--gpu`, what benchmarks/gpu.sh runs): gemma-2-2b and gemma-2-9b
shapes at SEQ_LEN 4096 (and gemma-2-27b with --with-27b), the student step at the 2B shape, 8192 tokens,
V = 256000."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from benchmarks import fidelity, filters, reader, restart, storage, student_step, teacher
from benchmarks import tokenize as tokenize_bench
from benchmarks.common import save
from pipeline.layout import Layout
from pipeline.tokenizer import Tokenizer


def _tokenizer(work: Path) -> Tokenizer:
    for path in (work / "tokenizer" / "tokenizer.model", work / "logits" / "tokenizer.model"):
        if path.is_file():
            return Tokenizer.load(path)
    from itertools import islice

    from pipeline.corpus import CorpusSpec, iter_documents

    # No run yet: a tokenizer trained on a slice of the stdlib (the benchmarks use random token ids anyway).
    return Tokenizer.train((t for _, t in islice(iter_documents(CorpusSpec("stdlib")), 200)), vocab_size=4096)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--work", type=Path, default=Path("runs/demo"))
    p.add_argument("--gpu", action="store_true", help="the GPU shapes (needs CUDA)")
    p.add_argument("--with-27b", action="store_true")
    p.add_argument("--only", nargs="+", choices=("teacher", "student", "reader", "fidelity", "storage", "tokenize",
                                                 "restart", "filters"))
    p.add_argument("--big-gb", type=float, default=1.0, help="tokenize: size of the single-file corpus")
    p.add_argument("--restart-shards", type=int, default=100_000, help="restart: shards of the synthetic cache")
    p.add_argument("--filter-documents", type=int, default=100_000, help="filters: documents of the synthetic corpus")
    args = p.parse_args()
    out = Layout(args.work).bench
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"benchmarks on {machine}, torch {torch.__version__}")
    only = set(args.only or ("teacher", "student", "reader", "fidelity", "storage", "tokenize", "restart", "filters"))
    start = time.perf_counter()
    tok = _tokenizer(args.work)
    student_tok_s = None
    if "teacher" in only:
        shapes = ([("gemma-2-2b", 4096, 4), ("gemma-2-9b", 4096, 2)] + ([("gemma-2-27b", 4096, 1)] if args.with_27b else [])
                  if args.gpu else [("demo-teacher", 128, 16)])
        save(out, "teacher", {"machine": machine, **teacher.run(shapes, tok)})
    if "student" in only:
        # The demo student, then (CPU) the same shape at a 32k vocabulary, where the full logits dominate memory.
        shapes = ([("gemma-2-2b", 256000, 4096, 2, 1024)] if args.gpu else
                  [("demo-student-m", 4096, 128, 16, 1024), ("demo-student-m", 32768, 128, 16, 256)])
        results = [student_step.run(*shape) for shape in shapes]
        save(out, "student_step", {"machine": machine, "runs": results})
        kd = next((r for r in results[0]["rows"] if r["mode"] == "kd" and r["tok_s"]), None)
        student_tok_s = kd["tok_s"] if kd else None
    if "reader" in only:
        cache = args.work / "logits" / "train"
        if not (cache / "manifest.json").is_file():
            print(f"\nReader: no cache at {cache}; run `make demo` (or `make teacher-logits`) first")
        else:
            save(out, "reader", {"machine": machine, **reader.run(cache, student_tok_s)})
    if "fidelity" in only:
        if not (args.work / "teacher" / "config.json").is_file() or not (args.work / "logits" / "val" / "manifest.json").is_file():
            print(f"\nStorage vs fidelity: needs the demo teacher and its val cache in {args.work}; run `make demo` first")
        else:
            result = fidelity.run(args.work / "teacher", args.work / "logits" / "val", args.work / "students" / "s-kd",
                                  summary=args.work / "report" / "summary.json")
            save(out, "fidelity", {"machine": machine, **result})
    if "storage" in only and not args.gpu:  # the 256k synthetic teacher: CPU work, independent of any run
        save(out, "storage", {"machine": machine, **storage.run()})
    if "tokenize" in only and not args.gpu:
        save(out, "tokenize", {"machine": machine, **tokenize_bench.run(tok, args.big_gb)})
    if "restart" in only and not args.gpu:  # stage one's control plane: CPU and file-system work
        save(out, "restart", {"machine": machine, **restart.run(tok, args.restart_shards),
                              "verify": restart.verify_rates()})
    if "filters" in only and not args.gpu:  # the partitioned duplicate filters: CPU and file-system work
        result = filters.run(args.filter_documents)
        print(f"\nFilters: {result['documents']:,} documents, {result['partitions']} partitions: "
              f"{result['docs_per_s']['partitions']:,} documents/s deciding, peak {result['peak_partition_mb']} MB "
              f"of {result['memory_mb']} MB, {result['record_bytes_on_disk_per_doc']} B/document of records")
        save(out, "filters", {"machine": machine, **result})
    print(f"\nbenchmarks done in {time.perf_counter() - start:.0f} s; JSON in {out}")


if __name__ == "__main__":
    main()
