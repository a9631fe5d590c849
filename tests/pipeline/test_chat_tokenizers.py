"""Reply masks and piece cuts whatever the tokenizer: one trained with SentencePiece's default normaliser
(nmt_nfkc: `\\n` becomes `▁` and merges with the next word, a dummy-prefix `▁`), multi-byte text through byte
fallback, and a tokenizer whose `\\n\\n` is one piece.

The reference is independent of the span arithmetic: the trained tokens of a conversation, decoded, must
give back exactly the replies (each followed by `<end_of_turn>`), and the untrained ones exactly the user
turns and the headers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import sentencepiece as spm

from pipeline import chat
from pipeline.corpus import CorpusSpec, plan_units, read_unit
from pipeline.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer
from pipeline.tokens import encode_pieces

WORDS = ("model answer sure here is the function returns a value of the list and for each item we print "
         "modelling modela user question what does it do").split()
RARE = "日本語のテキスト ✓ Ωmega naïve café 😀"  # characters the small vocabulary lacks: byte fallback


def _train(**options) -> Tokenizer:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) + ("\n" + " ".join(rng.choice(WORDS, size=6))) * 2
             for _ in range(400)] + ["modela modela model\nmodela"] * 50
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=300, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, minloglevel=2,
        user_defined_symbols=[START_OF_TURN, END_OF_TURN, *options.pop("symbols", [])], **options)
    return Tokenizer(proto.getvalue(), "<test>")


@pytest.fixture(scope="module")
def default_normalised() -> Tokenizer:
    """SentencePiece's defaults: nmt_nfkc, dummy prefix, extra whitespace removed (`\\n` → `▁`)."""
    return _train()


CONVERSATIONS = [
    [chat.Turn("user", "what does it do?"), chat.Turn("model", "modela returns a value")],
    [chat.Turn("user", "question"), chat.Turn("model", "Sure here is the list"),
     chat.Turn("user", "and for each item?"), chat.Turn("model", "we print " + RARE + " for each item")],
    [chat.Turn("user", RARE), chat.Turn("model", RARE + " naïve")],
]


def _decode(tok: Tokenizer, ids: np.ndarray) -> str:
    return tok.decode(ids.tolist())


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_trained_tokens_are_exactly_the_replies_with_the_default_normaliser(default_normalised, index):
    tok = default_normalised
    turns = CONVERSATIONS[index]
    rendered = chat.render(turns)
    [encoded] = chat.encode(tok, [rendered])
    # The normaliser does merge the header's newline into the reply's first piece (what the fix is about).
    first = encoded.turn_starts[1]
    assert any(tok.piece(i).startswith("▁") for i in encoded.ids[first + 1:first + 4])
    # Group the trained tokens by runs: each run is one reply and its <end_of_turn>.
    runs, run = [], []
    for token, trained in zip(encoded.ids, encoded.model):
        if trained:
            run.append(token)
        elif run:
            runs.append(np.array(run))
            run = []
    if run:
        runs.append(np.array(run))
    replies = [t.content for t in turns if t.role == "model"]
    assert len(runs) == len(replies)
    for reply_ids, reply in zip(runs, replies):
        assert reply_ids[-1] == tok.sp.piece_to_id(END_OF_TURN)
        # independent reference: the reply tokenized on its own, decoded (the normaliser's view of its text)
        assert _decode(tok, reply_ids[:-1]) == tok.decode(tok.encode(reply))
    # Nothing of a header or a user turn trains: the untrained tokens decode to the rest of the template.
    untrained = _decode(tok, encoded.ids[~encoded.model])
    assert "model" in untrained.split(START_OF_TURN)[2]  # the header `<start_of_turn>model` itself
    for reply in replies:
        assert tok.decode(tok.encode(reply)) not in untrained


def test_multibyte_reply_through_byte_fallback_is_trained_whole(default_normalised):
    tok = default_normalised
    turns = CONVERSATIONS[2]
    [encoded] = chat.encode(tok, [chat.render(turns)])
    pieces = [tok.piece(i) for i in encoded.ids]
    assert any(p.startswith("<0x") for p in pieces)  # byte-fallback pieces are there
    trained = _decode(tok, encoded.ids[encoded.model])
    assert trained == tok.decode(tok.encode(RARE + " naïve")) + END_OF_TURN
    assert _decode(tok, encoded.ids[~encoded.model]).count("日本語") == 1  # the user turn's copy only


def test_header_alone_is_never_trained(default_normalised):
    """A model turn's header pieces that do not reach into the reply stay out, whatever the tokenizer."""
    for tok in (default_normalised, _train(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                           add_dummy_prefix=False, symbols=["\n"])):
        rendered = chat.render(CONVERSATIONS[0])
        [encoded] = chat.encode(tok, [rendered])
        out = tok.sp.encode([rendered.text], return_type="offset_mapping")[0]["offsets"]
        start = rendered.replies[0][0]
        for (a, b), trained in zip(out, encoded.model):
            if b <= start and a >= rendered.turn_starts[1]:
                assert not trained  # wholly inside `<start_of_turn>model\n`


def test_a_piece_cut_between_two_newlines_keeps_the_whole_document_ids(tmp_path):
    """A tokenizer with `\\n\\n` as one piece: reading a document in small pieces never cuts a run of
    newlines, so the pieces' ids are the whole document's ids."""
    tok = _train(normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                 symbols=["\n\n", "\n"])
    assert len(tok.encode("a\n\nb")) == 3  # `\n\n` is one piece
    paragraphs = [" ".join(WORDS[i % 7: i % 7 + 5]) for i in range(60)]
    text = "\n\n".join(paragraphs) + "\n  indented line\n\n\nmore text é\n"
    (tmp_path / "doc.txt").write_text(text)
    spec = CorpusSpec(str(tmp_path / "doc.txt"))
    [unit] = plan_units(spec, 1 << 20)
    default = _train()  # and the default normaliser (whitespace runs collapse into one `▁`)
    between = 0
    for size in range(24, 64):  # piece sizes whose plain last-newline cut falls inside `\n\n` for some pieces
        head = text.encode()[:size]
        between += head.endswith(b"\n") and text.encode()[size:size + 1] == b"\n"
        pieces = list(read_unit(spec, unit, piece_bytes=size))
        assert len(pieces) > 20
        assert np.concatenate(encode_pieces(tok, pieces)).tolist() == tok.encode(text), size
        assert np.concatenate(encode_pieces(default, pieces)).tolist() == default.encode(text), size
    assert between  # at least one size would have cut between the two newlines
