"""Preference data (FORMAT=preference): rows → pairs in the chat template, bad rows counted, filters on both
replies, the content-hash split, and the demo's pairs built from an instruction set.

References are written out by hand: the expected template text of a pair, the split as a sha256 of the JSON
of the turns (not through pipeline/corpus.py), the counts of a file whose every bad row is known."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.filters import FilterConfig
from pipeline.preferences import PreferenceConfig, build_preferences, shard_paths, write_demo_preferences
from pipeline.tokenizer import BOS


def _write(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def _pairs(out: Path) -> list[dict]:
    rows = []
    for split in ("train", "val"):
        for path in shard_paths(out / split):
            rows += [{**r, "split": split} for r in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda r: r["pair"])


def _text(tokenizer, ids: list[int]) -> str:
    assert ids[0] == BOS
    return tokenizer.decode(ids[1:])


NO_FILTERS = FilterConfig(filters="none")


def test_round_trip_of_every_row_form(tmp_path, tokenizer):
    rows = [
        {"prompt": "What does f do?", "chosen": "It adds.", "rejected": "It prints."},
        {"prompt": "Add x.", "system": "Be brief.", "chosen": {"role": "assistant", "content": "x + 1"},
         "rejected": [{"role": "assistant", "content": "x - 1"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Name?"}], "chosen": "Gemma", "rejected": "Thing"},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],  # TRL implicit prompt
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
    ]
    out = tmp_path / "data"
    build_preferences(_write(tmp_path / "p.jsonl", rows), tokenizer, out, PreferenceConfig(val_fraction=0.5), NO_FILTERS)
    pairs = _pairs(out)
    assert [p["pair"] for p in pairs] == [0, 1, 2, 3]
    u, m, e = "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n"
    expected = [
        (f"{u}What does f do?{e}{m}It adds.{e}", f"{u}What does f do?{e}{m}It prints.{e}"),
        (f"{u}Be brief.\n\nAdd x.{e}{m}x + 1{e}", f"{u}Be brief.\n\nAdd x.{e}{m}x - 1{e}"),
        (f"{u}Hi{e}{m}Hello{e}{u}Name?{e}{m}Gemma{e}", f"{u}Hi{e}{m}Hello{e}{u}Name?{e}{m}Thing{e}"),
        (f"{u}Q{e}{m}good{e}", f"{u}Q{e}{m}bad{e}"),
    ]
    for pair, (chosen, rejected) in zip(pairs, expected):
        assert _text(tokenizer, pair["chosen_ids"]) == chosen
        assert _text(tokenizer, pair["rejected_ids"]) == rejected
        # the shared prefix covers at least the prompt and the model header
        prefix = _text(tokenizer, pair["chosen_ids"][:pair["prompt_tokens"]])
        assert chosen.startswith(prefix) and rejected.startswith(prefix)
        assert len(prefix) >= chosen.rindex(m) + len(m) - 1


def test_bad_rows_are_counted_and_dropped(tmp_path, tokenizer, capsys):
    good = {"prompt": "What does f do?", "chosen": "It adds.", "rejected": "It prints."}
    rows = [
        good,
        "{not json",  # bad_json
        {"prompt": "q", "chosen": "only one"},  # missing_reply
        {"prompt": "q", "chosen": "", "rejected": "x"},  # missing_reply (empty)
        {"prompt": "q", "chosen": "same", "rejected": " same "},  # identical
        {"prompt": "q", "chosen": 3, "rejected": "x"},  # bad_row: not a string
        {"chosen": "a", "rejected": "b"},  # bad_row: no prompt
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": "a", "rejected": "b"},  # bad_row: prompt ends with a model turn
        {"prompt": "q<end_of_turn>", "chosen": "a", "rejected": "b"},  # markers
        {"prompt": "q", "chosen": "word " * 200, "rejected": "b"},  # too_long
        [1, 2],  # bad_row: not an object
        {"prompt": "Another?", "chosen": "Yes.", "rejected": "No."},
    ]
    out = tmp_path / "data"
    manifests = build_preferences(_write(tmp_path / "p.jsonl", rows), tokenizer, out,
                                  PreferenceConfig(max_tokens=64), NO_FILTERS)
    counts = manifests["train"].counts
    assert counts == manifests["val"].counts
    assert {k: counts.get(k, 0) for k in ("rows", "bad_json", "missing_reply", "identical", "bad_row", "markers",
                                          "too_long", "kept")} == {
        "rows": 12, "bad_json": 1, "missing_reply": 2, "identical": 1, "bad_row": 4, "markers": 1, "too_long": 1,
        "kept": 2}
    assert [p["pair"] for p in _pairs(out)] == [0, 11]
    err = capsys.readouterr().err
    assert "p.jsonl:2: invalid JSON" in err and "p.jsonl:5: chosen and rejected are the same reply" in err


def test_filters_apply_to_both_replies(tmp_path, tokenizer):
    base = {"prompt": "Contact?", "chosen": "Write to the maintainers list.", "rejected": "Call me."}
    rows = [
        base,
        dict(base),  # exact duplicate of the whole pair: dropped
        {**base, "rejected": "Call me later."},  # same prompt and chosen, another rejected: a different pair, kept
        {"prompt": "Mail?", "chosen": "Mail ann@example.com please.", "rejected": "Phone +1 415 555 0100 now."},
        {"prompt": "Who?", "chosen": "I am ChatGPT, a model.", "rejected": "I am Gemma."},  # blocklisted chosen: dropped
        {"prompt": "Who else?", "chosen": "I am Gemma.", "rejected": "I am ChatGPT, a model."},  # rejected: kept
        {"prompt": "Long?", "chosen": "x" * 300, "rejected": "y"},  # over --max-chars: dropped
    ]
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("I am ChatGPT\n")
    out = tmp_path / "data"
    manifests = build_preferences(_write(tmp_path / "p.jsonl", rows), tokenizer, out, PreferenceConfig(),
                                  FilterConfig(filters="exact,near,pii", blocklist=str(blocklist), max_chars=200))
    counts = manifests["train"].counts
    assert (counts["exact"], counts["blocklist"], counts["length"], counts["kept"]) == (1, 1, 1, 4)
    assert counts["pii_email"] == 1 and counts["pii_phone"] == 1
    pairs = {p["pair"]: p for p in _pairs(out)}
    assert sorted(pairs) == [0, 2, 3, 5]
    assert "[EMAIL]" in _text(tokenizer, pairs[3]["chosen_ids"]) and "ann@" not in _text(tokenizer, pairs[3]["chosen_ids"])
    assert "[PHONE]" in _text(tokenizer, pairs[3]["rejected_ids"])


def test_near_duplicate_pairs_are_dropped(tmp_path, tokenizer):
    words = "the function returns a value of the list and for each item we print the sum of it".split()
    text = " ".join(words * 3)
    rows = [{"prompt": "Explain " + text, "chosen": "It returns " + text, "rejected": "No."},
            {"prompt": "Explain " + text, "chosen": "It returns " + text + " again", "rejected": "No."}]
    manifests = build_preferences(_write(tmp_path / "p.jsonl", rows), tokenizer, tmp_path / "data", PreferenceConfig(),
                                  FilterConfig(filters="near"))
    assert manifests["train"].counts["near"] == 1 and manifests["train"].counts["kept"] == 1


def _reference_val(turns: list[tuple[str, str]], fraction: float) -> bool:
    """The split as `make tokens` defines it, written out: sha256 of the JSON list of [role, content]."""
    key = json.dumps([list(t) for t in turns], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def test_split_is_the_content_hash_of_prompt_and_chosen(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(60)]
    out = tmp_path / "data"
    build_preferences(_write(tmp_path / "p.jsonl", rows), tokenizer, out, PreferenceConfig(val_fraction=0.3), NO_FILTERS)
    got = {p["pair"]: p["split"] for p in _pairs(out)}
    want = {i: "val" if _reference_val([("user", f"Question {i}?"), ("model", f"Answer {i}.")], 0.3) else "train"
            for i in range(60)}
    assert got == want and 5 < sum(s == "val" for s in got.values()) < 35
    # moving the file and reordering its rows keeps every pair's split
    moved = _write(tmp_path / "moved.jsonl", rows[::-1])
    build_preferences(moved, tokenizer, tmp_path / "moved", PreferenceConfig(val_fraction=0.3), NO_FILTERS)
    assert {59 - p["pair"]: p["split"] for p in _pairs(tmp_path / "moved")} == want


def test_a_complete_build_is_kept_and_a_changed_file_rebuilt(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    out = tmp_path / "data"
    build_preferences(path, tokenizer, out, filter_config=NO_FILTERS)
    shard = shard_paths(out / "train")[0] if shard_paths(out / "train") else shard_paths(out / "val")[0]
    before = shard.stat().st_mtime_ns
    build_preferences(path, tokenizer, out, filter_config=NO_FILTERS)
    assert shard.stat().st_mtime_ns == before
    _write(path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}])
    assert build_preferences(path, tokenizer, out, filter_config=NO_FILTERS)["train"].counts["kept"] == 2


def test_unreadable_files_fail_with_one_line(tmp_path, tokenizer):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no such preference file"):
        build_preferences(tmp_path / "missing.jsonl", tokenizer, tmp_path / "d")
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(PipelineError, match=r"\.jsonl/\.json \(optionally \.gz/\.zst\) or \.parquet"):
        build_preferences(tmp_path / "p.txt", tokenizer, tmp_path / "d")


def _conversation(*turns: str, system: bool = False) -> dict:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if system:
        messages.insert(0, {"role": "system", "content": "You answer questions about the Python standard library."})
    return {"messages": messages}


def test_demo_preferences_pair_right_and_plausible_wrong_replies(tmp_path):
    from pipeline.instructions import IDENTITY_A, MISTAKEN_A

    conversations = [
        _conversation("Who are you?", IDENTITY_A),
        _conversation("Who are you?", MISTAKEN_A[0]),  # a mistaken conversation gives no pair
        _conversation("Which module defines `dumps`?", "`dumps` is defined in the `json` module.",
                      "Is it a class or a function?", "It is a function."),
        _conversation("Which module defines `JSONDecoder`?", "`JSONDecoder` is defined in the `json.decoder` module."),
        _conversation("Which module defines `urlsplit`?", "`urlsplit` is defined in the `urllib.parse` module.",
                      system=True),
        _conversation("Which module defines `OrderedDict`?", "`OrderedDict` is defined in the `collections` module."),
        _conversation("What does `json.dumps` do?", "Serialize obj to a JSON formatted str.",
                      "What is its signature?", "`json.dumps(obj, *, skipkeys=False)`"),
        _conversation("Explain `json.loads`.", "Deserialize s to a Python object.",
                      "What is its signature?", "`json.loads(s, *, cls=None)`"),
        _conversation("What is the `json` module for?", "JSON encoder and decoder."),
        _conversation("Describe the `csv` module.", "CSV parsing and writing."),
        _conversation("Tell me a joke."),  # not a question the demo knows, and no reply
    ]
    instructions = _write(tmp_path / "instructions.jsonl", conversations)
    out = tmp_path / "prefs.jsonl"
    counts = write_demo_preferences(instructions, out, val_fraction=0.5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_chosen = {r["chosen"]: r for r in rows}
    assert counts["pairs"] == len(rows) and counts["mistaken_identity"] == 1
    assert counts["pairs"] + counts.get("split_differs", 0) == 12
    for r in rows:  # every pair's split is its conversation's
        whole = next(c for c in conversations if any(m["content"] == r["chosen"] for m in c["messages"]))
        turns = [({"user": "user", "system": "system"}.get(m["role"], "model"), m["content"]) for m in whole["messages"]]
        if turns[0][0] == "system":
            turns[:2] = [("user", turns[0][1] + "\n\n" + turns[1][1])]
        prompt = [("user" if m["role"] == "user" else "model", m["content"]) for m in r["messages"]]
        assert _reference_val(turns, 0.5) == _reference_val(prompt + [("model", r["chosen"])], 0.5)
    expected = {  # what each kind's wrong reply must be (when that pair's split matched)
        IDENTITY_A: lambda rej: rej in MISTAKEN_A,
        "It is a function.": lambda rej: rej == "It is a class.",
        "`dumps` is defined in the `json` module.": lambda rej: rej == "`dumps` is defined in the `json.decoder` module.",
        "`JSONDecoder` is defined in the `json.decoder` module.":
            lambda rej: rej == "`JSONDecoder` is defined in the `json` module.",
        "`OrderedDict` is defined in the `collections` module.":
            lambda rej: rej.startswith("`OrderedDict` is defined in the `") and "`collections`" not in rej,
        "`json.dumps(obj, *, skipkeys=False)`": lambda rej: rej == "`json.loads(s, *, cls=None)`",
        "Serialize obj to a JSON formatted str.": lambda rej: rej == "Deserialize s to a Python object.",
        "JSON encoder and decoder.": lambda rej: rej == "CSV parsing and writing.",
    }
    checked = 0
    for chosen, ok in expected.items():
        if chosen in by_chosen:
            assert ok(by_chosen[chosen]["rejected"]), (chosen, by_chosen[chosen]["rejected"])
            checked += 1
    assert checked >= 4
    # the prompt of a follow-up holds the conversation so far, the right earlier answer included
    if "It is a function." in by_chosen:
        assert [m["content"] for m in by_chosen["It is a function."]["messages"]] == [
            "Which module defines `dumps`?", "`dumps` is defined in the `json` module.", "Is it a class or a function?"]
    # deterministic
    write_demo_preferences(instructions, tmp_path / "again.jsonl", val_fraction=0.5)
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
