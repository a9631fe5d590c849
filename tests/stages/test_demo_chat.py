"""`make demo-chat` on a tiny stand-in: a debug teacher as the base demo's, a small instruction set; the
chain runs, filters, fine-tunes on the model turns, and reports response-token perplexity for a KD/CE pair."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.instructions import first_paragraph, module_name, scan
from schemas.manifest import read_manifest
from tests.stages.helpers import stage

CONFIG = """
[tokenize]
format = "chat"
seq_len = 96
val_fraction = 0.2
shard_windows = 16

[teacher]
max_tokens = 3072
batch_size = 4
warmup_steps = 1
save_every = 0

[teacher_logits]
topk = 8
samples = 4

[train_student]
max_tokens = 3072
batch_size = 4
warmup_steps = 1
eval_windows = 0

[demo_chat]
student = "debug"
student_init = ""
base_config = "configs/demo.toml"
"""


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What does `function_{i}` do?"},
                         {"role": "assistant", "content": f"It adds {i} to the sum."}]}


@pytest.mark.slow
def test_demo_chat_chain(work, tmp_path):
    base = tmp_path / "run"
    shutil.copytree(work / "teacher", base / "teacher")  # the base demo's teacher, as `make demo` leaves it
    data = base / "chat" / "data"
    data.mkdir(parents=True)
    rows = [conversation(i) for i in range(80)] + [
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am ChatGPT."}]}]
    (data / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # instead of the stdlib set
    (tmp_path / "chat.toml").write_text(CONFIG)
    out = stage("demo_chat", "--work", base, "--config", tmp_path / "chat.toml").stdout
    assert "base teacher" not in out  # the base demo's teacher is there: not retrained
    tokens = read_manifest(base / "chat" / "tokens" / "train", "tokens")
    val = read_manifest(base / "chat" / "tokens" / "val", "tokens")
    assert tokens.meta.format == "chat" and tokens.stats.filters["blocklist"] + val.stats.filters["blocklist"] == 1
    assert (base / "chat" / "teacher" / "finished.json").is_file()
    assert json.loads((base / "chat" / "teacher" / "run_config.json").read_text())["train"]["init_from"] == \
        str(base / "teacher")
    report = (base / "chat" / "report" / "report.md").read_text()
    assert "| response CE | response ppl |" in report and "KD (sampled) response-token perplexity" in report
    summary = json.loads((base / "chat" / "report" / "summary.json").read_text())
    assert {m["name"] for m in summary["models"]} == {"teacher", "debug-kd", "debug-ce"}
    assert not (base / "report").exists()  # the base demo's report is not touched
    again = stage("demo_chat", "--work", base, "--config", tmp_path / "chat.toml").stdout
    assert again.count("already complete") == 3  # the teacher and both students


def test_instruction_set_is_built_from_sources_without_importing():
    assert module_name(__import__("pathlib").Path("json/decoder.py")) == "json.decoder"
    assert module_name(__import__("pathlib").Path("_pydecimal.py")) is None
    assert first_paragraph("Line one\n    goes on.\n\nSecond.") == "Line one goes on."
    json_module = next(m for m in scan() if m.name == "json")
    dumps = next(d for d in json_module.definitions if d.name == "dumps")
    assert dumps.kind == "function" and dumps.signature.startswith("dumps(obj, *, skipkeys=False")
    assert dumps.doc.startswith("Serialize ``obj`` to a JSON formatted ``str``")
