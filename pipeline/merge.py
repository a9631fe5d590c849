"""Model merging (Gemma 2's post-training weight averaging): a weighted mean of students that share one
config and one tokenizer, e.g. runs with different seeds or learning rates."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.checkpoint import load_config, save_model, weight_files
from pipeline.errors import PipelineError
from pipeline.fsutil import write_json
from pipeline.model import Gemma2
from pipeline.tokenizer import Tokenizer
from pipeline.train import unfinished


def merge_models(inputs: list[Path], out: Path, weights: list[float] | None = None) -> None:
    if len(inputs) < 2:
        raise PipelineError("--inputs: merging needs at least two model folders")
    for path in inputs:
        reason = unfinished(path)
        if reason:
            raise PipelineError(f"--inputs {reason}; only finished models are merged")
    weights = weights or [1.0] * len(inputs)
    if len(weights) != len(inputs) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PipelineError(f"--weights: need {len(inputs)} non-negative numbers with a positive sum, got {weights}")
    configs = [load_config(p) for p in inputs]
    for path, cfg in zip(inputs[1:], configs[1:]):
        if cfg != configs[0]:
            diff = [k for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(configs[0], k)]
            raise PipelineError(f"{path}: config differs from {inputs[0]} in {diff}; only models of one shape can be averaged")
    tokenizers = [_fingerprint(p) for p in inputs]
    if len(set(tokenizers)) != 1:
        bad = next(p for p, t in zip(inputs, tokenizers) if t != tokenizers[0])
        raise PipelineError(f"{bad}: tokenizer.model differs from {inputs[0]}'s; models with other tokenizers cannot be merged")
    total = sum(weights)
    merged: dict[str, torch.Tensor] = {}
    dtype = torch.float32
    for path, w in zip(inputs, weights):
        for file in weight_files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    dtype = tensor.dtype
                    t = tensor.double() * (w / total)  # float64 sum: the order of inputs does not matter
                    merged[name] = merged[name] + t if name in merged else t
    model = Gemma2(configs[0]).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in merged.items()}, strict=True)
    tok = inputs[0] / "tokenizer.model"
    save_model(model, out, tokenizer=tok if tok.is_file() else None)
    write_json(out / "merge_config.json", {"inputs": [str(p) for p in inputs], "weights": [w / total for w in weights]})


def _fingerprint(path: Path) -> str | None:
    tok = path / "tokenizer.model"
    return Tokenizer.load(tok).fingerprint if tok.is_file() else None
