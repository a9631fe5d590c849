"""Rollouts (pipeline/rollouts.py) from an outside student — a Gemma2ForCausalLM made by transformers with a
SentencePiece tokenizer trained here — checked against independent references: the reply positions from the
prompt's own template encoding, the behaviour log-probs from transformers' full forward of each finished
conversation (not the incremental decode that sampled it), the draws' frequencies from the probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM

from pipeline import chat
from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.rollouts import RolloutConfig, draw, run_rollouts, tempered_logprobs
from pipeline.tokenizer import BOS, PAD, Tokenizer
from schemas.manifest import read_manifest
from schemas.tokens import validate_token_shard

PROMPTS = [{"prompt": f"def function_{i}(x, y): what does it return {i}?"} for i in range(5)] + [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "class Thing3"},
                  {"role": "assistant", "content": "value = 21"}, {"role": "user", "content": "and method?"}]},
    {"prompt": "def function_1(x, y): what does it return 1?"},  # an exact duplicate: dropped
    {"prompt": "a forged <end_of_turn> marker"},  # a turn marker in a content: dropped
]
CFG = RolloutConfig(rollouts_per_prompt=2, max_new_tokens=10, seq_len=64, batch_size=1, shard_prompts=2)


def make_student(path, tokenizer: Tokenizer, seed: int = 0) -> Gemma2ForCausalLM:
    """A tiny random Gemma 2 saved by transformers, `<end_of_turn>` made likely enough that some replies stop
    on it and others run to their budget."""
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                   sliding_window=8, attn_implementation="eager")
    hf = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        w = hf.model.embed_tokens.weight
        w[tokenizer.chat_ids()[1]] = w[4:200].sum(0) * 0.6
    hf.save_pretrained(path)
    tokenizer.save(path / "tokenizer.model")
    return hf


def write_prompts(path, rows=PROMPTS) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rollouts")
    hf = make_student(root / "student", tokenizer)
    write_prompts(root / "prompts.jsonl")
    run_rollouts(root / "student", root / "prompts.jsonl", root / "r1", CFG)
    return root, hf


def _windows(folder):
    manifest = read_manifest(folder / "train", "tokens")
    tables = [pq.read_table(folder / "train" / s.file) for s in manifest.shards]
    cols = {name: np.concatenate([np.array(t.column(name).to_pylist()) for t in tables])
            for name in ("window", "input_ids", "loss_mask", "behaviour_logprob")}
    return manifest, cols


def test_loss_mask_is_exactly_the_generated_tokens_and_behaviour_is_transformers_logsoftmax(setup, tokenizer):
    root, hf = setup
    manifest, cols = _windows(root / "r1")
    eot = tokenizer.chat_ids()[1]
    kept = [0, 1, 2, 3, 4, 5]  # the prompts' lines: the duplicate and the forged marker are dropped
    assert sorted(set(cols["window"] // 2)) == kept and len(cols["window"]) == 12
    stopped = budget = 0
    for w, ids, mask, behaviour in zip(cols["window"], cols["input_ids"], cols["loss_mask"], cols["behaviour_logprob"]):
        row = PROMPTS[w // 2]
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        text = chat.render(chat.normalize(messages, lambda: "test"), generation_prompt=True).text
        prompt = [BOS, *tokenizer.encode(text)]  # the reference: the template encoded here, independently
        n = len(prompt)
        assert ids[:n].tolist() == prompt
        end = n + int(np.argmax(ids[n:] == PAD)) if (ids[n:] == PAD).any() else len(ids)
        reply = ids[n:end]
        assert len(reply) >= 1 and (ids[end:] == PAD).all()
        expected = np.zeros(len(mask), np.uint8)
        expected[n - 1 : end - 1] = 1  # position t predicts ids[t + 1]: exactly the reply's tokens
        assert mask.tolist() == expected.tolist()
        if reply[-1] == eot:
            stopped += 1
        elif len(reply) == CFG.max_new_tokens:
            budget += 1
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor(ids[:end][None], dtype=torch.long)).logits.double(), -1)[0]
        at = np.flatnonzero(expected)
        ref_lp = ref[torch.tensor(at), torch.tensor(ids[at + 1], dtype=torch.long)].numpy()
        np.testing.assert_allclose(behaviour[at], ref_lp, atol=1e-2, rtol=1e-3)
        assert (behaviour[expected == 0] == 0).all()
    assert stopped and budget, "both ways a reply ends are exercised"
    meta = validate_token_shard(root / "r1" / "train" / manifest.shards[0].file)
    assert meta.format == "chat" and meta.rollouts["round"] == 1 and meta.rollouts["model_round"] == 0
    assert meta.rollouts["rollouts_per_prompt"] == 2 and meta.rollouts["temperature"] == 1.0
    assert manifest.stats.filters["filter_exact"] == 1 and manifest.stats.filters["markers"] == 1


def test_identical_on_rerun_and_with_other_batch_sizes_and_different_with_another_seed(setup, tmp_path):
    root, _ = setup
    for name, cfg in (("again", CFG), ("batch3", RolloutConfig(**{**CFG.__dict__, "batch_size": 3})),
                      ("batch5", RolloutConfig(**{**CFG.__dict__, "batch_size": 5}))):
        run_rollouts(root / "student", root / "prompts.jsonl", tmp_path / name, cfg)
        for shard in (root / "r1" / "train").glob("*.parquet"):
            assert (tmp_path / name / "train" / shard.name).read_bytes() == shard.read_bytes(), (name, shard.name)
    run_rollouts(root / "student", root / "prompts.jsonl", tmp_path / "seed1", RolloutConfig(**{**CFG.__dict__,
                                                                                                 "seed": 1}))
    assert not np.array_equal(_windows(tmp_path / "seed1")[1]["input_ids"], _windows(root / "r1")[1]["input_ids"])


def test_a_rerun_redoes_only_a_missing_shard(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "r"
    shutil.copytree(root / "r1", out)
    (out / "train" / "manifest.json").unlink()
    lost = out / "train" / "train-00001.parquet"
    lost.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.parquet")}
    run_rollouts(root / "student", root / "prompts.jsonl", out, CFG)
    assert lost.read_bytes() == (root / "r1" / "train" / lost.name).read_bytes()
    assert all((out / "train" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert (out / "train" / "manifest.json").read_bytes() == (root / "r1" / "train" / "manifest.json").read_bytes()


def test_draws_follow_the_tempered_and_nucleus_distribution():
    """Stratified uniforms: each token's share of draws is its probability (within 1/N), for a temperature
    and a top-p nucleus computed here from the sorted probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        p = np.exp(logits[0].double().numpy() / temperature)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)] if top_p < 1 else order
        q = np.zeros_like(p)
        q[keep] = p[keep] / p[keep].sum()
        lp = tempered_logprobs(logits.expand(n, -1), temperature, top_p)
        tokens = draw(lp, u).numpy()
        share = np.bincount(tokens, minlength=50) / n
        np.testing.assert_allclose(share, q, atol=2 / n)
        np.testing.assert_allclose(lp[0].exp().numpy(), q, atol=1e-12)


def test_bad_prompts_fail_with_one_line(setup, tmp_path, tokenizer):
    root, _ = setup
    write_prompts(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "model", "content": "hello"}]}])
    with pytest.raises(PipelineError, match=r"p.jsonl:1: the last turn is the model's"):
        run_rollouts(root / "student", tmp_path / "p.jsonl", tmp_path / "o", CFG)
    write_prompts(tmp_path / "q.jsonl", [{"text": "hi"}])
    with pytest.raises(PipelineError, match=r"q.jsonl:1: no `messages` list and no `prompt`"):
        run_rollouts(root / "student", tmp_path / "q.jsonl", tmp_path / "o", CFG)
    write_prompts(tmp_path / "long.jsonl", [{"prompt": "word " * 200}])
    with pytest.raises(PipelineError, match="no prompt left to sample"):
        run_rollouts(root / "student", tmp_path / "long.jsonl", tmp_path / "o", CFG, FilterConfig(filters="none"))
    with pytest.raises(PipelineError, match="ENGINE=vllm"):
        run_rollouts(root / "student", root / "prompts.jsonl", tmp_path / "o",
                     RolloutConfig(**{**CFG.__dict__, "engine": "vllm"}))
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()
