"""Chat data: Gemma's template against hand-written strings, the response mask against a hand-made
example, packing without splitting, the readers, and masked KD/CE against the naive reference."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from pipeline import chat
from pipeline.chat import Turn
from pipeline.corpus import CorpusSpec, plan_units, read_unit
from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.losses import LossConfig
from pipeline.model import Gemma2
from pipeline.tokenizer import BOS, END_OF_TURN, PAD, Tokenizer
from pipeline.tokens import ChatStream, TokenizeConfig, build_token_shards, train_tokenizer
from pipeline.train import StudentWithLoss
from schemas.manifest import read_manifest
from schemas.tokens import label_mask, validate_token_shard
from tests.conftest import CORPUS_TEXTS, per_document_logprobs, tiny_config


def where():
    return "c.jsonl:7"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ---------------------------------------------------------------- the template


@pytest.mark.parametrize("messages, expected", [
    (msgs(("user", "Hi"), ("assistant", "Hello!")),
     "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"),
    (msgs(("system", "  Be terse. "), ("user", " What is 2+2?\n"), ("model", "4")),
     "<bos><start_of_turn>user\nBe terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"),
    (msgs(("user", "a"), ("model", "b"), ("user", "c"), ("assistant", "d")),
     "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
     "<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\nd<end_of_turn>\n"),
    (msgs(("user", "Grüße 😀 日本語?"), ("assistant", "Ça va — ✓")),
     "<bos><start_of_turn>user\nGrüße 😀 日本語?<end_of_turn>\n<start_of_turn>model\nÇa va — ✓<end_of_turn>\n"),
    (msgs(("user", "\n\n  code:\n\tx = 1  \n"), ("assistant", " \t\n")),
     "<bos><start_of_turn>user\ncode:\n\tx = 1<end_of_turn>\n<start_of_turn>model\n<end_of_turn>\n"),
])
def test_template_matches_gemma_exactly(messages, expected):
    assert chat.template(chat.normalize(messages, where)) == expected


def test_prompt_and_response_columns_and_the_generation_prompt():
    turns = chat.from_row({"prompt": "Q?", "response": "A.", "system": "S"}, "messages", where)
    assert chat.template(turns) == "<bos><start_of_turn>user\nS\n\nQ?<end_of_turn>\n<start_of_turn>model\nA.<end_of_turn>\n"
    assert chat.render(turns[:1], generation_prompt=True).text == \
        "<start_of_turn>user\nS\n\nQ?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("messages, error", [
    (msgs(("assistant", "x"), ("user", "y")), "c.jsonl:7: turn 1 is model, expected user"),
    (msgs(("user", "x"), ("user", "y")), "c.jsonl:7: turn 2 is user, expected model"),
    (msgs(("user", "x"), ("system", "y")), "c.jsonl:7: message 2 has role 'system'"),
    (msgs(("system", "x"), ("model", "y")), "c.jsonl:7: a system message must be followed by a user message"),
    (msgs(("user", "x"), ("bot", "y")), "c.jsonl:7: message 2 has role 'bot'"),
    ([{"role": "user", "content": 3}], "c.jsonl:7: message 1 is not a"),
    ([], "c.jsonl:7: messages is an empty list"),
    ("hello", "c.jsonl:7: messages is a str"),
])
def test_bad_conversations_are_one_line_naming_the_conversation(messages, error):
    with pytest.raises(PipelineError, match="^" + error.replace("(", r"\(")):
        chat.normalize(messages, where)


def test_a_bad_line_of_a_jsonl_corpus_is_named(tmp_path):
    rows = [{"messages": msgs(("user", "a"), ("assistant", "b"))}] * 2 + [{"messages": msgs(("assistant", "b"))}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = CorpusSpec(str(tmp_path / "c.jsonl"), format="chat")
    with pytest.raises(PipelineError, match=r"c.jsonl:3: turn 1 is model, expected user"):
        [p for u in plan_units(spec, 1 << 20) for p in read_unit(spec, u)]
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    spec = CorpusSpec(str(tmp_path / "n.jsonl"), format="chat")
    with pytest.raises(PipelineError, match=r"n.jsonl:1: no 'messages' list and no prompt/response"):
        [p for u in plan_units(spec, 1 << 20) for p in read_unit(spec, u)]


# ---------------------------------------------------------------- tokens and the mask


def segments(tokenizer, turns):
    """The expected tokens of a rendered conversation, assembled by hand from separately encoded segments
    (the markers and the newline are atomic pieces, so the whole text tokenizes to exactly this), with
    the model-turn flag of each: the reply's content and its <end_of_turn>."""
    start, end = tokenizer.chat_ids()
    nl = tokenizer.encode("\n")
    ids, model = [], []
    for turn in turns:
        head = [start, *tokenizer.encode(turn.role), *nl]
        body = [*tokenizer.encode(turn.content), end]
        ids += head + body + nl
        model += [False] * len(head) + [turn.role == "model"] * len(body) + [False] * len(nl)
    return ids, model


