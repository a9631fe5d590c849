"""`make demo`: the whole chain on the embedded default, reproducing Gemma 2's distillation result in
miniature: tokens → teacher → teacher-logits → for each student size a KD student and a CE (from-scratch)
twin on the same windows and token budget → a second seed and the other cache modes of the first size →
merge → report. Each step is the same stage a user runs; completed steps are skipped on a rerun."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from stages._cli import run

SECTIONS = {
    "tokens": {"corpus", "vocab", "seq_len", "val_fraction", "shard_windows"},
    "teacher": {"preset", "max_tokens", "batch_size", "lr", "warmup_steps"},
    "cache": {"topk", "samples", "max_train_tokens"},
    "students": {"sizes", "max_tokens", "batch_size", "lr", "warmup_steps", "eval_every", "eval_windows", "cache_modes",
                 "merge_seeds", "merge_lrs", "merge_tokens"},
}


def load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise PipelineError(f"{path}: no such demo config")
    raw = tomllib.loads(path.read_text())
    for section, keys in raw.items():
        if section not in SECTIONS:
            raise PipelineError(f"{path}: unknown section [{section}]; valid: {sorted(SECTIONS)}")
        unknown = set(keys) - SECTIONS[section]
        if unknown:
            raise PipelineError(f"{path}: unknown keys {sorted(unknown)} in [{section}]; valid: {sorted(SECTIONS[section])}")
    return raw


def precision() -> str:
    """bf16 autocast on a GPU, and on CPUs with native bf16 matrix units (about 1.7× faster training here);
    fp32 elsewhere."""
    if torch.cuda.is_available():
        return "auto"
    try:
        fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a private probe: absent in some torch builds
        fast_bf16 = False
    return "bf16" if fast_bf16 else "fp32"


def flags(**kw: Any) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]


class Steps:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, title: str, stage: str, *args: str) -> None:
        print(f"\n== {title}  [{time.perf_counter() - self.start:.0f} s]", flush=True)
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args])
        if result.returncode != 0:
            raise PipelineError(f"demo step '{title}' failed (exit {result.returncode}); fix the error above and rerun "
                                "`make demo`: finished steps are kept")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__)
    p.add_argument("--work", type=Path, default=Path("runs/demo"))
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    args = p.parse_args(argv)
    cfg = load(args.config)
    tok, teach, cache, stu = cfg["tokens"], cfg["teacher"], cfg["cache"], cfg["students"]
    work, prec = args.work, precision()
    step = Steps()
    print(f"demo in {work}: precision {prec}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")

    step("tokens: stdlib corpus -> tokenizer -> token shards", "tokenize", "--work", str(work), *flags(**tok))
    step("teacher: hard-label training of the demo teacher", "teacher", "--data", str(work / "tokens"),
         "--out", str(work / "teacher"), "--precision", prec, "--save-every", "100",
         *flags(preset=teach["preset"], max_tokens=teach["max_tokens"], batch_size=teach["batch_size"],
                lr=teach["lr"], warmup_steps=teach["warmup_steps"]))
    step("teacher-logits: top-K cache", "teacher_logits", "--teacher", str(work / "teacher"),
         "--tokens", str(work / "tokens"), "--out", str(work / "logits"), *flags(**cache))

    common = ["--data", str(work / "logits"), "--out", str(work / "students"), "--precision", prec,
              *flags(max_tokens=stu["max_tokens"], batch_size=stu["batch_size"], lr=stu["lr"],
                     warmup_steps=stu["warmup_steps"], eval_every=stu["eval_every"], eval_windows=stu["eval_windows"])]
    sizes = stu["sizes"]
    for loss in ("kd", "ce"):
        students = [x for name, preset in sizes.items() for x in ("--student", f"{name}-{loss}={preset}")]
        step(f"students ({loss}): {', '.join(sizes)}", "train_student", *common, "--loss", loss, *students)
    first, preset = next(iter(sizes.items()))
    for mode in stu["cache_modes"]:
        step(f"student {first}-kd with cache mode {mode}", "train_student", *common, "--kd-target", mode,
             "--student", f"{first}-kd-{mode}={preset}")
    base = work / "students" / f"{first}-kd"
    branches = []
    for seed, lr in zip(stu["merge_seeds"], stu["merge_lrs"]):
        name = f"{first}-kd-cont{seed}"
        branches.append(str(work / "students" / name))
        step(f"student {name}: {first}-kd continued, seed {seed}, lr {lr}", "train_student", "--data", str(work / "logits"),
             "--out", str(work / "students"), "--precision", prec, "--init-from", str(base), "--student", f"{name}={preset}",
             *flags(seed=seed, lr=lr, max_tokens=stu["merge_tokens"], batch_size=stu["batch_size"], warmup_steps=5))
    step(f"merge {', '.join(Path(b).name for b in branches)}", "merge", "--inputs", *branches,
         "--out", str(work / "students" / f"{first}-kd-merged"))
    step("report", "report", "--work", str(work))
    print(f"demo finished in {time.perf_counter() - step.start:.0f} s; see {work / 'report'}")


if __name__ == "__main__":
    run(main)
