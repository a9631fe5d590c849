"""Shared fixtures: tiny configs, a trained tokenizer, a tiny corpus."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Inductor's on-disk cache does not key its CPU kernels by ATEN_CPU_CAPABILITY (torch 2.13): a kernel built
# for AVX2 and loaded under AVX-512, or the reverse, gives wrong numbers (seen: 2.4 instead of 1e-6 in the
# compiled-flex test). One cache folder per kernel set keeps the suite right whichever set a run forces;
# set before any compile, in the environment so that spawned ranks inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "torchinductor_gemma_distill"
                                                     / torch.backends.cpu.get_cpu_capability()))

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


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder corpus: one .txt document per file."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CORPUS_TEXTS):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def work(tmp_path_factory, corpus_dir, tokenizer_file) -> Path:
    """A work directory with token shards (several per split) and a random debug teacher."""
    from pipeline.checkpoint import save_model
    from pipeline.corpus import CorpusSpec
    from pipeline.model import Gemma2, preset
    from pipeline.tokens import TokenizeConfig, build_token_shards

    root = tmp_path_factory.mktemp("work")
    tok = Tokenizer.load(tokenizer_file)
    build_token_shards(CorpusSpec(str(corpus_dir)), tok, root / "tokens",
                       TokenizeConfig(seq_len=16, val_fraction=0.2, shard_windows=40))
    teacher = Gemma2(preset("debug", vocab_size=tok.vocab_size), "math")
    teacher.init_weights(0)
    with torch.no_grad():  # a peaked distribution, so top-K and tail both carry mass
        teacher.model.embed_tokens.weight.mul_(5)
    save_model(teacher, root / "teacher", tokenizer=tokenizer_file)
    return root


def per_document_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Reference for document-masked windows: log-softmax [B, T, V] of the positions ids[:, :-1], each
    document (a run starting at <bos>) run alone through the model (ours or transformers')."""
    from pipeline.tokenizer import BOS

    t = ids.shape[1] - 1
    out = torch.zeros(ids.shape[0], t, model.config.vocab_size)
    with torch.no_grad():
        for w in range(ids.shape[0]):
            starts = [i for i in range(t) if ids[w, i] == BOS] + [t]
            if starts[0] != 0:
                starts.insert(0, 0)
            for a, b in zip(starts, starts[1:]):
                logits = model(ids[w : w + 1, a:b])
                logits = getattr(logits, "logits", logits)  # transformers returns an output object
                out[w, a:b] = torch.log_softmax(logits.float(), -1)[0]
    return out


def trained_positions(ids: torch.Tensor, continued: torch.Tensor) -> torch.Tensor:
    """Reference for the label mask, written out: labels that are not <bos>/<pad>, and not position 0 of a
    continued window."""
    from pipeline.tokenizer import BOS, PAD

    train = (ids[:, 1:] != BOS) & (ids[:, 1:] != PAD)
    train[:, 0] &= ~continued.bool()
    return train
