"""`make demo`: the whole chain on the embedded default, reproducing Gemma 2's distillation result in
miniature: tokens → teacher → teacher-logits → verify → for each student size a KD student and a CE (from-scratch)
twin on the same windows and token budget → the other cache modes of the first size → the compact cache of
the same windows and the first size's KD run from it → the first size's KD run with a data selection → two
continuations of its KD run, merged → report. Each step is the same stage a user runs, with the same `--config` file (its tables are
the stages' own); completed steps are skipped on a rerun. `--set stage.key=value` overrides one setting of
one stage (what `make demo TOPK=32` passes)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.capture import CACHE_PRESETS
from pipeline.errors import PipelineError
from pipeline.runtime import fast_cpu_bf16
from stages._cli import STAGES, layout, load_config, run, stage_parser

DEMO_KEYS = {"independent_seed", "sizes", "cache_modes", "merge_seeds", "merge_lrs", "merge_tokens", "merge_warmup_steps", "compact_cache",
             "compact_preset", "select"}


def demo_parser(name: str, doc: str | None, config: str) -> argparse.ArgumentParser:
    """A demo's CLI (make demo, make demo-chat): its config file, and `--set` overrides of its steps."""
    p = stage_parser(name, doc)
    p.set_defaults(config=Path(config))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one setting of the stage a step runs, e.g. teacher_logits.topk=32 (repeatable)")
    return p


def parser() -> argparse.ArgumentParser:
    return demo_parser("demo", __doc__, "configs/demo.toml")


def precision() -> str:
    """bf16 autocast on a GPU, and on CPUs with native bf16 matrix units (about 1.7× faster training here);
    fp32 elsewhere."""
    if torch.cuda.is_available():
        return "auto"
    return "bf16" if fast_cpu_bf16() else "fp32"


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """`stage.key=value` → extra flags per stage, each checked against that stage's own flags."""
    extra: dict[str, list[str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        stage, dot, key = target.partition(".")
        if not (sep and dot) or stage not in STAGES:
            raise PipelineError(f"--set {item!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        if stage in ("demo", "train_student") and key == "student":
            raise PipelineError(f"--set {item!r}: the demo trains the sizes of its [demo] table; edit the config")
        known = {a.dest for a in importlib.import_module(f"stages.{stage}").parser()._actions}
        if key.replace("-", "_") not in known:
            raise PipelineError(f"--set {item!r}: stage {stage} has no setting {key!r}")
        extra.setdefault(stage, []).extend([f"--{key.replace('_', '-')}", value])
    return extra


class Steps:
    def __init__(self, work: Path, config: Path, extra: dict[str, list[str]], target: str = "make demo") -> None:
        self.start = time.perf_counter()
        self.common = ["--work", str(work), "--config", str(config)]
        self.extra, self.target = extra, target

    def __call__(self, title: str, stage: str, *args: str, keep: frozenset[str] = frozenset()) -> None:
        """Runs one stage with the --set overrides of that stage, except those of the flags in `keep`."""
        print(f"\n== {title}  [{time.perf_counter() - self.start:.0f} s]", flush=True)
        extra = self.extra.get(stage, [])
        extra = [x for flag, value in zip(extra[::2], extra[1::2]) if flag not in keep for x in (flag, value)]
        cmd = [sys.executable, "-m", f"stages.{stage}", *self.common, *args, *extra]
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise PipelineError(f"demo step '{title}' failed (exit {result.returncode}); fix the error above and rerun "
                                f"`{self.target}`: finished steps are kept")


def demo_table(config: Path, section: str, keys: set[str]) -> dict[str, Any]:
    """The demo's own [section] of its config file, which must hold exactly `keys`."""
    table = load_config(config).get(section, {})
    unknown, missing = set(table) - keys, keys - set(table)
    if unknown or missing:
        raise PipelineError(f"{config}: [{section}] has unknown keys {sorted(unknown)} / lacks {sorted(missing)}; "
                            f"its keys are {sorted(keys)}")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    demo = demo_table(args.config, "demo", DEMO_KEYS)
    work, prec = layout(args), precision()
    step = Steps(args.work, args.config, parse_overrides(args.overrides))
    print(f"demo in {args.work}: precision {prec}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")

    step("tokens: stdlib corpus -> tokenizer -> token shards", "tokenize")
    step("teacher: hard-label training of the demo teacher", "teacher", "--precision", prec)
    step("teacher-logits: top-K cache", "teacher_logits")
    step("verify: the cache against its manifest, and the teacher re-run on sampled windows", "verify")
    sizes = demo["sizes"]
    for loss in ("kd", "ce"):
        students = [f"{name}-{loss}={preset}" for name, preset in sizes.items()]
        step(f"students ({loss}): {', '.join(sizes)}", "train_student", "--precision", prec, "--loss", loss,
             "--student", *students)
    first, preset = next(iter(sizes.items()))
    for mode in demo["cache_modes"]:
        step(f"student {first}-kd with cache mode {mode}", "train_student", "--precision", prec, "--kd-target", mode,
             "--student", f"{first}-kd-{mode}={preset}")
    compact = work.work / demo["compact_cache"]
    # `make demo TOPK=32` sets the main cache; the compact one stays what its preset says.
    preset_flags = frozenset(f"--{k.replace('_', '-')}" for k in CACHE_PRESETS[demo["compact_preset"]])
    step(f"teacher-logits: {demo['compact_preset']} cache of the same windows", "teacher_logits", "--cache-preset",
         demo["compact_preset"], "--cache", str(compact), keep=preset_flags)
    step(f"student {first}-kd-compact from the {demo['compact_preset']} cache", "train_student", "--precision", prec,
         "--cache", str(compact), "--student", f"{first}-kd-compact={preset}")
    step(f"student {first}-kd-select: --select {demo['select']}", "train_student", "--precision", prec,
         "--select", demo["select"], "--student", f"{first}-kd-select={preset}")
    base = work.students / f"{first}-kd"
    branches = []
    for seed, lr in zip(demo["merge_seeds"], demo["merge_lrs"]):
        name = f"{first}-kd-cont{seed}"
        branches.append(str(work.students / name))
        step(f"student {name}: {first}-kd continued, seed {seed}, lr {lr}", "train_student", "--precision", prec,
             "--init-from", str(base), "--student", f"{name}={preset}", "--seed", str(seed), "--lr", str(lr),
             "--max-tokens", str(demo["merge_tokens"]), "--warmup-steps", str(demo["merge_warmup_steps"]),
             "--eval-every", "0")
    step(f"merge {', '.join(Path(b).name for b in branches)}", "merge", "--inputs", *branches,
         "--out", str(work.students / f"{first}-kd-merged"))
    # The counter-example: an independently initialised twin of the KD run (another seed), averaged with it.
    seed = demo["independent_seed"]
    step(f"student {first}-kd-seed{seed}: the KD run from another random init", "train_student", "--precision", prec,
         "--seed", str(seed), "--student", f"{first}-kd-seed{seed}={preset}")
    step(f"merge {first}-kd, {first}-kd-seed{seed} (independent inits)", "merge", "--inputs", str(base),
         str(work.students / f"{first}-kd-seed{seed}"), "--out", str(work.students / f"{first}-kd-merged-independent"))
    step("report", "report")
    print(f"demo finished in {time.perf_counter() - step.start:.0f} s; see {work.report}")


if __name__ == "__main__":
    run(main)