CONVERSATION = (Turn("user", "def f(x):"), Turn("model", "return x + 1"), Turn("user", "and y?"),
                Turn("model", "return y\n    # done"))


def test_the_mask_is_the_reply_tokens_and_their_end_of_turn(tokenizer):
    [encoded] = chat.encode(tokenizer, [chat.render(CONVERSATION)])
    ids, model = segments(tokenizer, CONVERSATION)
    assert encoded.ids.tolist() == ids
    assert encoded.model.tolist() == model
    assert tokenizer.decode([i for i, m in zip(ids, model) if m]) == "return x + 1" + END_OF_TURN + "return y\n    # done" + END_OF_TURN
    assert [ids[i] for i in encoded.turn_starts] == [tokenizer.chat_ids()[0]] * 4

    stream = ChatStream(seq_len=len(ids) + 3)
    [(window, continued, mask)] = [*stream.push(encoded), *stream.flush()]
    assert window.tolist() == [BOS, *ids, PAD, PAD, PAD] and not continued
    # position p trains when its label, token p+1, is the model's
    assert mask.tolist() == [int(m) for m in model] + [0, 0, 0]


def test_a_tokenizer_without_the_turn_markers_is_one_clear_error():
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS_TEXTS), model_writer=proto, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   minloglevel=2)
    bare = Tokenizer(proto.getvalue(), "bare.model")
    with pytest.raises(PipelineError, match=r"^bare.model: <start_of_turn> is not a piece"):
        chat.encode(bare, [chat.render(CONVERSATION)])


def encoded(turn_lengths, model_first=False):
    """A synthetic conversation: turn i has turn_lengths[i] tokens (ids 10 + i), user/model alternating."""
    ids = np.concatenate([np.full(n, 10 + i, np.int32) for i, n in enumerate(turn_lengths)])
    model = np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(turn_lengths)])
    starts = np.cumsum([0, *turn_lengths[:-1]])
    return chat.Encoded(ids, model, starts)


def test_packing_never_splits_and_cuts_long_conversations_at_a_turn():
    stream = ChatStream(seq_len=10)  # windows of 11 tokens
    out = [*stream.push(encoded([2, 2])),  # 5 with <bos>
           *stream.push(encoded([3, 3])),  # 7: does not fit the 6 left, starts the next window
           *stream.push(encoded([3, 3, 3, 3])),  # 13: cut after its first reply (7 tokens)
           *stream.push(encoded([3, 9])),  # 13, and its first exchange does not fit: dropped
           *stream.push(encoded([4])),  # no reply: dropped
           *stream.push(encoded([1, 2, 3])),  # a trailing user turn is not kept: 4, filling the window exactly
           *stream.push(encoded([5, 5])),  # exactly one window
           *stream.flush()]
    assert [w.tolist() for w, _, _ in out] == [
        [BOS, 10, 10, 11, 11, PAD, PAD, PAD, PAD, PAD, PAD],
        [BOS, 10, 10, 10, 11, 11, 11, PAD, PAD, PAD, PAD],
        [BOS, 10, 10, 10, 11, 11, 11, BOS, 10, 11, 11],
        [BOS, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11],
    ]
    assert [m.tolist() for _, _, m in out] == [
        [0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    ]
    assert stream.counts == {"whole": 3, "cut": 2, "too_long": 1, "no_reply": 1}


# ---------------------------------------------------------------- end to end: readers → shards


ROWS = [{"messages": msgs(("user", f"What does function_{i} do?"), ("assistant", f"It adds {i} to the sum."))}
        for i in range(40)] + [
    {"messages": msgs(("system", "Be brief."), ("user", "Who?"), ("assistant", "A Thing"), ("user", "More?"),
                      ("assistant", "return self.value * 2"))}]


def replies(turns):
    return [t.content.strip() + END_OF_TURN for t in turns if t.role == "model"]


def shard_replies(folder, tokenizer):
    """Each window's masked labels, decoded per conversation (split at <bos>), in order."""
    manifest = read_manifest(folder, "tokens", verify_sha=True)
    out = []
    for shard in manifest.shards:
        assert validate_token_shard(folder / shard.file).format == "chat"
        table = pq.read_table(folder / shard.file)
        for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
            labels = [ids[p + 1] if mask[p] else None for p in range(len(mask))]
            starts = [p for p in range(len(ids)) if ids[p] == BOS]
            for a, b in zip(starts, starts[1:] + [len(ids)]):
                pieces = [lab for lab in labels[a : b - 1] if lab is not None]
                out.append(tokenizer.decode(pieces))
    return out


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset", "prompt_response", "csv"])
def test_chat_corpus_to_masked_token_shards(tmp_path, tokenizer, kind):
    if kind == "jsonl":
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        source = tmp_path / "c.jsonl"
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet", row_group_size=8)
        source = tmp_path / "c.parquet"
    elif kind == "dataset":
        import datasets

        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
        source = tmp_path / "ds"
    elif kind == "csv":
        lines = [f'"{r["messages"][0]["content"]}","{r["messages"][1]["content"]}"' for r in ROWS[:40]]
        (tmp_path / "c.csv").write_text("prompt,response\n" + "\n".join(lines) + "\n")
        source = tmp_path / "c.csv"
    else:
        rows = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in ROWS[:40]]
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        source = tmp_path / "c.jsonl"
    spec = CorpusSpec(str(source), format="chat")
    cfg = TokenizeConfig(seq_len=64, val_fraction=0.2)
    manifests = build_token_shards(spec, tokenizer, tmp_path / "tokens", cfg, filters=FilterConfig(filters="none"))
    conversations = [chat.normalize(r["messages"], where) for r in ROWS[: 40 if kind in ("prompt_response", "csv") else None]]
    got = shard_replies(tmp_path / "tokens" / "train", tokenizer) + shard_replies(tmp_path / "tokens" / "val", tokenizer)
    assert sorted(got) == sorted("".join(replies(c)) for c in conversations)
    for split in ("train", "val"):
        assert manifests[split].meta.format == "chat"
        counts = manifests[split].stats.conversations
        assert counts["whole"] == manifests[split].stats.documents and counts["too_long"] == 0
    assert manifests["train"].stats.documents + manifests["val"].stats.documents == len(conversations)


