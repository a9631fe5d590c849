"""The model against transformers' Gemma2ForCausalLM (eager, float32) on configs where every feature bites."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM

from pipeline.errors import PipelineError
from pipeline.model import PRESETS, Gemma2, Gemma2Config, preset
from tests.conftest import tiny_config


def hf_twin(cfg: Gemma2Config, raw_overrides: dict | None = None) -> Gemma2ForCausalLM:
    raw = cfg.to_hf()
    raw.update(raw_overrides or {})
    raw.pop("model_type"), raw.pop("architectures")
    hf = Gemma2ForCausalLM(HFConfig(**raw, attn_implementation="eager"))
    return hf.eval()


def scaled_random_model(cfg: Gemma2Config, seed: int = 0, scale: float = 4.0) -> Gemma2:
    """Random weights scaled up so attention scores and logits reach the soft-caps."""
    torch.manual_seed(seed)
    model = Gemma2(cfg, attn_implementation="math")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.02 * scale))
    return model.eval()


def parity(cfg: Gemma2Config, seq_len: int = 20, raw_overrides: dict | None = None) -> float:
    ours = scaled_random_model(cfg)
    hf = hf_twin(cfg, raw_overrides)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    return (ref - got).abs().max().item()


def test_parity_every_feature():
    cfg = tiny_config()
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert parity(cfg, seq_len=20) <= 1e-4


def test_soft_caps_bite():
    """The caps change the output: removing them moves logits far more than the parity tolerance."""
    cfg = tiny_config()
    model = scaled_random_model(cfg)
    uncapped = Gemma2(dataclasses.replace(cfg, attn_logit_softcapping=None, final_logit_softcapping=None), "math")
    uncapped.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        capped, free = model(ids), uncapped.eval()(ids)
    assert capped.abs().max() <= cfg.final_logit_softcapping
    assert (capped - free).abs().max() > 0.1


def test_parity_without_caps_and_mha():
    cfg = tiny_config(attn_logit_softcapping=None, final_logit_softcapping=None, num_key_value_heads=4)
    assert parity(cfg, seq_len=12) <= 1e-4


def test_parity_rope_parameters_config():
    """Configs carrying `rope_parameters` and explicit `layer_types` load with the same meaning."""
    raw = tiny_config(rope_theta=1234.0).to_hf()
    raw.pop("rope_theta")
    raw["layer_types"] = ["full_attention", "sliding_attention", "full_attention"]
    cfg = Gemma2Config.from_hf(raw)
    assert cfg.rope_theta == 1234.0
    assert cfg.layer_types == ("full_attention", "sliding_attention", "full_attention")
    assert parity(cfg, seq_len=16) <= 1e-4


def test_old_style_config_reads_rope_theta():
    raw = tiny_config().to_hf()
    raw.pop("rope_parameters"), raw.pop("layer_types")
    raw["rope_theta"] = 777.0
    cfg = Gemma2Config.from_hf(raw)
    assert cfg.rope_theta == 777.0
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"


def test_window_edge_key_at_distance_w_is_masked():
    """Changing the token exactly W positions back must not change a sliding-only model's output."""
    cfg = tiny_config(num_hidden_layers=1, sliding_window=4)
    model = scaled_random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    other = ids.clone()
    other[0, 5] = (ids[0, 5] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.allclose(a[0, 9], b[0, 9])  # 9 - 5 = 4 = W: outside the window
    assert not torch.allclose(a[0, 8], b[0, 8])  # 8 - 5 = 3 < W: inside


def test_hidden_states_then_head_equals_forward():
    cfg = tiny_config()
    model = scaled_random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.logits(model.hidden_states(ids)), model(ids))


def test_flex_matches_math_on_cpu():
    """The flex path (uncompiled here; compiled on CUDA) gives the math path's result."""
    cfg = tiny_config()
    model = scaled_random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        model.attn_implementation = "flex"
        got = model(ids)
    assert (ref - got).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_math_on_cuda():
    cfg = tiny_config(sliding_window=100)
    model = scaled_random_model(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        model.attn_implementation = "math"
        ref = model(ids)
        model.attn_implementation = "flex"
        got = model(ids)
    assert (ref - got).abs().max().item() <= 1e-3


def test_presets_by_exact_name():
    assert preset("gemma-2-2b").num_parameters() == 2_614_341_888
    assert preset("gemma-2-9b").num_parameters() == 9_241_705_984
    assert preset("gemma-2-27b").num_parameters() == 27_227_128_320
    assert preset("debug", vocab_size=300).vocab_size == 300
    with pytest.raises(PipelineError, match="valid presets: .*debug.*gemma-2-2b"):
        preset("gemma-2-2B")


def test_num_parameters_counts_the_tied_model():
    for name in ("debug", "demo-student-s", "demo-teacher"):
        with torch.device("meta"):
            model = Gemma2(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_parameters()


def test_wrong_model_type_is_rejected():
    raw = tiny_config().to_hf()
    raw["model_type"] = "llama"
    with pytest.raises(PipelineError, match="model_type is 'llama'"):
        Gemma2Config.from_hf(raw)
