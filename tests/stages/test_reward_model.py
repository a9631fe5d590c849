"""`make reward-model` as a user runs it: an outside preference JSONL and a transformers-made tiny Gemma 2 give
a folder `AutoModelForSequenceClassification` loads, whose held-out pairwise accuracy on separable pairs is
≥ 0.9; a killed run resumes to the weights of an uninterrupted one; a finished folder is skipped; bad input
gives one line and exit 2.

The held-out accuracy is recomputed independently of the stage: the val pairs' rows of the JSONL, the template
written out by hand, encoded with sentencepiece directly, each sequence scored alone (no padding)."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import CORPUS_TEXTS
from tests.stages.helpers import popen, stage

WORDS = sorted({w for text in CORPUS_TEXTS[:20] for w in text.replace("'", " ").replace(":", " ").split()
                if w.isalpha()})
FAST = ("--lr", "3e-3", "--batch-size", "8", "--val-fraction", "0.15")


def _base(folder: Path, tokenizer_file: Path) -> Path:
    """A tiny random Gemma 2 saved by transformers, with our SentencePiece tokenizer.model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_file)
    cfg = Gemma2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                       sliding_window=16, query_pre_attn_scalar=16, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save(folder / "tokenizer.model")
    return folder


def _separable(path: Path, n: int) -> list[dict]:
    """Random prompts and replies; the chosen reply always ends `return value`, the rejected `class Thing`."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        def words(k: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(k))
        rows.append({"prompt": f"{words(rng.randint(3, 8))} {i}?", "chosen": f"{words(rng.randint(1, 5))} return value",
                     "rejected": f"{words(rng.randint(1, 5))} class Thing"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("reward")
    base = _base(root / "base", tokenizer_file)
    rows = _separable(root / "prefs.jsonl", 240)
    return root, base, rows


def _reference_rewards(model, tokenizer_file: Path, rows: list[dict]) -> tuple[list[float], list[float]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))

    def reward(prompt: str, reply: str) -> float:
        text = f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n"
        ids = torch.tensor([[2, *sp.encode(text)]])
        with torch.no_grad():
            return float(model(input_ids=ids).logits[0, 0])

    return [reward(r["prompt"], r["chosen"]) for r in rows], [reward(r["prompt"], r["rejected"]) for r in rows]


def test_held_out_accuracy_on_separable_preferences(setup, tokenizer_file):
    from transformers import AutoModelForSequenceClassification

    root, base, rows = setup
    out = root / "rm"
    result = stage("reward_model", "--work", root, "--preferences", root / "prefs.jsonl", "--base", base, "--out", out,
                   "--max-steps", "40", "--save-every", "0", *FAST)
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    finished = json.loads((out / "finished.json").read_text())
    assert printed["eval_accuracy"] == finished["eval_accuracy"] and finished["steps"] == 40
    for name in ("config.json", "model.safetensors", "tokenizer.model", "run_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert (out / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "Gemma2ForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    val = [rows[i] for i in pq.read_table(next((out / "data" / "val").glob("*.parquet"))).column("pair").to_pylist()]
    assert len(val) == finished["eval_pairs"] >= 15
    chosen, rejected = _reference_rewards(model, tokenizer_file, val)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(val)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(val)
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(finished["eval_accuracy"]) and margin == pytest.approx(finished["eval_margin"],
                                                                                           abs=1e-4)
    assert finished["data"]["rows"] == 240 and finished["train_pairs"] + finished["eval_pairs"] == 240
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in logged) and logged[-1]["final_eval_accuracy"] == finished["eval_accuracy"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_killed_run_resumes_and_a_finished_one_is_skipped(setup):
    root, base, _ = setup
    args = ("--preferences", root / "prefs.jsonl", "--base", base, "--max-steps", "40", "--save-every", "10", *FAST)
    whole = root / "whole"
    stage("reward_model", "--work", root, "--out", whole, *args)
    killed = root / "killed"
    proc = popen("reward_model", "--work", root, "--out", killed, *args)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-10" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "finished.json").is_file():
        pytest.skip("the run finished before it could be killed")
    result = stage("reward_model", "--work", root, "--out", killed, *args)
    assert "resuming from" in result.stdout
    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    before = (killed / "finished.json").read_text()
    again = stage("reward_model", "--work", root, "--out", killed, *args)
    assert "nothing to do" in again.stdout and (killed / "finished.json").read_text() == before
    # another trajectory setting on a finished folder is refused, naming it
    refused = stage("reward_model", "--work", root, "--out", killed, *args, "--seed", "3", check=False)
    assert refused.returncode == 2 and "train.seed" in refused.stderr


@pytest.mark.parametrize("case", ["no_config", "no_tokenizer", "no_file", "bad_suffix", "too_few"])
def test_bad_input_gives_one_line(setup, tmp_path, case):
    root, base, _ = setup
    prefs = root / "prefs.jsonl"
    if case == "no_config":
        broken = tmp_path / "base"
        broken.mkdir()
        (broken / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
        base, expected = broken, "config.json"
    elif case == "no_tokenizer":
        broken = tmp_path / "base"
        broken.mkdir()
        for name in ("config.json", "model.safetensors"):
            (broken / name).write_bytes((base / name).read_bytes())
        base, expected = broken, "no tokenizer.model"
    elif case == "no_file":
        prefs, expected = tmp_path / "missing.jsonl", "no such preference file"
    elif case == "bad_suffix":
        prefs = tmp_path / "prefs.csv"
        prefs.write_text("prompt,chosen,rejected\n")
        expected = "a preference file is .jsonl"
    else:
        prefs = tmp_path / "few.jsonl"
        prefs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3))
                         + "{broken\n")
        expected = "need at least"
    out = tmp_path / "rm"
    result = stage("reward_model", "--work", tmp_path, "--preferences", prefs, "--base", base, "--out", out,
                   check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert all(line.startswith("skipped: ") for line in lines[:-1]), result.stderr  # bad rows are named, then one error
    assert not (out / "finished.json").exists() and not (out / "config.json").exists()


def test_make_tokens_format_preference_builds_what_the_reward_model_reads(setup, tmp_path, tokenizer_file):
    """`make tokens FORMAT=preference` → WORK/preferences; `make reward-model PREFERENCES=<that folder>` trains
    the weights the preference file itself gives; a folder made with another tokenizer is refused."""
    root, base, _ = setup
    args = ("--base", base, "--max-steps", "20", "--save-every", "0", *FAST)
    stage("tokenize", "--work", tmp_path, "--corpus", root / "prefs.jsonl", "--format", "preference", "--tokenizer",
          tokenizer_file, "--val-fraction", "0.15")
    built = tmp_path / "preferences"
    for split in ("train", "val"):
        assert (built / split / "manifest.json").is_file() and list((built / split).glob("*.parquet"))
    stage("reward_model", "--work", tmp_path, "--preferences", built, "--out", tmp_path / "from-folder", *args)
    stage("reward_model", "--work", tmp_path, "--preferences", root / "prefs.jsonl", "--out", tmp_path / "from-file",
          *args)
    assert not (tmp_path / "from-folder" / "data").exists()  # read in place
    a, b = _weights(tmp_path / "from-folder"), _weights(tmp_path / "from-file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder, file = (json.loads((tmp_path / x / "finished.json").read_text()) for x in ("from-folder", "from-file"))
    assert folder["eval_accuracy"] == file["eval_accuracy"] and folder["eval_pairs"] == file["eval_pairs"] > 0
    # another tokenizer: the manifest's fingerprint differs from BASE's
    from pipeline.tokenizer import Tokenizer

    Tokenizer.train(CORPUS_TEXTS, vocab_size=380).save(tmp_path / "other.model")
    stage("tokenize", "--work", tmp_path / "w2", "--corpus", root / "prefs.jsonl", "--format", "preference",
          "--tokenizer", tmp_path / "other.model", "--val-fraction", "0.15")
    refused = stage("reward_model", "--work", tmp_path, "--preferences", tmp_path / "w2" / "preferences", "--out",
                    tmp_path / "refused", *args, check=False)
    assert refused.returncode == 2 and "tokenized with another tokenizer" in refused.stderr, refused.stderr
    missing = stage("tokenize", "--work", tmp_path / "w3", "--corpus", root / "prefs.jsonl", "--format", "preference",
                    check=False)
    assert missing.returncode == 2 and "needs --tokenizer" in missing.stderr
