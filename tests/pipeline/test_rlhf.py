"""The RLHF library parts TRL does not own: the transformers tokenizer over our tokenizer.model gives our ids on
the chat template (checked against pipeline/chat.py's own encoding, with Gemma-style and default-normalised
tokenizers), the prompts file's errors, the reward read at the last real token whatever the padding, the
policy's KL estimate against the exact KL of a one-token reply, and which checkpoint a resume takes."""

from __future__ import annotations

import io
import json
import math

import pytest
import sentencepiece as spm
import torch

from pipeline import chat
from pipeline.checkpoint import save_model
from pipeline.errors import PipelineError
from pipeline.model import Gemma2
from pipeline.rlhf import (
    hf_tokenizer,
    last_checkpoint,
    policy_kl,
    prompt_texts,
    read_prompts,
    replies,
    reply_logprobs,
    reward_scores,
    reward_tokenizer,
)
from pipeline.tokenizer import BOS, END_OF_TURN, START_OF_TURN, Tokenizer
from tests.conftest import tiny_config

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps`  do?\n\tdef f(x):\n    return 12345"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which module defines `OrderedDict`?"},
     {"role": "assistant", "content": "`OrderedDict` is defined in the `collections` module."},
     {"role": "user", "content": "What is its signature? naïve café ✓"}],
]


def default_normalised(tmp_path) -> Tokenizer:
    """SentencePiece's defaults (nmt_nfkc, a dummy prefix, `\\n` turned into `▁`): unlike Gemma's."""
    texts = ["what does the function return for each item in the list " * 3, "which module defines the class"] * 200
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   character_coverage=1.0, minloglevel=2,
                                   user_defined_symbols=[START_OF_TURN, END_OF_TURN])
    tok = Tokenizer(proto.getvalue(), "<default>")
    tok.save(tmp_path / "default.model")
    return tok


@pytest.mark.parametrize("kind", ["gemma-style", "default-normalised"])
def test_the_transformers_tokenizer_gives_our_ids_on_the_chat_template(tmp_path, tokenizer, tokenizer_file, kind):
    tok, path = (tokenizer, tokenizer_file) if kind == "gemma-style" else (default_normalised(tmp_path),
                                                                            tmp_path / "default.model")
    hf = hf_tokenizer(path)
    for messages in CONVERSATIONS:
        turns = chat.normalize(messages, lambda: "test")
        prompt = hf.bos_token + chat.render(turns, generation_prompt=True).text
        # TRL tokenizes the prompt with special tokens on (none are added: <bos> is spelled in the text) ...
        assert hf(text=[prompt])["input_ids"][0] == chat.prompt_ids(tok, turns)
        # ... and prompt + completion for the reward model with them off: the same ids, <end_of_turn> one piece.
        reply = "`OrderedDict` is defined in the `collections` module." + END_OF_TURN
        ids = hf(text=[prompt + reply], add_special_tokens=False)["input_ids"][0]
        assert ids == [BOS, *tok.encode(chat.render(turns, generation_prompt=True).text + reply)]
        assert ids[-1] == tok.chat_ids()[1]
        # decoding is sentencepiece's (bytes and turn markers kept) and drops <bos> when asked; a Gemma-style
        # tokenizer (identity normaliser) gives the text back, whitespace and all
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids[1:])
        if kind == "gemma-style":
            assert hf.decode(ids, skip_special_tokens=True) == prompt[len(hf.bos_token):] + reply
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (0, 1, 2)


def test_the_reward_model_reads_what_make_reward_model_trained_it_on(tokenizer, tokenizer_file):
    """TRL hands the reward model prompt + decoded completion as text; the reward tokenizer must turn it into the
    ids `make reward-model` trains on (pipeline/preferences.py `template_ids`: <bos> + the template, each reply
    stripped and closed by <end_of_turn> and its newline)."""
    from pipeline.preferences import template_ids

    hf = reward_tokenizer(tokenizer_file)
    for messages in CONVERSATIONS:
        turns = chat.normalize(messages, lambda: "test")
        prompt = hf.bos_token + chat.render(turns, generation_prompt=True).text
        for reply in ("`x` is defined in the `os` module.", "  def f(x):\n    return 1\n"):
            trained = template_ids(tokenizer, [(*turns, chat.Turn("model", reply))])[0]
            got = hf(text=[prompt + reply + END_OF_TURN], add_special_tokens=False)["input_ids"][0]
            assert got == trained
            cut = hf(text=[prompt + reply], add_special_tokens=False)["input_ids"][0]  # no <end_of_turn>: as it is
            assert cut == [BOS, *tokenizer.encode(chat.render(turns, generation_prompt=True).text + reply.strip())]


def test_prompt_files_and_their_errors(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": CONVERSATIONS[1]}, {"prompt": "Which module defines `Path`?", "system": "Be brief."}, {}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    texts, dropped = prompt_texts(path, tokenizer, "<s>", max_prompt=10_000)
    assert dropped == 0 and len(texts) == 2
    assert texts[1] == "<s><start_of_turn>user\nBe brief.\n\nWhich module defines `Path`?<end_of_turn>\n" \
                       "<start_of_turn>model\n"
    short, dropped = prompt_texts(path, tokenizer, "<s>", max_prompt=len(tokenizer.encode(texts[1][3:])) + 1)
    assert len(short) == 1 and dropped == 1  # the long conversation has no room for a reply
    cases = [
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}', "ends with the user"),
        ("{not json", "not JSON"),
        ("[1, 2]", "a list"),
        ('{"text": "q"}', "no messages list and no prompt"),
        ('{"prompt": "a <end_of_turn> b"}', "forge a turn"),
        ('{"prompt": "a </s> b"}', "special token"),
    ]
    for line, message in cases:
        path.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
        with pytest.raises(PipelineError, match=message) as error:
            prompt_texts(path, tokenizer, "<s>", 10_000)
        assert f"{path}:2" in str(error.value)
    with pytest.raises(PipelineError, match="no such prompts file"):
        list(read_prompts(tmp_path / "missing.jsonl"))


def test_the_reward_is_read_at_the_last_token_whatever_the_padding(tokenizer_file):
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    hf = reward_tokenizer(tokenizer_file)
    torch.manual_seed(0)
    raw = tiny_config(vocab_size=hf.vocab_size).to_hf()
    raw.pop("architectures")
    model = Gemma2ForSequenceClassification(Gemma2Config(**raw, num_labels=1, attn_implementation="eager")).eval()
    model.config.pad_token_id = 0
    texts = ["<s><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\nreturns x<end_of_turn>",
             "<s><start_of_turn>user\na longer question here<end_of_turn>\n<start_of_turn>model\nno<end_of_turn>",
             "<s>def f(x):\n    return x"]
    batched = reward_scores(model, hf, texts, batch_size=3)
    for text, score in zip(texts, batched):
        ids = torch.tensor([hf(text=text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():  # the reference: one unpadded sequence, the score of its last position
            alone = model(input_ids=ids).logits[0, 0]
        assert abs(score - float(alone)) < 1e-5


def toy(folder, seed: int):
    """A transformers Gemma 2 made by our save_model from a tiny random model with peaked distributions."""
    from transformers import Gemma2ForCausalLM

    model = Gemma2(tiny_config(vocab_size=40, num_hidden_layers=1), "math")
    model.init_weights(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    save_model(model, folder)
    return Gemma2ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def test_policy_kl_estimates_the_exact_kl_of_a_one_token_reply(tmp_path):
    policy, reference = toy(tmp_path / "p", 1), toy(tmp_path / "r", 2)
    prompt, n = [BOS, 7, 8, 9], 400
    estimate = policy_kl(policy, reference, [prompt], stop=(), max_new_tokens=1, samples=n)
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the exact KL(π ‖ π_ref) of the first reply token, from the full distributions
        p = torch.log_softmax(policy(input_ids=ids).logits[0, -1].double(), -1)
        q = torch.log_softmax(reference(input_ids=ids).logits[0, -1].double(), -1)
    exact = float((p.exp() * (p - q)).sum())
    spread = float((p.exp() * (p - q - exact) ** 2).sum()) ** 0.5  # std of one sample's log-ratio
    assert exact > 0.05
    assert abs(estimate - exact) < 4 * spread / math.sqrt(n)
    assert policy_kl(policy, policy, [prompt, [BOS, 5]], (), max_new_tokens=4, samples=2) == 0.0
    # replies: batched and left-padded, cut after the stop token; greedy ones equal a one-prompt argmax loop
    stop = (3,)
    got = replies(policy, [prompt, [BOS, 5]], stop, max_new_tokens=6)
    for start, reply in zip([prompt, [BOS, 5]], got):
        ids = list(start)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(policy(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop:
                break
        assert reply == ids[len(start):]
    reply = [11, 12]
    with torch.no_grad():
        full = torch.log_softmax(policy(input_ids=torch.tensor([prompt + reply])).logits[0].float(), -1)
    batched = reply_logprobs(policy, [prompt, [BOS, 5]], [reply, [13]])  # the second pair is padded
    assert torch.allclose(batched[0], torch.stack([full[len(prompt) - 1, 11], full[len(prompt), 12]]), atol=1e-5)
    with torch.no_grad():
        alone = torch.log_softmax(policy(input_ids=torch.tensor([[BOS, 5]])).logits[0, -1].float(), -1)[13]
    assert torch.allclose(batched[1], alone[None], atol=1e-5)


def test_a_resume_takes_the_newest_complete_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path / "none") is None
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"trunc')):  # checkpoint-6 was killed while being written
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before its trainer_state.json
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