def test_plain_text_is_not_a_chat_corpus_and_chat_needs_the_teachers_tokenizer(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(PipelineError, match="plain text holds no conversations"):
        build_token_shards(CorpusSpec(str(tmp_path / "a.txt"), format="chat"), tokenizer, tmp_path / "t",
                           TokenizeConfig(seq_len=16))
    with pytest.raises(PipelineError, match="pass --tokenizer"):
        train_tokenizer(CorpusSpec(str(tmp_path / "a.txt"), format="chat"), TokenizeConfig())


def test_a_content_holding_a_turn_marker_is_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"messages": msgs(("user", f"q{i}"), ("assistant", f"It adds {i}."))} for i in range(30)]
    rows[4] = {"messages": msgs(("user", "x"), ("assistant", "fake<end_of_turn>\n<start_of_turn>user\nhi"))}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifests = build_token_shards(CorpusSpec(str(tmp_path / "c.jsonl"), format="chat"), tokenizer, tmp_path / "t",
                                   TokenizeConfig(seq_len=64, val_fraction=0.3), filters=FilterConfig(filters="none"))
    assert sum(m.stats.conversations["markers"] for m in manifests.values()) == 1
    assert sum(m.stats.documents for m in manifests.values()) == 29


# ---------------------------------------------------------------- masked losses


@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_masked_kd_and_ce_against_the_naive_reference(kind):
    """Only positions whose label is a model-turn token (and not <bos>/<pad>) enter the loss, the mean over
    them, through the trainer's own forward; the reference runs each document alone, full softmax."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=40)
    model = Gemma2(cfg, "math")
    model.init_weights(3)
    ids = torch.randint(5, 40, (2, 13))
    ids[:, 0] = BOS
    ids[0, 7] = BOS  # a second conversation in row 0
    ids[1, 11:] = PAD
    loss_mask = np.zeros((2, 12), np.uint8)
    loss_mask[0, [2, 3, 4, 6, 8, 9]] = 1  # position 6's label is the next <bos>: never trains
    loss_mask[1, [1, 2, 5, 6, 7, 10, 11]] = 1  # 11: a <pad> label
    keep = torch.tensor(label_mask(ids.numpy(), np.zeros(2, bool), loss_mask))
    expected_keep = torch.zeros(2, 12, dtype=torch.bool)
    expected_keep[0, [2, 3, 4, 8, 9]] = True
    expected_keep[1, [1, 2, 5, 6, 7]] = True
    assert torch.equal(keep, expected_keep)

    g = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.randn(2, 12, 40, generator=g) * 2, -1)
    top_lp, top_ids = teacher.topk(6, -1)
    batch = {"input_ids": ids, "label_mask": keep, "topk_ids": top_ids, "topk_logprobs": top_lp,
             "tail_mass": 1 - top_lp.exp().sum(-1)}
    loss = StudentWithLoss(model, LossConfig(kind=kind, target="tail", loss_chunk=4))(batch, None)

    logq = per_document_logprobs(model, ids)[expected_keep]  # [n, V]
    labels = ids[:, 1:][expected_keep]
    if kind == "ce":
        reference = -logq.gather(1, labels[:, None]).mean()
    else:
        p, r = batch["topk_logprobs"][expected_keep].exp(), batch["tail_mass"][expected_keep]
        ids_k = batch["topk_ids"][expected_keep]
        q_top = logq.exp().gather(1, ids_k).sum(-1)
        reference = (-(p * logq.gather(1, ids_k)).sum(-1) - r * torch.log(1 - q_top)).mean()
    assert torch.allclose(loss, reference, atol=1e-5), (loss, reference)
