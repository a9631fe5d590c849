"""Held-out tasks with one right answer, scored by exact match (no judge): the embedded default's
instruction set (pipeline/instructions.py) asks questions whose answer is a single string —
- `where`: "Which module defines `OrderedDict`?" → the module (`collections`), in the reply
  "`OrderedDict` is defined in the `collections` module.";
- `signature`: after "What does `json.dumps` do?" and its answer, "What is its signature?" → the signature
  in backticks (`json.dumps(obj, *, skipkeys=False, …)`).
Only conversations that `make tokens` put in the validation split are used (the same content hash,
pipeline/corpus.py `is_val`), so no student trained on them. A reply scores when the string it gives in the
reference's position (the module named in "defined in the `…` module", or the first backticked span)
equals the answer exactly."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import chat
from pipeline.corpus import Piece, is_val, split_key
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path

WHERE = re.compile(r"defined in the `([^`]+)` module")
BACKTICKED = re.compile(r"`([^`]+)`")
SIGNATURE_QUESTION = "What is its signature?"


@dataclass(frozen=True)
class Task:
    messages: list[dict[str, str]]  # the conversation up to the question (the last message is the user's)
    answer: str  # the one right string
    kind: str  # "where" or "signature"
    reference: str  # the reference reply


def _tasks_of(messages: list[dict[str, str]]) -> Iterator[Task]:
    """The tasks one instruction-set conversation holds (none for most)."""
    body = [m for m in messages if m["role"] != "system"]
    if len(body) >= 2 and (found := WHERE.search(body[1]["content"])) and body[0]["content"].startswith(
            ("Which module", "Where is", "In which module")):
        yield Task(messages[:len(messages) - len(body) + 1], found.group(1), "where", body[1]["content"])
    for i in range(2, len(body) - 1, 2):
        if body[i]["content"] == SIGNATURE_QUESTION and (found := BACKTICKED.search(body[i + 1]["content"])):
            yield Task(messages[:len(messages) - len(body) + i + 1], found.group(1), "signature",
                       body[i + 1]["content"])


def held_out_tasks(instructions: Path, val_fraction: float, limit: int = 0) -> list[Task]:
    """The tasks of the conversations in `instructions` (a `{"messages": [...]}` JSONL) that the
    tokenize stage's content-hash split puts in val at `val_fraction`, in file order (`limit` > 0: the first
    that many)."""
    if not Path(instructions).is_file():
        raise PipelineError(f"{instructions}: no instruction set; run `make demo-chat` first (it writes it)")
    tasks: list[Task] = []
    with open(instructions, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row: dict[str, Any] = json.loads(line)
            turns = chat.from_row(row, "messages", lambda n=n: f"{instructions}:{n}")
            if not is_val(split_key(Piece(f"{instructions}:{n}", "", turns=turns)), val_fraction):
                continue
            tasks.extend(_tasks_of(row["messages"]))
            if limit and len(tasks) >= limit:
                return tasks[:limit]
    return tasks


def extract_answer(reply: str, task: Task) -> str | None:
    """The string a reply gives where the reference gives the answer; None when it gives none."""
    found = (WHERE if task.kind == "where" else BACKTICKED).search(reply)
    return found.group(1) if found else None


def exact_match(reply: str, task: Task) -> bool:
    return extract_answer(reply, task) == task.answer


def accuracy(replies: Iterable[str], tasks: list[Task]) -> float:
    """The share of tasks whose reply matches exactly."""
    hits = [exact_match(r, t) for r, t in zip(replies, tasks, strict=True)]
    return sum(hits) / len(hits) if hits else float("nan")


def prompts_jsonl(tasks: Iterable[Task], path: Path) -> int:
    """Writes the tasks' conversations as a PROMPTS file (`{"messages": [...]}` per line); returns the count."""
    n = 0
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps({"messages": task.messages}, ensure_ascii=False) + "\n")
            n += 1
    return n
