"""SentencePiece tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), so a tokenizer we train
and a real Gemma 2 `tokenizer.model` go through the same code. Chat data needs Gemma's turn markers
`<start_of_turn>` / `<end_of_turn>` as single pieces that the text itself produces (ids 106/107 in
gemma-2, user-defined pieces there); a tokenizer trained here has them as user-defined symbols too."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from pipeline.errors import PipelineError

PAD, EOS, BOS, UNK = 0, 1, 2, 3
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


class Tokenizer:
    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self.proto = model_proto
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
            raise PipelineError(f"{source}: not a SentencePiece model ({e})") from None
        ids = (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id())
        if ids != (PAD, EOS, BOS, UNK):
            raise PipelineError(f"{source}: special ids pad/eos/bos/unk are {ids}, Gemma's are (0, 1, 2, 3)")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: no such tokenizer file; pass a SentencePiece tokenizer.model")
        return cls(path.read_bytes(), str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, max_chars: int = 20_000_000) -> Tokenizer:
        """Trains a BPE model with byte fallback and split digits, as Gemma's; whitespace is kept verbatim
        (code depends on it) and, as in Gemma's, no dummy-prefix space is added at the start of a text.
        The chat turn markers are user-defined symbols. Only the first `max_chars` characters are used."""
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts, max_chars),
                model_writer=proto,
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                split_digits=True,
                pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_by_whitespace=True,
                add_dummy_prefix=False,
                user_defined_symbols=["\n", "\t", START_OF_TURN, END_OF_TURN],
                max_sentence_length=16384,
                character_coverage=0.9995,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise PipelineError(f"tokenizer training failed: {e} (byte fallback needs VOCAB >= ~300; an empty corpus cannot train)") from None
        return cls(proto.getvalue(), "<trained>")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized model: two tokenizers with equal vocab size can still differ."""
        return hashlib.sha256(self.proto).hexdigest()

    def chat_ids(self) -> tuple[int, int]:
        """The ids of `<start_of_turn>` and `<end_of_turn>`, checked to be single pieces that encoding text
        produces (a control piece never comes out of text; a missing one is spelled in bytes)."""
        ids = []
        for marker in (START_OF_TURN, END_OF_TURN):
            token = self.sp.piece_to_id(marker)
            if token == UNK or self.sp.is_control(token) or self.sp.encode("a" + marker + "b").count(token) != 1:
                raise PipelineError(
                    f"{self.source}: {marker} is not a piece that text encodes to (Gemma's tokenizer has it as "
                    "id 106/107); FORMAT=chat needs the teacher's Gemma tokenizer or one trained here since chat "
                    "support (retrain an older one: `make tokens teacher`)"
                )
            ids.append(token)
        return ids[0], ids[1]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def save(self, path: str | Path) -> None:
        from pipeline.fsutil import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(self.proto)


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Documents as chunks of a few lines (each ≤ 4k chars) so pieces may span newlines."""
    seen = 0
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 8):
            chunk = "".join(lines[i : i + 8])[:4096]
            if chunk.strip():
                yield chunk
                seen += len(chunk)
        if seen >= max_chars:
            return
