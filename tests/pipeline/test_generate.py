"""Sampling: greedy is deterministic and is the argmax of the document-masked forward; top-p draws only
from the nucleus; a seed reproduces a draw; the chat template frames a chat-trained model's prompt."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.checkpoint import save_model
from pipeline.errors import PipelineError
from pipeline.generate import SampleConfig, chat_trained, encode_prompt, generate, next_token
from pipeline.model import Gemma2
from pipeline.tokenizer import BOS, EOS
from tests.conftest import tiny_config


def toy_model():
    model = Gemma2(tiny_config(vocab_size=50), "math")
    model.init_weights(5)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)  # peaked distributions
    return model.eval()


def test_greedy_is_deterministic_and_the_argmax_of_a_plain_forward():
    model = toy_model()
    prompt = [BOS, 7, 8, 9]
    cfg = SampleConfig(max_new_tokens=8)
    out = generate(model, prompt, cfg, stop=())
    assert out == generate(model, prompt, cfg, stop=()) and len(out) == 8
    ids = list(prompt)
    for _ in range(8):  # the reference: one unmasked causal forward per step, by hand
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == BOS:
            break
    assert out == ids[len(prompt):]


def test_generation_stops_at_a_stop_token_and_at_the_position_limit():
    model = toy_model()
    first = generate(model, [BOS, 3], SampleConfig(max_new_tokens=1), stop=())[0]
    assert generate(model, [BOS, 3], SampleConfig(max_new_tokens=20), stop=(first,)) == [first]
    long = generate(model, [BOS] + [5] * 60, SampleConfig(max_new_tokens=20), stop=())
    assert len(long) <= model.config.max_position_embeddings - 61
    with pytest.raises(PipelineError, match="starts with <bos>"):
        generate(model, [5, 6], SampleConfig())


def test_top_p_draws_only_from_the_nucleus_and_a_seed_repeats_a_draw():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05]))
    nucleus = {1, 2}  # 0.5 + 0.3 reaches 0.75; nothing else may come out
    draws = [next_token(logits, SampleConfig(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(s))
             for s in range(300)]
    assert set(draws) == nucleus
    assert abs(draws.count(1) / 300 - 0.5 / 0.8) < 0.08  # renormalised within the nucleus
    full = [next_token(logits, SampleConfig(temperature=1.0), torch.Generator().manual_seed(s)) for s in range(300)]
    assert set(full) == {0, 1, 2, 3, 4}
    assert next_token(logits, SampleConfig(temperature=1.0, top_p=0.01), torch.Generator()) == 1  # just the top token
    model = toy_model()
    hot = SampleConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=3)
    assert generate(model, [BOS, 4], hot, ()) == generate(model, [BOS, 4], hot, ())
    assert generate(model, [BOS, 4], hot, ()) != generate(model, [BOS, 4], SampleConfig(10, 1.5, 0.9, seed=4), ())


def test_bad_sampling_settings():
    with pytest.raises(PipelineError, match="top-p"):
        SampleConfig(top_p=0)


def test_the_chat_template_frames_a_chat_prompt(tokenizer):
    ids, stop = encode_prompt(tokenizer, "What does `f` do?", chat=True, system="Be brief.")
    assert ids[0] == BOS and tokenizer.decode(ids[1:]) == \
        "<start_of_turn>user\nBe brief.\n\nWhat does `f` do?<end_of_turn>\n<start_of_turn>model\n"
    assert stop == (tokenizer.chat_ids()[1], EOS)
    plain, stop = encode_prompt(tokenizer, "def f(x):", chat=False)
    assert plain == [BOS, *tokenizer.encode("def f(x):")] and stop == (EOS,)


def test_chat_trained_reads_the_training_data_format(tmp_path, tokenizer_file):
    model = toy_model()
    for name, fmt in (("chat", "chat"), ("text", "text")):
        folder = tmp_path / name
        save_model(model, folder, tokenizer=tokenizer_file)
        data = tmp_path / f"data-{name}"
        (data / "train").mkdir(parents=True)
        (data / "train" / "manifest.json").write_text(json.dumps({"meta": {"format": fmt}}))
        (folder / "run_config.json").write_text(json.dumps({"data": str(data)}))
    assert chat_trained(tmp_path / "chat") is True and chat_trained(tmp_path / "text") is False
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "merge_config.json").write_text(json.dumps({"inputs": [str(tmp_path / "chat")]}))
    assert chat_trained(tmp_path / "merged") is True
    assert chat_trained(tmp_path / "nowhere") is None
