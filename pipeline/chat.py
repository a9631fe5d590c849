"""Conversations in Gemma's chat format: rows → turns, the template, and which tokens are the model's.

The template, exactly Gemma's: `<bos>`, then per turn `<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n`
with role `user` or `model` (`assistant` is read as `model`). Gemma has no system role: a leading `system`
message is folded into the first user turn as `system + "\\n\\n" + user`. Turns alternate user/model starting
with user; anything else is an error naming the conversation.

The loss mask is exact for any tokenizer: the rendered text is tokenized whole (so the ids are what the
tokenizer gives that text) with each piece's character span (sentencepiece's `offset_mapping`, in
characters, so multi-byte text and byte-fallback pieces map too), and a token belongs to a model turn when its
characters overlap the reply's content or its `<end_of_turn>` — so a piece that merges the header's `\\n`
with the reply's first characters (SentencePiece's default normaliser turns `\\n` into `▁`: `▁Sure` spans
`\\nSure`) is trained, while pieces of the `<start_of_turn>model\\n` header alone, and the newline after
`<end_of_turn>`, are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from pipeline.tokenizer import BOS, END_OF_TURN, START_OF_TURN, Tokenizer

ROLES = {"user": "user", "model": "model", "assistant": "model"}


class Turn(NamedTuple):
    role: str  # "user" or "model"
    content: str


Where = Callable[[], str]  # the conversation's place (file:line, file#row), computed only for an error


def normalize(messages: Any, where: Where) -> tuple[Turn, ...]:
    """A `messages` list of {role, content} → turns: `assistant` read as `model`, a leading system message
    folded into the first user turn, roles checked to alternate user/model starting with user."""
    if not isinstance(messages, (list, tuple)) or not messages:
        kind = "an empty list" if isinstance(messages, (list, tuple)) else f"a {type(messages).__name__}"
        raise PipelineError(f"{where()}: messages is {kind}; expected a list of {{role, content}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str):
            raise PipelineError(f"{where()}: message {i + 1} is not a {{role: string, content: string}} object "
                                f"({_short(message)})")
        role = message["role"]
        if role == "system" and i == 0:
            turns.append(Turn("system", message["content"]))
        elif role in ROLES:
            turns.append(Turn(ROLES[role], message["content"]))
        else:
            allowed = "user, model, assistant, or system as the first message"
            raise PipelineError(f"{where()}: message {i + 1} has role {role!r}; roles are {allowed}")
    if turns[0].role == "system":
        if len(turns) < 2 or turns[1].role != "user":
            raise PipelineError(f"{where()}: a system message must be followed by a user message")
        turns[:2] = [Turn("user", turns[0].content.strip() + "\n\n" + turns[1].content.strip())]
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        if turn.role != expected:
            raise PipelineError(f"{where()}: turn {i + 1} is {turn.role}, expected {expected}; roles must alternate "
                                "user/model starting with user")
    return tuple(turns)


def from_row(row: dict[str, Any], messages_column: str, where: Where) -> tuple[Turn, ...]:
    """A row's conversation: its `messages_column` list, or `prompt`/`response` (and optional `system`)."""
    if row.get(messages_column) is not None:
        return normalize(row[messages_column], where)
    if "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "model", "content": row["response"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        return normalize(messages, where)
    raise PipelineError(f"{where()}: no {messages_column!r} list and no prompt/response columns (keys: "
                        f"{sorted(row)}); pass --messages-column")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Rendered:
    """A conversation in the template, without its leading `<bos>` (an id, added when packing)."""

    text: str
    turn_starts: tuple[int, ...]  # character offset of each turn's `<start_of_turn>`
    replies: tuple[tuple[int, int], ...]  # character spans of the model turns: content and `<end_of_turn>`


def render(turns: Sequence[Turn], generation_prompt: bool = False) -> Rendered:
    """The template; `generation_prompt` appends `<start_of_turn>model\\n` for the model to answer."""
    parts, starts, replies, at = [], [], [], 0
    for turn in turns:
        head = f"{START_OF_TURN}{turn.role}\n"
        body = turn.content.strip() + END_OF_TURN
        starts.append(at)
        if turn.role == "model":
            replies.append((at + len(head), at + len(head) + len(body)))
        parts += [head, body, "\n"]
        at += len(head) + len(body) + 1
    if generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return Rendered("".join(parts), tuple(starts), tuple(replies))


def template(turns: Sequence[Turn]) -> str:
    """The full template as text, `<bos>` included (what Gemma's chat template renders)."""
    return "<bos>" + render(turns).text


def has_markers(turns: Sequence[Turn]) -> bool:
    """Whether a content holds a turn marker: it would tokenize to a control id and forge a turn."""
    return any(START_OF_TURN in t.content or END_OF_TURN in t.content for t in turns)


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation's tokens (no `<bos>`): `model[i]` tells whether token i belongs to a model
    turn; `turn_starts[j]` is the index of turn j's first token."""

    ids: np.ndarray  # int32
    model: np.ndarray  # bool
    turn_starts: np.ndarray  # int64


def encode(tokenizer: Tokenizer, conversations: Sequence[Rendered], threads: int = 1) -> list[Encoded]:
    """Tokenizes each rendered text whole and maps the character spans onto its tokens."""
    if not conversations:
        return []
    tokenizer.chat_ids()  # one clear error for a tokenizer without the turn markers
    try:
        out = tokenizer.sp.encode([c.text for c in conversations], return_type="offset_mapping",
                                  num_threads=threads)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"FORMAT=chat needs sentencepiece's offset_mapping encoding ({e}); upgrade sentencepiece "
                            "(pip install -U sentencepiece)") from None
    return [_spans_to_tokens(c, o) for c, o in zip(conversations, out)]


def _spans_to_tokens(conversation: Rendered, encoding: dict[str, Any]) -> Encoded:
    ids = np.asarray(encoding["ids"], dtype=np.int32)
    spans = np.asarray(encoding["offsets"], dtype=np.int64).reshape(-1, 2)
    begins = spans[:, 0]
    ends = np.maximum(spans[:, 1], begins + 1)  # a zero-width piece (a dummy-prefix `▁`) counts where it begins
    model = overlaps(begins, ends, conversation.replies)
    turn_starts = np.searchsorted(begins, np.asarray(conversation.turn_starts, dtype=np.int64), side="left")
    return Encoded(ids, model, turn_starts)


def overlaps(begins: np.ndarray, ends: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Whether each character range [begin, end) shares a character with one of `spans` (sorted, disjoint)."""
    if not spans:
        return np.zeros(len(begins), bool)
    a, b = np.asarray(spans, dtype=np.int64).T
    j = np.searchsorted(b, begins, side="right")  # the first span that ends after the range begins
    hit = j < len(b)
    hit[hit] &= a[j[hit]] < ends[hit]
    return hit


def prompt_ids(tokenizer: Tokenizer, turns: Sequence[Turn]) -> list[int]:
    """`<bos>` and the conversation so far, ending with the header of the model's turn."""
    tokenizer.chat_ids()
    return [BOS, *tokenizer.encode(render(turns, generation_prompt=True).text)]
