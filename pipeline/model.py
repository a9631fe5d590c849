"""The Gemma 2 decoder, written to match Hugging Face's `Gemma2ForCausalLM` (eager attention) exactly.

Read top-down: the config, the named presets, RoPE, then the modules. No I/O and no parallelism here;
checkpoint logic lives in `pipeline.checkpoint`. Parameter names follow the HF checkpoint keys so loading
is an identity map.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

SLIDING = "sliding_attention"
FULL = "full_attention"
# config.json fields whose null is kept as None: "no cap" for the soft-caps, as transformers reads them;
# sliding_window so that __post_init__ refuses it with the reason rather than replacing it by a default.
NULLABLE = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")


@dataclass(frozen=True)
class Gemma2Config:
    """Architecture of one Gemma 2 model; field names are Hugging Face config.json's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int = 4096  # never None: transformers' Gemma2 cannot run without one (see __post_init__)
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    layer_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.layer_types:
            # Gemma 2 alternates: even layers (0, 2, ...) slide, odd layers are global; the last is global.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise PipelineError(
                f"config: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise PipelineError(f"config: unknown layer_types {sorted(unknown)}; use {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PipelineError("config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise PipelineError(f"config: hidden_activation {self.hidden_activation!r} is not Gemma 2's tanh GELU")
        if self.sliding_window is None:
            # transformers 5.x builds the sliding mask for every Gemma 2 model and raises on a null window (even
            # when no layer slides), so such a model could never be checked against or exported to it.
            raise PipelineError(
                "config: sliding_window is null, which transformers' Gemma2 cannot run; for a model without "
                f"sliding windows keep an integer sliding_window and set every layer_types entry to {FULL!r}"
            )
        if self.sliding_window < 1:
            raise PipelineError(f"config: sliding_window must be >= 1, not {self.sliding_window}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and cap <= 0:
                raise PipelineError(f"config: {name} must be > 0 or null (no cap), not {cap}")

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> Gemma2Config:
        """Builds a config from a config.json dict; accepts `rope_theta` and newer `rope_parameters`.
        JSON null means what transformers makes of it: no cap for the two soft-caps, and an error for
        `sliding_window` (transformers cannot run it either). Other null fields count as absent."""
        model_type = raw.get("model_type")
        if model_type != "gemma2":
            raise PipelineError(f"config.json: model_type is {model_type!r}, expected 'gemma2'")
        if raw.get("tie_word_embeddings", True) is False:
            raise PipelineError("config.json: tie_word_embeddings=false is not Gemma 2; the head must be tied")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise PipelineError(f"config.json: rope_type {rope.get('rope_type')!r} is not supported (only default)")
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls)
                  if f.name in raw and (raw[f.name] is not None or f.name in NULLABLE)}
        values["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        values["layer_types"] = tuple(raw.get("layer_types") or ())
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(values.get(key), list):
                values[key] = values[key][0]
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise PipelineError(f"config.json: missing fields {missing}")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers' Gemma2ForCausalLM reads (old and new field names); an
        absent soft-cap is written as null, which transformers reads as no cap."""
        raw = dataclasses.asdict(self)
        raw["layer_types"] = list(self.layer_types)
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        raw.update(
            model_type="gemma2",
            architectures=["Gemma2ForCausalLM"],
            tie_word_embeddings=True,
            attention_bias=False,
            attention_dropout=0.0,
            hidden_act=self.hidden_activation,
            use_cache=True,
        )
        return raw

    def num_parameters(self) -> int:
        """Parameters of the tied model (the embedding counted once), as HF reports them."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * h * self.intermediate_size
        return self.vocab_size * h + self.num_hidden_layers * (attn + mlp + 4 * h) + h


def _preset(**kw: Any) -> Gemma2Config:
    return Gemma2Config(**kw)


# Real shapes from the published config.json files; demo sizes are for a 2-core CPU and a 4096-piece
# vocabulary (they take the cache's vocabulary when trained as students).
PRESETS: dict[str, Gemma2Config] = {
    "gemma-2-2b": _preset(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma-2-9b": _preset(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma-2-27b": _preset(
        vocab_size=256000, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
    ),
    "demo-teacher": _preset(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        sliding_window=64, max_position_embeddings=1024,
    ),
    "demo-student-s": _preset(
        vocab_size=4096, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=48, query_pre_attn_scalar=48,
        sliding_window=64, max_position_embeddings=1024,
    ),
    "demo-student-m": _preset(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=64, max_position_embeddings=1024,
    ),
    "debug": _preset(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, max_position_embeddings=512,
    ),
}


def preset(name: str, **overrides: Any) -> Gemma2Config:
    """Looks a preset up by exact name; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise PipelineError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)


# --- RoPE (half-split "NeoX" pairing: element j rotates with j + d/2) ---------------------------------


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, d] computed in float32 then cast once, as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


# Devices whose half-precision matmul can write float32 itself (`torch.mm(..., out_dtype=torch.float32)`,
# CUDA in torch 2.13; the CPU has no such kernel). pipeline/plan.py adds its fake CPU tensors while tracing.
FLOAT32_MM_DEVICES = {"cuda"}


def float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b [m, n] as float32, of 2-D a and b in one dtype: float32 inputs multiply plainly; half-precision
    ones on CUDA accumulate and write float32 (no half-precision copy of the product, no rounding of it);
    elsewhere the half-precision product is cast. (Not run on a GPU yet: should CUDA refuse out_dtype, the
    first call falls back to the cast for the rest of the process.)"""
    if a.dtype == torch.float32:
        return a @ b
    if a.device.type in FLOAT32_MM_DEVICES:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):  # a build without the kernel: the cast from now on
            FLOAT32_MM_DEVICES.discard(a.device.type)
    return (a @ b).float()


def softcap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`softcap` in place, for a fresh [rows, V] logits buffer outside autograd: no second buffer of that size."""
    return x if cap is None else x.div_(cap).tanh_().mul_(cap)


# --- Attention masks and the two attention paths --------------------------------------------------


def attention_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                      q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Causal, and for sliding layers the W most recent keys including the query itself: a key at
    distance exactly W is masked (q_pos - W < k_pos <= q_pos). With documents, a query sees only keys of
    its own document (packed documents never attend to each other)."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    if q_doc is not None:
        allowed = allowed & (q_doc == k_doc)
    return allowed


class AttentionMasks:
    """The masks of one forward pass, built once per distinct window and shared by the layers: a boolean
    [B or 1, T, T] tensor for the math path, a flex_attention BlockMask for the flex path. `doc_ids` [B, T]
    numbers the documents of each row (None: one document per row, plain causal attention). `compiled`:
    flex_attention and the block masks go through torch.compile (what makes flex fast on a GPU).

    flex runs on rows padded to whole blocks (`FLEX_BLOCK`), its documents padded with -1, a value no
    real position has. A partial block is where the compiled CPU kernels go wrong (torch 2.13, AVX2
    kernels: NaN or wrong rows below 128 tokens, a crash at 127, even with plain causal masks) and where
    a mask_mod would index its captured ids past the row's end (compiled code does not bounds-check).
    Padded keys come after every real query, so the causal mask hides them; padded queries are cut off.
    At SEQ_LEN a multiple of 128 (training, capture) nothing is padded."""

    def __init__(self, impl: str, length: int, doc_ids: torch.Tensor | None, device: torch.device,
                 compiled: bool = False) -> None:
        self.impl, self.length, self.doc_ids, self.device, self.compiled = impl, length, doc_ids, device, compiled
        self.padded = -(-length // FLEX_BLOCK) * FLEX_BLOCK if impl == "flex" else length
        if doc_ids is not None and self.padded > length:
            self.doc_ids = torch.nn.functional.pad(doc_ids, (0, self.padded - length), value=-1)
        self._built: dict[int | None, Any] = {}

    def get(self, window: int | None) -> Any:
        if window not in self._built:
            if self.impl == "flex":
                self._built[window] = make_block_mask(self.padded, window, self.doc_ids, self.device, self.compiled)
            else:
                self._built[window] = self._dense(self.length, window, self.doc_ids, self.device)
        return self._built[window]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float | None,
               window: int | None) -> torch.Tensor:
        if self.impl == "flex":
            pad = self.padded - self.length
            if pad:
                q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            out = flex_attention_path(q, k, v, scale, cap, self.get(window), self.compiled)
            return out[:, :, : self.length] if pad else out
        return math_attention(q, k, v, scale, cap, self.get(window))

    @staticmethod
    def _dense(length: int, window: int | None, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        if doc_ids is None:
            return attention_allowed(pos[:, None], pos[None, :], window)[None]
        return attention_allowed(pos[:, None], pos[None, :], window, doc_ids[:, :, None], doc_ids[:, None, :])


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float | None,
                   allowed: torch.Tensor) -> torch.Tensor:
    """Explicit attention, the CPU reference. q [B, nh, T, d], k/v [B, nk, T, d], allowed [B or 1, T, T]."""
    b, nh, t, d = q.shape
    nk = k.shape[1]
    # GQA without copying k/v: the nh/nk query heads of one kv head are adjacent, so fold them into the
    # query-length axis and attend to that kv head once.
    qg = q.reshape(b, nk, (nh // nk) * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
    # Soft-cap *before* the mask: capping a masked -inf score would turn it into -cap and leak probability.
    scores = softcap(scores, cap)
    scores = scores.view(b, nk, nh // nk, t, t).masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, nk, (nh // nk) * t, t)
    return torch.matmul(probs, v).view(b, nh, t, d)


# What torch.compile sees must not change from layer to layer or step to step, or it recompiles: one
# compiled flex_attention and one compiled create_block_mask per process, one score_mod per cap value.
# Graphs then number (layer kinds) × (shapes), whatever the depth or the number of steps.
_COMPILED: dict[str, Callable[..., Any]] = {}
# flex_attention's default sparse block: the flex path pads rows to a multiple of it (AttentionMasks).
FLEX_BLOCK = 128
_CAUSAL_MASKS: dict[tuple[Any, ...], Any] = {}


def _compiled(name: str) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _COMPILED:
        # Past dynamo's recompile limit (8 graphs of one function) it would run flex eagerly without a word, and
        # eager flex materialises the [B, heads, T, T] scores (tens of GB at the 27B's shape): an error instead.
        # Stage one pads its last batch so that it needs one graph per layer kind (pipeline/topk.py).
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        # dynamic=False: kernels specialised to each shape; training repeats one shape (and eval another).
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
        # Compiled, a document block mask is built in one fused pass instead of materialising the [B, T, T]
        # mask and its index grids: at B=8, T=4096 on the CPU 0.15 s per mask against 1.1 s and 1.4 GB of
        # temporaries eager (benchmarks/gpu_checks.py measures it on the GPU). torchtitan does the same.
        _COMPILED["block_mask"] = torch.compile(create_block_mask)
    return _COMPILED[name]


@functools.cache
def softcap_score_mod(cap: float) -> Callable[..., torch.Tensor]:
    """flex_attention's score_mod for one cap value, the same function object for every layer and step."""

    def score_mod(score: torch.Tensor, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    return score_mod


def document_mask_mod(doc_ids: torch.Tensor, window: int | None) -> Callable[..., torch.Tensor]:
    """The mask_mod of document-masked rows: same code for every call, only the captured ids change.
    `doc_ids` must cover every index flex asks about: rows padded to whole blocks (AttentionMasks)."""

    def documents(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return attention_allowed(q_idx, kv_idx, window, doc_ids[b, q_idx], doc_ids[b, kv_idx])

    return documents


def causal_mask_mod(window: int | None) -> Callable[..., torch.Tensor]:
    def causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return attention_allowed(q_idx, kv_idx, window)

    return causal


def make_block_mask(length: int, window: int | None, doc_ids: torch.Tensor | None, device: torch.device,
                    compiled: bool) -> Any:
    """The causal / sliding-window (/ document) structure as a BlockMask, so masked blocks are skipped.
    Without documents it depends only on (length, window) and is cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    create = _compiled("block_mask") if compiled else create_block_mask
    if doc_ids is None:
        key = (length, window, str(device))
        if key not in _CAUSAL_MASKS:
            _CAUSAL_MASKS[key] = create(causal_mask_mod(window), None, None, length, length, device=device)
        return _CAUSAL_MASKS[key]
    return create(document_mask_mod(doc_ids, window), doc_ids.shape[0], None, length, length, device=device)


def flex_attention_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float | None,
                        block_mask: Any, compiled: bool) -> torch.Tensor:
    """The GPU fast path: the soft-cap lives in the score_mod (flex applies it after the scale and before
    the mask); the mask structure is in the block mask. q, k and v must share one dtype."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = _compiled("flex") if compiled else flex_attention
    score_mod = None if cap is None else softcap_score_mod(cap)
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


# --- Modules ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: float32 math, weight stored as an offset from 1, one cast back at the end."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config, layer: int) -> None:
        super().__init__()
        self.nh, self.nk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nk * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nk * self.d, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d, cfg.hidden_size, bias=False)
        # query_pre_attn_scalar, not head_dim: 144 = hidden/heads for the 27B, whose head_dim is 128.
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.cap = cfg.attn_logit_softcapping
        self.window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None

    def window_at(self, length: int) -> int | None:
        """The window this layer applies to rows of `length` tokens: none when every key fits in it."""
        return self.window if self.window is not None and self.window < length else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: AttentionMasks) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nk, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nk, self.d).transpose(1, 2)
        # RoPE in the tables' dtype, then one rounding to v's: under autocast the tables are float32 (the
        # residual stream is) while the projections are bf16, and flex_attention wants q, k, v in one dtype.
        # transformers' eager path under autocast rounds the same way, in its matmul.
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out = masks.attend(q, k, v, self.scale, self.cap, self.window_at(t))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.nh * self.d))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Sandwich norm: each sub-block is normalised before and after; the residual stream never is."""

    def __init__(self, cfg: Gemma2Config, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: AttentionMasks) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, masks))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Body(nn.Module):
    """`model.*` in the checkpoint: embedding, layers, final norm."""

    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma2(nn.Module):
    """Gemma 2 causal LM with a tied head. `attn_implementation`: "auto" (flex on CUDA, math elsewhere),
    "math" or "flex". `compile_flex`: whether flex runs through torch.compile; None compiles on CUDA only,
    where uncompiled flex would materialise every score. On the CPU flex (compiled or not) has no backward,
    so it serves inference there, and compile_flex=True runs the CUDA path's compiled kernels forward."""

    def __init__(self, cfg: Gemma2Config, attn_implementation: str = "auto", compile_flex: bool | None = None) -> None:
        super().__init__()
        if attn_implementation not in ("auto", "math", "flex"):
            raise PipelineError(f"attn_implementation must be auto, math or flex, not {attn_implementation!r}")
        self.config = cfg
        self.attn_implementation = attn_implementation
        self.compile_flex = compile_flex
        self.model = Gemma2Body(cfg)
        self.gradient_checkpointing = False

    def init_weights(self, seed: int, device: torch.device | str | None = None) -> None:
        """HF's initialisation: normal(0, initializer_range) for matrices, zeros for the norm offsets, drawn
        in parameter order from one generator seeded with `seed` on the parameters' device (so the values
        depend on the seed and the device type only). A model built on the meta device is first
        materialised on `device`."""
        if device is not None and any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device)
        gen: torch.Generator | None = None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.zero_()
                    continue
                gen = gen or torch.Generator(device=p.device).manual_seed(seed)
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * self.config.initializer_range)

    def masks(self, length: int, doc_ids: torch.Tensor | None, device: torch.device) -> AttentionMasks:
        """The attention path and masks of one forward on `device`."""
        impl = self.attn_implementation
        if impl == "auto":
            impl = "flex" if device.type == "cuda" else "math"
        compiled = device.type == "cuda" if self.compile_flex is None else self.compile_flex
        return AttentionMasks(impl, length, doc_ids, device, compiled=impl == "flex" and compiled)

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after the last norm, [B, T, H]; the head is left to the caller so the
        stages can compute it chunk by chunk. `doc_ids` [B, T] (non-decreasing per row) masks attention per
        document of a packed row; RoPE is relative, so a document inside a row gets the same result as that
        document alone. None: plain causal attention, exactly transformers' Gemma2ForCausalLM."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        # sqrt(H) is rounded to the activation dtype before the multiply (bf16: 48.0 for the 2B).
        x = x * torch.tensor(math.sqrt(cfg.hidden_size), dtype=x.dtype)
        cos, sin = rope_cos_sin(torch.arange(input_ids.shape[1], device=x.device), cfg.head_dim, cfg.rope_theta, x.dtype)
        masks = self.masks(input_ids.shape[1], doc_ids, x.device)
        if masks.impl == "flex" and x.device.type != "cuda" and x.requires_grad:
            raise PipelineError("flex attention has no backward on the CPU (compiled or not, torch "
                                f"{torch.__version__}); train there with attn_implementation 'auto' or 'math'")
        for window in {layer.self_attn.window_at(input_ids.shape[1]) for layer in self.model.layers}:
            masks.get(window)  # built here, outside the checkpointed layers, once per distinct window
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks)
        return self.model.norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, H]: the input embedding, tied."""
        return self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of hidden states [..., H]. The one cast order every caller shares: the tied head's
        matmul in the activation dtype (no sqrt(H) on this side), then float32, then the final soft-cap in
        float32 (so a bf16 model's cap loses nothing more to rounding)."""
        return softcap((hidden @ self.head_weight.T).float(), self.config.final_logit_softcapping)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, doc_ids))
