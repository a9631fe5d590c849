from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.tokenizer import BOS, EOS, PAD, UNK, Tokenizer
from tests.conftest import CORPUS_TEXTS


def test_train_round_trip(tokenizer):
    assert tokenizer.vocab_size == 400
    for text in (CORPUS_TEXTS[3], "x = 1\n\tif y:  # two  spaces\n        z()\n", "héllo 😀 42"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(3 <= i < 400 for i in ids) or UNK not in ids


def test_special_ids(tokenizer):
    assert [tokenizer.piece(i) for i in (PAD, EOS, BOS, UNK)] == ["<pad>", "</s>", "<s>", "<unk>"]


def test_fingerprint_stable_and_saved(tokenizer, tokenizer_file):
    again = Tokenizer.load(tokenizer_file)
    assert again.fingerprint == tokenizer.fingerprint
    assert Tokenizer.train(CORPUS_TEXTS, vocab_size=400).fingerprint == tokenizer.fingerprint
    assert Tokenizer.train(CORPUS_TEXTS, vocab_size=420).fingerprint != tokenizer.fingerprint


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(PipelineError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
