"""Held-out exact-match tasks: which conversations give tasks, what the answer is, and how a reply scores."""

import hashlib
import json

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks import accuracy, exact_match, extract_answer, held_out_tasks, prompts_jsonl

SYSTEM = {"role": "system", "content": "You answer questions about the Python standard library."}
WHERE = [{"role": "user", "content": "Which module defines `OrderedDict`?"},
         {"role": "assistant", "content": "`OrderedDict` is defined in the `collections` module."},
         {"role": "user", "content": "Is it a class or a function?"},
         {"role": "assistant", "content": "It is a class."}]
SIGNATURE = [SYSTEM,
             {"role": "user", "content": "What does `json.dumps` do?"},
             {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
             {"role": "user", "content": "What is its signature?"},
             {"role": "assistant", "content": "`json.dumps(obj, *, skipkeys=False)`"}]
PLAIN = [{"role": "user", "content": "What is the `json` module for?"},
         {"role": "assistant", "content": "JSON (JavaScript Object Notation) is a subset of JavaScript."}]


def write(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def test_tasks_answers_and_prompts(tmp_path):
    tasks = held_out_tasks(write(tmp_path / "i.jsonl", [WHERE, PLAIN, SIGNATURE]), val_fraction=1.0)
    assert [(t.kind, t.answer) for t in tasks] == [("where", "collections"),
                                                    ("signature", "json.dumps(obj, *, skipkeys=False)")]
    assert tasks[0].messages == WHERE[:1]
    assert tasks[1].messages == SIGNATURE[:4]  # the system message and the first exchange stay: the question needs them
    assert prompts_jsonl(tasks, tmp_path / "p.jsonl") == 2
    assert [json.loads(line)["messages"][-1]["content"] for line in (tmp_path / "p.jsonl").open()] == [
        "Which module defines `OrderedDict`?", "What is its signature?"]


def test_replies_score_by_the_answer_string(tmp_path):
    where, signature = held_out_tasks(write(tmp_path / "i.jsonl", [WHERE, SIGNATURE]), val_fraction=1.0)
    assert exact_match("`OrderedDict` is defined in the `collections` module.", where)
    assert exact_match("It is defined in the `collections` module, I think", where)
    assert not exact_match("`OrderedDict` is defined in the `collections.abc` module.", where)
    assert not exact_match("collections", where)  # no answer in the reference's position
    assert extract_answer("no idea", where) is None
    assert exact_match("`json.dumps(obj, *, skipkeys=False)`", signature)
    assert not exact_match("`json.dumps(obj)`", signature)
    assert accuracy(["defined in the `collections` module", "`json.dumps(obj)`"], [where, signature]) == 0.5


def test_only_the_validation_split(tmp_path):
    """A conversation is held out exactly when the tokenize split's content hash puts it in val: the hash
    written out by hand here (sha256 of the JSON list of [role, content] turns, system folded into the
    first user turn), not through pipeline.corpus."""
    conversations = [[{"role": "user", "content": f"Which module defines `Name{i}`?"},
                      {"role": "assistant", "content": f"`Name{i}` is defined in the `mod{i}` module."}]
                     for i in range(200)]

    def val(messages):
        key = json.dumps([["user" if m["role"] == "user" else "model", m["content"]] for m in messages],
                         ensure_ascii=False)
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < 0.1

    expected = [f"mod{i}" for i, m in enumerate(conversations) if val(m)]
    assert 5 < len(expected) < 40
    tasks = held_out_tasks(write(tmp_path / "i.jsonl", conversations), val_fraction=0.1)
    assert [t.answer for t in tasks] == expected
    assert [t.answer for t in held_out_tasks(tmp_path / "i.jsonl", 0.1, limit=3)] == expected[:3]


def test_missing_instruction_set(tmp_path):
    with pytest.raises(PipelineError, match="make demo-chat"):
        held_out_tasks(tmp_path / "none.jsonl", 0.05)
