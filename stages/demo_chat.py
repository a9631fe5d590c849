"""`make demo-chat`: post-training distillation on the embedded default, in WORK/chat (the base demo's
report is left as it is). An instruction set about the standard library, built offline from its sources
(pipeline/instructions.py) → chat token shards, filtered (duplicates, near duplicates, personal
information, a blocklist of mistaken self-identification) → the demo teacher (WORK/teacher, from
`make demo`; its tokenize and teacher steps are run here when missing) fine-tuned on the model turns only →
its response-only cache → a student distilled from it (KD) and its hard-label twin (CE), both starting
from the same weights → the report, with response-token perplexity. Each step is the stage a user runs,
with `--config configs/demo_chat.toml` (its tables are the stages' own); finished steps are skipped on a
rerun. `--set stage.key=value` overrides one setting of one chat step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.instructions import BLOCKLIST, write_instructions
from pipeline.layout import Layout
from pipeline.train import unfinished
from stages._cli import run
from stages.demo import Steps, demo_parser, demo_table, parse_overrides, precision

KEYS = {"student", "student_init", "base_config"}


def parser() -> argparse.ArgumentParser:
    return demo_parser("demo_chat", __doc__, "configs/demo_chat.toml")


def finished(folder: Path) -> bool:
    """A model folder that is complete (a trained one has finished; a given one has its config)."""
    return (folder / "config.json").is_file() and unfinished(folder) is None


def base_steps(step: Steps, base: Layout, student: str, preset: str, prec: str) -> None:
    """The base demo's steps the chat demo needs, when `make demo` has not made them."""
    if not finished(base.teacher):
        step("base tokens: stdlib corpus -> tokenizer -> token shards", "tokenize")
        step("base teacher: hard-label training of the demo teacher", "teacher", "--precision", prec)
    if student and not finished(base.students / student):
        step("base teacher-logits: top-K cache", "teacher_logits")
        step(f"base student {student} (kd)", "train_student", "--precision", prec, "--loss", "kd",
             "--student", f"{student}={preset}")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    demo = demo_table(args.config, "demo_chat", KEYS)
    base, chat = Layout(args.work), Layout(args.work / "chat")
    prec = precision()
    print(f"chat demo in {chat.work}: precision {prec}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    start = time.perf_counter()
    base_steps(Steps(base.work, Path(demo["base_config"]), {}, "make demo-chat"), base, demo["student_init"], demo["student"], prec)

    data = chat.work / "data"
    corpus, blocklist = data / "instructions.jsonl", data / "blocklist.txt"
    if not corpus.is_file():  # written once: a rewrite would change its mtime, and so every step after it
        print(f"\n== instruction set: {write_instructions(corpus)} conversations from the standard library -> {corpus}")
    if not blocklist.is_file():
        data.mkdir(parents=True, exist_ok=True)
        blocklist.write_text("# mistaken self-identification\n" + "".join(p + "\n" for p in BLOCKLIST))

    step = Steps(chat.work, args.config, parse_overrides(args.overrides), "make demo-chat")
    step.start = start
    step("chat tokens: template, response mask, filters", "tokenize", "--corpus", str(corpus),
         "--tokenizer", str(base.teacher / "tokenizer.model"), "--blocklist", str(blocklist))
    step("chat teacher: the demo teacher fine-tuned on the model turns", "teacher", "--precision", prec,
         "--preset", str(base.teacher), "--init-from", str(base.teacher))
    step("chat teacher-logits: response-only cache", "teacher_logits")
    init = ["--init-from", str(base.students / demo["student_init"])] if demo["student_init"] else []
    name = demo["student"].removeprefix("demo-student-")
    for loss in ("kd", "ce"):
        step(f"chat student {name}-{loss} ({'distilled' if loss == 'kd' else 'hard labels'})", "train_student",
             "--precision", prec, "--loss", loss, *init, "--student", f"{name}-{loss}={demo['student']}")
    step("chat report", "report")
    print(f"chat demo finished in {time.perf_counter() - start:.0f} s; see {chat.report}")


if __name__ == "__main__":
    run(main)
