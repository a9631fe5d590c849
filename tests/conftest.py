"""Shared fixtures: tiny configs, a trained tokenizer, a tiny corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model import Gemma2Config  # noqa: E402
from pipeline.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(2)


def tiny_config(**overrides) -> Gemma2Config:
    """Every feature matters: window < sequence, GQA, head_dim != hidden/heads,
    query_pre_attn_scalar != head_dim, soft-caps small enough to bite."""
    base = dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=5, max_position_embeddings=64, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, rope_theta=500.0,
    )
    base.update(overrides)
    return Gemma2Config(**base)


CORPUS_TEXTS = [
    f"def function_{i}(x, y):\n    '''Adds {i} to the sum.'''\n    return x + y + {i}\n\n"
    f"class Thing{i}:\n    value = {i * 7}\n    def method(self):\n        return self.value * 2\n"
    for i in range(120)
]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS_TEXTS, vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer.save(path)
    return path
