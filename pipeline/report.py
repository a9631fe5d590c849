"""The report: every model in a work directory evaluated on the same val cache, KD students beside their
from-scratch (CE) twins, the cache modes with their bytes per token, and merged models beside their parts.

Writes report/report.md, report/summary.json (one object per model) and report/val_loss.png.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from pipeline.capture import HASH_CACHE
from pipeline.checkpoint import load_config, load_model, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import cached_sha256, read_json, write_json
from pipeline.layout import Layout
from pipeline.runtime import teacher_dtype
from pipeline.train import cache_note, unfinished
from schemas.common import to_json
from schemas.logits import MODE_COLUMNS, TOPK_COLUMNS, WINDOW
from schemas.manifest import Manifest, read_manifest
from schemas.run_config import read_run_config

TARGET_GAP = 0.08  # the Gemma 2 report's order of magnitude: distilled ≥ 8% lower perplexity
COMPACT_TARGET = 0.02  # a student from a compact cache: val CE within 2% of its twin's from the main cache
KD_MODES = ("renorm", "tail", "sampled")


@dataclass(frozen=True)
class Paths:
    """Where the report reads and writes (each overridable; defaults from the work directory's layout)."""

    cache: Path
    teacher: Path
    students: Path
    out: Path

    @classmethod
    def of(cls, layout: Layout) -> Paths:
        return cls(layout.cache, layout.teacher, layout.students, layout.report)


def cached_eval(model_dir: Path, val: Path, teacher: bool = False) -> dict[str, float]:
    """Evaluates a model folder on the val cache once, on the GPU when there is one; the result is kept
    beside the weights, keyed by the weights' and the cache's hashes. Students are evaluated in float32; the
    teacher in the dtype stage one runs it in on this device (bf16 on a GPU: a 27B does not fit in float32)."""
    path = model_dir / "eval.json"
    # Single or sharded weights; their hashes remembered beside the result, so a rerun reads no weights.
    # The teacher's weight hashes are the ones stage one remembered beside the cache (54 GB for a 27B: once).
    hashes = val.parent / HASH_CACHE if teacher else model_dir / ".eval_hashes.json"
    manifest = read_manifest(val, "logits")
    key = {"weights": model_fingerprint(model_dir, file_hash=cached_sha256(hashes)),
           "val": [s.sha256 for s in manifest.shards]}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The teacher at the capture's batch size: the shape stage one ran (and compiled) it in, the memory it fits.
    batch = int((manifest.stats.capture_config or {}).get("batch_size", 16)) if teacher else 16
    metrics = evaluate(load_model(model_dir, dtype=teacher_dtype(device) if teacher else None, device=device), val,
                       batch_size=batch)
    write_json(path, {"key": key, "metrics": metrics})
    return metrics


def cache_bytes_per_token(split: Path) -> dict[str, float]:
    """Compressed bytes per cached position of each mode, from the Parquet column-chunk sizes."""
    manifest = read_manifest(split, "logits")
    sizes: dict[str, int] = {}
    for shard in manifest.shards:
        meta = pq.read_metadata(split / shard.file)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                top = col.path_in_schema.split(".")[0]
                sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    tokens = max(1, manifest.tokens)
    # The window columns excluded (the tokens are stored anyway, the label mask derived): what a mode costs is
    # its target columns, those the cache has (a pure-sampling cache has no top K).
    empty = TOPK_COLUMNS if manifest.meta.topk == 0 else ()
    modes = ("sampled",) if manifest.meta.topk == 0 else KD_MODES  # tail and renorm need a top K
    needed = {mode: [c for c in MODE_COLUMNS[mode] if c not in WINDOW and c not in empty] for mode in modes}
    out = {mode: sum(sizes.get(c, 0) for c in columns) / tokens for mode, columns in needed.items()
           if columns and all(c in sizes for c in columns)}
    out["file"] = sum(s.bytes for s in manifest.shards) / tokens
    return out


def _final_metrics(folder: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    finals = [x for x in lines if x.get("eval") == "final"]
    if not finals:
        raise PipelineError(f"{folder}: training did not finish (no final eval in metrics.jsonl); rerun train-student")
    return finals[-1]


def curve(folder: Path) -> list[tuple[int, float]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(x["tokens"], x["val_ce"]) for x in lines if "eval" in x and "tokens" in x]


def collect(paths: Paths) -> list[dict[str, Any]]:
    val = paths.cache / "val"
    rows: list[dict[str, Any]] = []
    teacher_unfinished = unfinished(paths.teacher)
    if (paths.teacher / "config.json").is_file() and teacher_unfinished:
        print(f"skipping the teacher: {teacher_unfinished}", file=sys.stderr)
    elif (paths.teacher / "config.json").is_file():
        m = cached_eval(paths.teacher, val, teacher=True)
        trained_here = (paths.teacher / "run_config.json").is_file()  # the demo teacher; a real one is not
        spec = read_run_config(paths.teacher).student if trained_here else ""
        final = _final_metrics(paths.teacher) if (paths.teacher / "metrics.jsonl").is_file() else {}
        rows.append(_row("teacher", load_config(paths.teacher).num_parameters(), "teacher", "-",
                         final.get("tokens"), m, final.get("wall_s"), spec))
    # Folders with a model, and those a training has started in (reported as skipped until finished).
    folders = {p.parent for pattern in ("*/config.json", "*/run_config.json") for p in paths.students.glob(pattern)}
    for folder in sorted(folders):
        reason = unfinished(folder)
        if reason:
            print(f"skipping {reason}", file=sys.stderr)
            continue
        params = load_config(folder).num_parameters()
        if (folder / "merge_config.json").is_file():
            merge = read_json(folder / "merge_config.json", "the merge settings")
            rows.append(_row(folder.name, params, "merged", "-", None, cached_eval(folder, val), None,
                             "+".join(Path(p).name for p in merge["inputs"])))
            continue
        run = read_run_config(folder)
        final = _final_metrics(folder)
        note = cache_note(folder)
        if note:
            print(f"{folder.name}: {note}", file=sys.stderr)
        mode = run.loss["target"] if run.loss["kind"] == "kd" else "-"
        data = Path(run.data)
        metrics = final
        if run.loss["kind"] == "rlhf" or (data.resolve() != paths.cache.resolve() and (data / "train").is_dir()):
            # Trained from another cache (e.g. the compact one), or by RLHF on prompts (no cache, no val metrics
            # of its own): evaluated on the main val cache like the rest.
            metrics = {**final, **cached_eval(folder, val)}
        rows.append(_row(folder.name, params, run.loss["kind"], mode, final["tokens"], metrics, final["wall_s"],
                         run.student, seed=run.train["seed"], lr=run.optim["lr"], cache=data.name,
                         select=run.train.get("select") or None, selected=_selection(folder),
                         target_bytes_per_token=_target_bytes(data) if run.loss["kind"] == "kd" else None,
                         cache_note=note))
    return rows


def _selection(folder: Path) -> dict[str, Any] | None:
    """The resolved data selection a run logged (metrics.jsonl), if any."""
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        if '"selection"' in line:
            return json.loads(line)["selection"]
    return None


def _target_bytes(cache: Path) -> float | None:
    """Compressed bytes of a cache's target columns per token (its manifest's; computed for older ones)."""
    try:
        manifest = read_manifest(cache / "train", "logits")
    except PipelineError:
        return None
    if manifest.stats.target_bytes_per_token is not None:
        return manifest.stats.target_bytes_per_token
    return max((v for k, v in cache_bytes_per_token(cache / "train").items() if k != "file"), default=None)


def _row(name: str, params: int, loss: str, cache_mode: str, tokens: int | None, m: dict[str, Any],
         wall: float | None, spec: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "parameters": params, "loss_mode": loss, "cache_mode": cache_mode,
            "training_tokens": tokens, "val_ce": m["val_ce"], "val_ppl": m["val_ppl"],
            "kl_to_teacher": m.get("kl_to_teacher"), "top1_agreement": m.get("top1_agreement"), "ece": m["ece"],
            "wall_s": wall, "student": spec, **extra}


def pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(KD, CE) twins: the same student, seed, learning rate and token budget; among several KD runs the
    one named like the CE run with `kd` for `ce` (the demo's `s-kd` for `s-ce`), else the first."""
    out = []
    for ce in (r for r in rows if r["loss_mode"] == "ce"):
        twins = [kd for kd in rows if kd["loss_mode"] == "kd" and all(
            kd.get(k) == ce.get(k) for k in ("student", "seed", "lr", "training_tokens"))]
        named = [kd for kd in twins if kd["name"] == ce["name"].replace("ce", "kd")]
        if twins:
            out.append(((named or twins)[0], ce))
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        text = f"{v:.{digits}f}"
        return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # "-0.000" (float noise) is 0
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[dict[str, Any]], cache: Manifest, bytes_per_mode: dict[str, float], machine: str,
             cache_name: str = "logits") -> str:
    lines = ["# Distillation report", "", f"Machine: {machine}", ""]
    stats = cache.stats
    meta = cache.meta
    encoding = (f" ({meta.id_coding} ids, {meta.logprob_coding} log-probs, {meta.sampling} draws; "
                f"{stats.target_bytes_per_token:.1f} bytes/token of target columns)"
                if stats.target_bytes_per_token is not None else "")
    loss = f", mean teacher loss {stats.mean_teacher_loss:.3f} nats" if stats.mean_teacher_loss is not None else ""
    lines += [f"Teacher cache: top-{meta.topk}, {meta.samples} tail draws per position, "
              f"{cache.tokens:,} train positions{encoding}; {stats.bytes_per_token:.1f} bytes/token on disk, mean tail "
              f"mass {stats.mean_tail_mass:.3f}, mean teacher entropy {stats.mean_teacher_entropy:.3f} nats{loss}.", ""]
    chat = cache.meta.format == "chat"
    if chat:  # only model turns train and are evaluated: every metric is over the response tokens
        share = (f" ({stats.positions:,} of {cache.tokens:,} train positions; "
                 f"{sum(s.bytes for s in cache.shards) / max(1, stats.positions):.1f} bytes per response token on "
                 "disk)") if stats.positions else ""
        lines += [f"Chat cache: only the model turns' tokens train and are evaluated{share}. CE and perplexity are "
                  "response-token CE and perplexity.", ""]
    what = "response " if chat else "val "
    head = ["model", "params", "tokens", "loss", "cache mode", what + "CE", what + "ppl", "KL to teacher", "top-1 agree",
            "ECE", "wall s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(x) for x in (
            r["name"], r["parameters"], r["training_tokens"], r["loss_mode"], r["cache_mode"], r["val_ce"], r["val_ppl"],
            r["kl_to_teacher"], r["top1_agreement"], r["ece"], r["wall_s"] and _fmt(r["wall_s"], 1))) + " |")
    twins = pairs(rows)
    if twins:  # a section only when a student has a CE twin: no empty headings
        lines += ["", "## Distilled vs " + ("hard labels (same start, same windows, same token budget)" if chat else
                                            "from scratch (same windows, same token budget)"), ""]
    for kd, ce in twins:
        gap = (ce["val_ppl"] - kd["val_ppl"]) / ce["val_ppl"]
        verdict = "meets" if gap >= TARGET_GAP else "misses"
        lines.append(f"- {kd['student']}: KD ({kd['cache_mode']}) {'response-token ' if chat else ''}perplexity "
                     f"{kd['val_ppl']:.2f} vs CE {ce['val_ppl']:.2f}: "
                     f"{100 * gap:.1f}% lower ({verdict} the {100 * TARGET_GAP:.0f}% target)")
    # The main cache's modes; runs from other caches or with a data selection have their own sections.
    modes = [r for r in rows if r["loss_mode"] == "kd" and r.get("cache") == cache_name and not r.get("select")]
    by_student: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in modes:
        by_student.setdefault((r["student"], r["seed"], r["training_tokens"]), []).append(r)
    groups = [g for g in by_student.values() if len({r["cache_mode"] for r in g}) > 1]
    if groups:
        bpt = bytes_per_mode
        lines += ["", "## Cache modes (one student, one token budget)", "",
                  "| student | mode | bytes/token | val ppl | KL to teacher | ECE |", "|---|---|---|---|---|---|"]
        for g in groups:
            for r in sorted(g, key=lambda r: KD_MODES.index(r["cache_mode"])):
                lines.append(f"| {r['student']} | {r['cache_mode']} | {_fmt(bpt.get(r['cache_mode']), 1)} | "
                             f"{r['val_ppl']:.2f} | {_fmt(r['kl_to_teacher'])} | {r['ece']:.4f} |")
        lines += ["", "bytes/token counts the compressed target columns only (input_ids excluded: the tokens are "
                  "stored anyway)."]
    notes = [r for r in rows if r.get("cache_note")]
    if notes:
        lines += ["", "## Students whose cache is gone or was replaced", ""]
        lines += [f"- {r['name']}: {r['cache_note']}" for r in notes]
    lines += findings_section(rows, cache_name)
    merged = [r for r in rows if r["loss_mode"] == "merged"]
    if merged:
        lines += ["", "## Model merging", ""]
        for r in merged:
            parts = [p for p in rows if p["name"] in r["student"].split("+")]
            lines.append(f"- {r['name']} (average of {', '.join(p['name'] for p in parts)}): perplexity "
                         f"{r['val_ppl']:.2f}; parts " + ", ".join(f"{p['val_ppl']:.2f}" for p in parts))
    return "\n".join(lines) + "\n"


