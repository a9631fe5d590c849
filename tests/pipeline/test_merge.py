from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.merge import merge_models
from pipeline.model import Gemma2, preset
from tests.conftest import tiny_config


def saved(path, cfg, seed, tokenizer=None):
    model = Gemma2(cfg)
    model.init_weights(seed)
    save_model(model, path, tokenizer=tokenizer)
    return model


def test_weighted_average(tmp_path, tokenizer_file):
    cfg = preset("debug", vocab_size=400)
    a = saved(tmp_path / "a", cfg, 1, tokenizer_file)
    b = saved(tmp_path / "b", cfg, 2, tokenizer_file)
    merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m", [3, 1])
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name, p in a.state_dict().items():
        assert torch.allclose(merged[name], 0.75 * p + 0.25 * b.state_dict()[name], atol=1e-7)
    assert load_model(tmp_path / "m").config == cfg
    assert (tmp_path / "m" / "tokenizer.model").is_file()


def test_refuses_other_shapes(tmp_path):
    saved(tmp_path / "a", tiny_config(), 1)
    saved(tmp_path / "b", tiny_config(hidden_size=64), 1)
    with pytest.raises(PipelineError, match=r"config differs .* in \['hidden_size'\]"):
        merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_refuses_other_tokenizers(tmp_path, tokenizer_file):
    from pipeline.tokenizer import Tokenizer
    from tests.conftest import CORPUS_TEXTS

    other = tmp_path / "other.model"
    Tokenizer.train(CORPUS_TEXTS[:40], vocab_size=400).save(other)
    saved(tmp_path / "a", tiny_config(), 1, tokenizer_file)
    saved(tmp_path / "b", tiny_config(), 2, other)
    with pytest.raises(PipelineError, match="tokenizer.model differs"):
        merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
