"""The model against transformers' Gemma2ForCausalLM (eager, float32) on configs where every feature bites:
whole rows, packed documents against each document alone, both attention paths (flex compiled as on CUDA,
forward on the CPU), dtypes under autocast, and config.json nulls."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM

import pipeline.model as model_module
from pipeline.errors import PipelineError
from pipeline.model import FULL, PRESETS, Gemma2, Gemma2Config, preset
from pipeline.tokenizer import BOS, EOS
from schemas.tokens import document_ids
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


def hf_copy(ours: Gemma2, raw_overrides: dict | None = None) -> Gemma2ForCausalLM:
    """transformers' model holding our weights (the head tied, nothing else missing)."""
    hf = hf_twin(ours.config, raw_overrides)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def packed(vocab: int, rows: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Rows of packed documents `<bos> doc <eos> <bos> doc …` with the given document lengths (each counts
    its <bos> and <eos>; a row's last document is cut, as a window that continues in the next one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in rows:
        row = []
        for i, n in enumerate(lengths):
            doc = torch.randint(4, vocab, (n,), generator=g)
            doc[0] = BOS
            if i < len(lengths) - 1:
                doc[-1] = EOS
            row.append(doc)
        out.append(torch.cat(row))
    assert len({len(r) for r in out}) == 1, "rows must have one length"
    return torch.stack(out)


def parity(cfg: Gemma2Config, seq_len: int = 20, raw_overrides: dict | None = None) -> float:
    ours = scaled_random_model(cfg)
    hf = hf_copy(ours, raw_overrides)
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


# --- Packed documents --------------------------------------------------------------------------------

# Two rows of 24 tokens; every document is longer than tiny_config's window of 5, so sliding layers slide
# inside documents, and documents start at positions other than 0, so RoPE sees shifted positions.
DOC_ROWS = [[9, 8, 7], [13, 11]]


def test_packed_documents_match_transformers_on_each_document_alone():
    cfg = tiny_config()
    assert all(n > cfg.sliding_window for row in DOC_ROWS for n in row)
    ours = scaled_random_model(cfg)
    hf = hf_copy(ours)
    ids = packed(cfg.vocab_size, DOC_ROWS)
    with torch.no_grad():
        got = ours(ids, document_ids(ids))
        unmasked = ours(ids)
        worst, leak = 0.0, 0.0
        for row, lengths in enumerate(DOC_ROWS):
            start = 0
            for n in lengths:
                ref = hf(ids[row : row + 1, start : start + n]).logits[0]
                worst = max(worst, (got[row, start : start + n] - ref).abs().max().item())
                leak = max(leak, (unmasked[row, start : start + n] - ref).abs().max().item())
                start += n
    assert worst <= 1e-4
    assert leak > 1e-2  # without the document mask later documents attend to earlier ones: the test can fail


def test_flex_matches_math_with_documents_window_and_caps(monkeypatch):
    """The flex path (uncompiled here) gives the math path's result with every mask active, and builds each
    block mask once per forward, not once per layer."""
    cfg = tiny_config(num_hidden_layers=4)
    model = scaled_random_model(cfg)
    ids = packed(cfg.vocab_size, DOC_ROWS, seed=1)
    docs = document_ids(ids)
    built = []
    real = model_module.make_block_mask
    monkeypatch.setattr(model_module, "make_block_mask", lambda *a: built.append(a[1]) or real(*a))
    with torch.no_grad():
        ref = model(ids, docs)
        model.attn_implementation = "flex"
        got = model(ids, docs)
    assert (ref - got).abs().max().item() <= 1e-4
    assert sorted(built, key=str) == [5, None]  # one per distinct window (sliding, global), four layers


def test_attention_path_choice():
    """auto: flex compiled on CUDA, math elsewhere; flex elsewhere runs uncompiled unless asked."""
    model = Gemma2(tiny_config())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (model.masks(8, None, cuda).impl, model.masks(8, None, cuda).compiled) == ("flex", True)
    assert (model.masks(8, None, cpu).impl, model.masks(8, None, cpu).compiled) == ("math", False)
    model.attn_implementation = "flex"
    assert model.masks(8, None, cpu).compiled is False
    model.compile_flex = True
    assert model.masks(8, None, cpu).compiled is True
    model.attn_implementation = "math"
    assert model.masks(8, None, cuda).compiled is False


@pytest.mark.parametrize("impl", ["math", "flex"])
def test_q_k_v_reach_attention_in_one_dtype_under_autocast(impl, monkeypatch):
    """Under bf16 autocast the residual stream (so the RoPE tables) is float32 and the projections bf16;
    q, k and v must still arrive in one dtype (flex_attention on torch <= 2.9 rejects a mix)."""
    cfg = tiny_config()
    model = scaled_random_model(cfg)
    model.attn_implementation = impl
    seen = []
    for name in ("math_attention", "flex_attention_path"):
        real = getattr(model_module, name)
        spy = lambda q, k, v, *rest, real=real: seen.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, *rest)
        monkeypatch.setattr(model_module, name, spy)
    ids = packed(cfg.vocab_size, DOC_ROWS)
    with torch.no_grad():
        exact = model(ids, document_ids(ids))
        assert seen == [(torch.float32,) * 3] * cfg.num_hidden_layers
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, document_ids(ids))
    assert seen == [(torch.bfloat16,) * 3] * cfg.num_hidden_layers
    assert (low - exact).abs().max().item() < 0.25  # bf16 rounding, not a different computation


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers recompute their forward in the backward pass with the masks built once outside."""
    cfg = tiny_config()
    model = scaled_random_model(cfg).train()
    ids = packed(cfg.vocab_size, DOC_ROWS)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(ids, document_ids(ids)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_backward_on_cpu_is_refused_with_one_line(compiled):
    model = Gemma2(tiny_config(), "flex", compile_flex=compiled)
    model.init_weights(0)
    with pytest.raises(PipelineError, match="flex attention has no backward on the CPU"):
        model(torch.randint(0, 97, (1, 8)))


# --- Compiled flex on the CPU (as on CUDA; forward only) ---------------------------------------------

# Row lengths around flex's 128-token block: shorter than one block, one short of it, one past it, and
# several blocks. Compiled code does not bounds-check a mask_mod's reads, so a document lookup past the
# row's end shows up here as NaN or wrong numbers, differently on AVX2 and AVX-512 kernels.
ODD_LENGTHS = (1, 24, 127, 129, 300)
LAYOUTS = 3  # document layouts per shape: the first compiles, the others must reuse its graphs


def random_layout(length: int, seed: int) -> list[int]:
    """Document lengths (each ≥ 2 but a row's last, which may be cut to 1) that fill `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], length
    while left > 0:
        n = int(torch.randint(2, 90, (1,), generator=g))
        sizes.append(min(n, left) if left - n != 1 else left)
        left -= sizes[-1]
    return sizes


@pytest.fixture(scope="module")
def compiled_flex_runs():
    """A 4-layer model (two sliding, two global layers) under compiled flex against the math path, at every
    odd length, two rows each; each shape again with other documents, with recompilation made an error."""
    torch._dynamo.reset()
    cfg = tiny_config(num_hidden_layers=4, sliding_window=40, max_position_embeddings=512)
    ref = scaled_random_model(cfg)
    flex = Gemma2(cfg, "flex", compile_flex=True).eval()
    flex.load_state_dict(ref.state_dict())
    counters.clear()
    diffs: dict[int, list[float]] = {n: [] for n in ODD_LENGTHS}
    graphs = []
    for layout in range(LAYOUTS):
        with torch._dynamo.config.patch(error_on_recompile=layout > 0), torch.no_grad():
            for n in ODD_LENGTHS:
                rows = [random_layout(n, 1000 * layout + 2 * n + r) for r in range(2)]
                ids = packed(cfg.vocab_size, rows, seed=layout)
                docs = document_ids(ids)
                diffs[n].append((flex(ids, docs) - ref(ids, docs)).abs().max().item())
        graphs.append(counters["stats"]["unique_graphs"])
    yield diffs, graphs
    torch._dynamo.reset()


def test_compiled_flex_forward_on_cpu_matches_math(compiled_flex_runs):
    diffs, _ = compiled_flex_runs
    worst = {n: max(d) for n, d in diffs.items()}
    assert all(d <= 1e-4 for d in worst.values()), worst  # NaN fails too


def test_compiled_flex_recompilations_stay_bounded(compiled_flex_runs):
    """Graphs number at most (layer kinds) × (shapes) for flex_attention plus as many for the block masks,
    however many layers; new documents at a known shape compile nothing (the rerun would raise)."""
    _, graphs = compiled_flex_runs
    kinds = 2
    assert 0 < graphs[0] <= 2 * kinds * len(ODD_LENGTHS)
    assert graphs[-1] == graphs[0]


# --- CUDA: compiled flex forward + backward -----------------------------------------------------------


def _cuda_rows(cfg: Gemma2Config) -> torch.Tensor:
    """Two rows of 300 tokens (not a multiple of flex's 128 block), documents longer than the window."""
    return packed(cfg.vocab_size, [[130, 120, 50], [70, 230]]).cuda()


def _grads(model: Gemma2, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids, document_ids(ids))
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_matches_math_on_cuda_forward_and_backward():
    torch._dynamo.reset()
    cfg = tiny_config(sliding_window=100)
    model = scaled_random_model(cfg).cuda().train()
    ids = _cuda_rows(cfg)
    model.attn_implementation = "math"
    ref, ref_grads = _grads(model, ids)
    model.attn_implementation = "auto"  # flex, compiled, on CUDA
    assert model.masks(ids.shape[1], None, ids.device).compiled
    got, grads = _grads(model, ids)
    assert (ref - got).abs().max().item() <= 1e-3
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() <= 1e-3 * g.abs().max().item() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_under_bf16_autocast_on_cuda_with_checkpointing():
    """The training configuration: bf16 autocast, gradient checkpointing, compiled flex forward + backward."""
    cfg = tiny_config(sliding_window=100)
    model = scaled_random_model(cfg).cuda().train()
    model.gradient_checkpointing = True
    ids = _cuda_rows(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.attn_implementation = "math"
        ref, ref_grads = _grads(model, ids)
        model.attn_implementation = "auto"
        got, grads = _grads(model, ids)
    assert (ref - got).abs().max().item() <= 0.1
    for name, g in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert (grads[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_document_block_mask_equals_eager_at_scale():
    """B=8, T=4096 with documents: the compiled block mask (what the model builds on CUDA) is the eager one."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(0)
    starts = torch.rand(8, 4096, generator=g) < 1 / 700
    starts[:, 0] = True
    docs = starts.cumsum(-1, dtype=torch.int32).cuda()
    for window in (1000, None):
        mod = model_module.document_mask_mod(docs, window)
        fast = model_module.make_block_mask(4096, window, docs, docs.device, True)
        slow = create_block_mask(mod, 8, None, 4096, 4096, device=docs.device)
        assert torch.equal(fast.to_dense(), slow.to_dense())
        assert torch.equal(fast.full_kv_num_blocks, slow.full_kv_num_blocks)


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


# --- config.json nulls ---------------------------------------------------------------------------------


def test_null_caps_mean_no_cap_and_are_written_back_as_null():
    raw = json.loads(json.dumps(tiny_config().to_hf()))
    raw["attn_logit_softcapping"] = raw["final_logit_softcapping"] = None
    cfg = Gemma2Config.from_hf(raw)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    written = json.loads(json.dumps(cfg.to_hf()))
    assert written["attn_logit_softcapping"] is None and written["final_logit_softcapping"] is None
    assert HFConfig(**{k: v for k, v in written.items() if k != "model_type"}).final_logit_softcapping is None
    raw.pop("attn_logit_softcapping"), raw.pop("final_logit_softcapping")  # absent: the Gemma 2 defaults
    assert (Gemma2Config.from_hf(raw).attn_logit_softcapping, Gemma2Config.from_hf(raw).final_logit_softcapping) == (50.0, 30.0)


def test_null_sliding_window_is_refused_as_transformers_cannot_run_it():
    """transformers 5.x builds the sliding mask for every Gemma 2 and raises on a null window, even when no
    layer slides; we refuse it when reading the config, with the way to say 'no sliding window'."""
    raw = tiny_config(layer_types=(FULL,) * 3).to_hf()
    raw["sliding_window"] = None
    with pytest.raises(PipelineError, match="sliding_window is null.*every layer_types entry to 'full_attention'"):
        Gemma2Config.from_hf(raw)
    raw.pop("model_type"), raw.pop("architectures")
    hf = Gemma2ForCausalLM(HFConfig(**raw, attn_implementation="eager")).eval()
    with pytest.raises((ValueError, TypeError)):  # if this stops raising, let a null window mean "none" here too
        hf(torch.randint(0, 97, (1, 8)), use_cache=False)


def test_bad_caps_and_window_are_refused():
    with pytest.raises(PipelineError, match="attn_logit_softcapping must be > 0 or null"):
        tiny_config(attn_logit_softcapping=0.0)
    with pytest.raises(PipelineError, match="sliding_window must be >= 1"):
        tiny_config(sliding_window=0)
