"""Friction a new user met (issue 22, item 6): shared variables say so in `make help` and generation's
temperature has its own name; a malformed JSON line names its file and line, and SKIP_BAD_LINES skips and
counts; progress in a log is plain lines; the pickle refusal says how to convert; a run refused on its input
leaves no folder; TEXT_DOCS reaches the stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pipeline.checkpoint import weight_files
from pipeline.corpus import CorpusSpec
from pipeline.errors import PipelineError
from pipeline.tokens import TokenizeConfig, build_token_shards
from schemas.manifest import read_manifest
from tests.stages.helpers import ENV, ROOT, stage


def _settings() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^SETTINGS := \\\n(.*?)\n\n", text, re.S | re.M).group(1)
    return block.replace("\\", " ").split()


def test_make_help_says_which_variables_several_stages_share():
    out = subprocess.run([sys.executable, "-m", "stages.help", *_settings()], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "shared by 6 stages" in lines["SEED"] and "train_student --seed" in lines["SEED"]
    assert "rollouts --seed" in lines["SEED"] and "rlhf --seed" in lines["SEED"]
    assert "shared" not in lines["VOCAB"]
    assert "generate --temperature" in lines["GEN_TEMPERATURE"]  # its own name: TEMPERATURE is the cache's τ
    assert "generate" not in lines["TEMPERATURE"] and "teacher_logits --temperature" in lines["TEMPERATURE"]
    assert "tokenize --text-docs [file]" in lines["TEXT_DOCS"] and "tokenize --skip-bad-lines" in lines["SKIP_BAD_LINES"]


def _bad_jsonl(path):
    rows = [json.dumps({"text": f"document number {i} " * 5}) for i in range(40)]
    rows[7] = '{"text": "unterminated'
    rows[20] = "[1, 2]"
    path.write_text("\n".join(rows) + "\n")


def test_a_malformed_json_line_names_its_file_and_line_and_can_be_skipped(tmp_path, tokenizer, capsys):
    _bad_jsonl(tmp_path / "c.jsonl")
    cfg = TokenizeConfig(seq_len=32, val_fraction=0.3)
    with pytest.raises(PipelineError, match=r"c\.jsonl:8: invalid JSON .*SKIP_BAD_LINES=1"):
        build_token_shards(CorpusSpec(str(tmp_path / "c.jsonl")), tokenizer, tmp_path / "t", cfg)
    manifests = build_token_shards(CorpusSpec(str(tmp_path / "c.jsonl"), skip_bad_lines=1), tokenizer, tmp_path / "u",
                                   cfg)
    err = capsys.readouterr().err
    assert "c.jsonl:8: invalid JSON" in err and "c.jsonl:21: a JSON list" in err
    assert manifests["train"].stats.filters["bad_lines"] == 2 and manifests["val"].stats.filters["bad_lines"] == 0
    assert sum(m.stats.documents for m in manifests.values()) == 38


def test_progress_in_a_log_is_plain_lines():
    code = ("from pipeline.progress import progress\n"
            "for rank in range(3):\n"
            "    with progress(desc=f'tokenize[{rank}]', unit=' tok', unit_scale=True, position=rank) as bar:\n"
            "        bar.update(1234)\n"
            "bar = progress(total=10, desc='s', unit=' step'); bar.set_postfix(loss='1.0', refresh=False)\n"
            "bar.update(4); bar.close()\n")
    err = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120, check=True).stderr
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tokenize[0]", "tokenize[1]", "tokenize[2]", "s"]
    assert "1.23k tok" in lines[0] and "4/10 step (40%)" in lines[3] and "loss=1.0" in lines[3]


def test_the_pickle_refusal_says_how_to_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PipelineError, match="never unpickles.*save_pretrained.*safe_serialization=True"):
        weight_files(tmp_path)


def test_a_run_refused_on_its_input_leaves_no_folder(tmp_path, tokenizer_file):
    result = stage("tokenize", "--work", tmp_path / "w", "--corpus", tmp_path / "missing.txt",
                   "--tokenizer", tokenizer_file, check=False)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    assert not (tmp_path / "w").exists()
    result = stage("teacher_logits", "--work", tmp_path / "w", "--teacher", tmp_path / "nope", check=False)
    assert result.returncode == 2 and "no such teacher directory" in result.stderr
    assert not (tmp_path / "w").exists()


def test_text_docs_reaches_the_stage(tmp_path, tokenizer_file):
    paragraphs = [f"paragraph {i} says something about item {i % 7}." for i in range(200)]
    (tmp_path / "dump.txt").write_text("\n\n".join(paragraphs) + "\n")
    stage("tokenize", "--work", tmp_path / "w", "--corpus", tmp_path / "dump.txt", "--tokenizer", tokenizer_file,
          "--text-docs", "paragraph", "--seq-len", "32", "--val-fraction", "0.2")
    train, val = (read_manifest(tmp_path / "w" / "tokens" / s, "tokens") for s in ("train", "val"))
    assert train.stats.documents + val.stats.documents == 200 and val.stats.documents > 10
