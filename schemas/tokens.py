"""Token shards (`tokens/{train,val}/*.parquet`), version 2: `<bos>`-first, document-packed windows.

One row per window of SEQ_LEN+1 token ids; position t predicts token t+1 of the same row. Every window
starts with `<bos>`. Documents are packed `<bos> doc <eos> <bos> doc <eos> …`; each `<bos>` starts a
document, and attention is masked per document (`document_ids`). A document that does not fit continues in
the next window after a fresh `<bos>`, repeating the previous window's last token (`continued` is true).

Columns: `window` int64 (unique within a split), `input_ids` [T+1] int32, `continued` bool, and for chat
data (`format` "chat") `loss_mask` [T] uint8: 1 where the label belongs to a model turn.

Rollout shards (`make rollouts`, pipeline/rollouts.py: a model's own sampled replies, metadata `rollouts` set)
are chat shards with one more column, `behaviour_logprob` [T] float16: at position t where `loss_mask` is 1
(a generated token, a generated `<end_of_turn>` included) the sampling model's log-probability of
`input_ids[t+1]` at the sampling temperature (with top-p < 1: in the renormalised nucleus, the distribution
actually sampled), 0 elsewhere. The column is there exactly
when `rollouts` is (older shards have neither).

`make tokens` packs each work unit of the corpus on its own (pipeline/tokens.py), so `window` is
`unit << 32 | row`, row counting that unit's windows of the split from 0: unique within a split and the
same whatever the process count, but not contiguous. Each unit's last window of a split is padded, and a
unit that is a later byte range of a large text file starts with a continued window.

Which positions train (`label_mask`): not a label that is `<bos>` (the next document's start, predicted
across a document boundary) or `<pad>` (the filler of a unit's last window); not position 0 of a continued
window (its label was already the previous window's last label, and `<bos>` alone is no context for a
mid-document token); and, for chat, only where `loss_mask` is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.tokenizer import BOS, PAD
from schemas.common import check_kind, check_schema, fixed_lists, from_json, read_file_meta

TOKENS_VERSION = 2
FORMATS = ("text", "chat")
BEHAVIOUR = "behaviour_logprob"  # rollout shards: the sampling model's log-prob of each generated token


@dataclass(frozen=True, kw_only=True)
class TokensMeta:
    """Every token shard's metadata (and its split manifest's `meta`)."""

    kind: str = "tokens"
    schema_version: int = TOKENS_VERSION
    seq_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    corpus: str
    split: str
    format: str = "text"
    val_fraction: float | None = None
    corpus_tokens: int | None = None
    shard_windows: int | None = None
    val_tokens: int | None = None  # the val split's cap (0: none): its first windows covering this many tokens
    unit_bytes: int | None = None  # corpus bytes per work unit: with the input, it fixes the windows
    filters: dict[str, Any] | None = None  # the filters applied (pipeline/filters.py `Filters.describe`); None: none
    split_by: str | None = None  # "content": a hash of each document's text decides its split; None: older, by path
    text_docs: str | None = None  # a text file's documents: "paragraph" or "line"; None: the whole file
    # Rollout shards (pipeline/rollouts.py): the sampling model and settings — model, model_fingerprint,
    # model_round, round, temperature, top_p, seed, rollouts_per_prompt, max_new_tokens, engine. None: not rollouts.
    rollouts: dict[str, Any] | None = None


def token_schema(seq_len: int, chat: bool = False, behaviour: bool = False) -> pa.Schema:
    """A token shard's columns; `behaviour`: rollout shards' `behaviour_logprob` (chat only)."""
    fields = [
        pa.field("window", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), seq_len + 1), nullable=False),
        pa.field("continued", pa.bool_(), nullable=False),
    ]
    if chat:
        fields.append(pa.field("loss_mask", pa.list_(pa.uint8(), seq_len), nullable=False))
    if behaviour:
        fields.append(pa.field(BEHAVIOUR, pa.list_(pa.float16(), seq_len), nullable=False))
    return pa.schema(fields)


def window_columns(windows: np.ndarray, input_ids: np.ndarray, continued: np.ndarray,
                   loss_mask: np.ndarray | None = None,
                   behaviour_logprob: np.ndarray | None = None) -> dict[str, pa.Array]:
    """The window columns every token and logit shard shares, as Arrow arrays (rollouts: with
    `behaviour_logprob` [n, SEQ_LEN], stored as float16)."""
    columns = {"window": pa.array(windows.astype(np.int64)),
               "input_ids": fixed_lists(input_ids.astype(np.int32), input_ids.shape[1]),
               "continued": pa.array(continued.astype(bool))}
    if loss_mask is not None:
        columns["loss_mask"] = fixed_lists(loss_mask.astype(np.uint8), loss_mask.shape[1])
    if behaviour_logprob is not None:
        columns[BEHAVIOUR] = fixed_lists(behaviour_logprob.astype(np.float16), behaviour_logprob.shape[1])
    return columns


def encode(windows: np.ndarray, input_ids: np.ndarray, continued: np.ndarray, schema: pa.Schema,
           loss_mask: np.ndarray | None = None, behaviour_logprob: np.ndarray | None = None) -> pa.Table:
    """[n] window indices, [n, SEQ_LEN+1] ids, [n] continuation flags (and [n, SEQ_LEN] loss mask, and for
    rollouts [n, SEQ_LEN] behaviour log-probs) → a table."""
    return pa.table(window_columns(windows, input_ids, continued, loss_mask, behaviour_logprob),
                    schema=schema.remove_metadata())


def label_mask(input_ids: np.ndarray, continued: np.ndarray | None = None,
               loss_mask: np.ndarray | None = None) -> np.ndarray:
    """[B, T] bool: the positions that train and are evaluated (see the module docstring)."""
    labels = input_ids[:, 1:]
    mask = (labels != BOS) & (labels != PAD)
    if continued is not None:
        mask[:, 0] &= ~continued.astype(bool)
    if loss_mask is not None:
        mask &= loss_mask.astype(bool)
    return mask


def document_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] → the index of each position's document within its row: every `<bos>` starts one."""
    return (input_ids == BOS).cumsum(-1, dtype=torch.int32)


def validate_token_shard(path: str | Path) -> TokensMeta:
    schema, raw = read_file_meta(path)
    check_kind(path, raw, "tokens", (TOKENS_VERSION,))
    meta = from_json(TokensMeta, raw, path)
    check_schema(path, schema, token_schema(meta.seq_len, meta.format == "chat", meta.rollouts is not None))
    return meta