def twin(r: dict[str, Any], rows: list[dict[str, Any]], cache_name: str) -> dict[str, Any] | None:
    """The same student, seed, learning rate, budget and KD target on the main cache without a selection."""
    same = [o for o in rows if o is not r and o["loss_mode"] == "kd" and o.get("cache") == cache_name
            and not o.get("select") and all(o.get(k) == r.get(k) for k in ("student", "seed", "lr", "training_tokens"))
            and o["cache_mode"] == r["cache_mode"]]
    return same[0] if same else None


def findings(rows: list[dict[str, Any]], cache_name: str) -> list[str]:
    """One line per compact-cache run and per data-selection run, against its twin on the main cache, with a
    verdict (val CE on the same val split; lower is better)."""
    out = []
    for r in rows:
        if r["loss_mode"] != "kd":
            continue
        base = twin(r, rows, cache_name)
        if base is None:
            continue
        change = (r["val_ce"] - base["val_ce"]) / base["val_ce"]
        if r.get("cache") != cache_name and not r.get("select"):
            verdict = "within" if change <= COMPACT_TARGET else "outside"
            out.append(f"{r['name']} (cache {r['cache']}, {_fmt(r.get('target_bytes_per_token'), 1)} bytes/token) vs "
                       f"{base['name']} ({base['cache']}, {_fmt(base.get('target_bytes_per_token'), 1)} bytes/token): "
                       f"val CE {r['val_ce']:.4f} vs {base['val_ce']:.4f}, {100 * change:+.2f}% ({verdict} the "
                       f"{100 * COMPACT_TARGET:.0f}% target)")
        elif r.get("select") and r.get("cache") == cache_name:
            kept = (r.get("selected") or {}).get("expected_kept")
            helped = "helped" if r["val_ce"] < base["val_ce"] else "did not help"
            share = f", keeping {100 * kept:.0f}% of the {r['selected']['unit']}" if kept is not None else ""
            out.append(f"{r['name']} (--select {r['select']}{share}; same token budget) vs {base['name']}: val CE "
                       f"{r['val_ce']:.4f} vs {base['val_ce']:.4f} ({100 * change:+.2f}%): the selection {helped} "
                       f"(KL to teacher {_fmt(r.get('kl_to_teacher'))} vs {_fmt(base.get('kl_to_teacher'))}; one seed, "
                       "so a difference this size may be noise)")
    return out


