"""Checkpoint I/O: our save loads in transformers with the same logits, a transformers (sharded) save loads
in ours, and every kind of broken checkpoint fails with a message naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma2ForCausalLM

from pipeline.checkpoint import load_model, model_fingerprint, save_model
from pipeline.errors import PipelineError
from pipeline.model import FULL
from tests.conftest import tiny_config
from tests.pipeline.test_model import hf_twin, scaled_random_model


@pytest.fixture
def saved(tmp_path, tokenizer_file):
    model = scaled_random_model(tiny_config())
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer_file)
    return model, tmp_path / "ckpt"


def test_our_save_loads_in_transformers(saved):
    model, path = saved
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gemma2" and cfg["architectures"] == ["Gemma2ForCausalLM"]
    hf = Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


def test_capped_config_round_trips(saved):
    model, path = saved
    assert load_model(path).config == model.config


def test_uncapped_window_less_model_round_trips_through_transformers(tmp_path):
    """No soft-caps (JSON null) and no sliding window (every layer global): save, load in ours and in
    transformers, same config and same logits on a row longer than the unused sliding_window."""
    cfg = tiny_config(attn_logit_softcapping=None, final_logit_softcapping=None, layer_types=(FULL,) * 3)
    model = scaled_random_model(cfg)
    save_model(model, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["attn_logit_softcapping"] is None and raw["final_logit_softcapping"] is None
    assert raw["layer_types"] == [FULL] * 3
    ours = load_model(tmp_path / "m", attn_implementation="math")
    assert ours.config == cfg
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert hf.config.final_logit_softcapping is None and hf.config.attn_logit_softcapping is None
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.sliding_window))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ref - ours(ids)).abs().max() <= 1e-4
        assert (ref - model(ids)).abs().max() <= 1e-4
        assert (30 * torch.tanh(ref / 30) - ref).abs().max() > 1e-3  # a default cap of 30 would show


def test_null_sliding_window_fails_with_the_file_named(saved):
    _, path = saved
    raw = json.loads((path / "config.json").read_text())
    raw["sliding_window"] = None
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PipelineError, match=r"config\.json: config: sliding_window is null"):
        load_model(path)


def test_transformers_sharded_save_loads_in_ours(tmp_path):
    cfg = tiny_config()
    hf = hf_twin(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "hf", attn_implementation="math")
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_load_to_dtype_never_materialises_float32(saved):
    _, path = saved
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(PipelineError, match="'model.norm.weight' is missing"):
        load_model(path)


def test_unexpected_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(PipelineError, match=r"model\.safetensors: unexpected tensor 'model.extra.weight'"):
        load_model(path)


def test_wrong_shape(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", torch.zeros(7)))
    with pytest.raises(PipelineError, match=r"'model.norm.weight' has shape \(7,\)"):
        load_model(path)


def test_no_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(PipelineError, match="config.json: no such file"):
        load_model(path)


def test_other_model_type(saved):
    _, path = saved
    raw = json.loads((path / "config.json").read_text())
    raw["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PipelineError, match="model_type is 'llama'"):
        load_model(path)


def test_pickle_only_checkpoint_is_refused(tmp_path, saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="pickle"):
        load_model(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(PipelineError, match="not a directory"):
        load_model(tmp_path / "nope")


def test_fingerprint_tracks_weights(saved):
    _, path = saved
    before = model_fingerprint(path)
    assert model_fingerprint(path) == before
    _rewrite(path, lambda t: t["model.norm.weight"].add_(1.0))
    assert model_fingerprint(path) != before