def findings_section(rows: list[dict[str, Any]], cache_name: str) -> list[str]:
    lines = findings(rows, cache_name)
    return ["", "## Compact cache and data selection (against the same student on the main cache)", "",
            *(f"- {line}" for line in lines)] if lines else []


def plot(rows: list[dict[str, Any]], paths: Paths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kd, ce in pairs(rows):
        for r, style in ((kd, "-"), (ce, "--")):
            points = curve(paths.students / r["name"])
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{r['name']} ({r['loss_mode']})")
    teacher = next((r for r in rows if r["loss_mode"] == "teacher"), None)
    if teacher:
        ax.axhline(teacher["val_ce"], color="black", linestyle=":", label="teacher")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation cross-entropy (nats)")
    ax.set_title("Distilled (KD) vs from scratch (CE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(paths: Paths, machine: str = "") -> dict[str, Any]:
    cache = read_manifest(paths.cache / "train", "logits")
    bytes_per_mode = cache_bytes_per_token(paths.cache / "train")
    rows = collect(paths)
    if not rows:
        raise PipelineError(f"{paths.students}: no teacher or students to report on; run `make teacher` / "
                            "`make train-student`")
    paths.out.mkdir(parents=True, exist_ok=True)
    name = paths.cache.name
    (paths.out / "report.md").write_text(markdown(rows, cache, bytes_per_mode, machine or _machine(), name))
    stats = {k: v for k, v in to_json(cache.stats).items() if k != "histograms"}
    write_json(paths.out / "summary.json", {"models": rows, "cache": {"bytes_per_mode": bytes_per_mode, **stats},
                                            "findings": findings(rows, name)})
    plot(rows, paths, paths.out / "val_loss.png")
    return {"models": rows}


def _machine() -> str:
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {os.cpu_count()} cores, torch {torch.__version__}"
