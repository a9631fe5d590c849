"""Model merging (Gemma 2's post-training weight averaging): a weighted mean of students that share one
config and one tokenizer, e.g. runs with different seeds or learning rates.

Streamed tensor by tensor: each output tensor is summed in float64 from the inputs' safetensors files in
slices of rows (`SLICE_BYTES` of float64 at a time), cast to the inputs' dtype and handed to `save_model`,
which writes a file as soon as it is whole. Host memory: one output file (≤ 5 GB, or the whole model when
smaller) plus two float64 slices, never the inputs themselves nor a float64 model (measured: ≤ 1.5× one
float32 model, tests/pipeline/test_merge.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.checkpoint import IGNORED_KEYS, load_config, save_model, weight_files
from pipeline.errors import PipelineError
from pipeline.fsutil import write_json
from pipeline.model import Gemma2
from pipeline.tokenizer import Tokenizer
from pipeline.train import unfinished

SLICE_BYTES = 16 << 20  # float64 bytes of one tensor summed at a time


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
    with torch.device("meta"):  # the parameter names, shapes and order; no memory
        model = Gemma2(configs[0])
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with contextlib.ExitStack() as stack:
        handles = [_open(path, shapes, stack) for path in inputs]
        first = next(iter(shapes))
        dtype = handles[0][first].get_slice(first).get_dtype()
        if dtype not in _DTYPES:
            raise PipelineError(f"{inputs[0]}: weights in {dtype}; merging reads float32, bfloat16 or float16 models")
        model = model.to(_DTYPES[dtype])
        tok = inputs[0] / "tokenizer.model"
        save_model(model, out, tokenizer=tok if tok.is_file() else None,
                   tensors=_merged(shapes, handles, [w / total for w in weights], _DTYPES[dtype]))
    write_json(out / "merge_config.json", {"inputs": [str(p) for p in inputs], "weights": [w / total for w in weights]})


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _open(path: Path, shapes: dict[str, tuple[int, ...]], stack: contextlib.ExitStack) -> dict[str, Any]:
    """Tensor name → the open safetensors file holding it (headers only), checked against the config."""
    where: dict[str, Any] = {}
    for file in weight_files(path):
        f = stack.enter_context(safe_open(file, framework="pt"))
        for name in f.keys():
            if name in IGNORED_KEYS:
                continue
            if name not in shapes:
                raise PipelineError(f"{file}: unexpected tensor {name!r}; not a Gemma 2 model of this config")
            if tuple(f.get_slice(name).get_shape()) != shapes[name]:
                raise PipelineError(f"{file}: tensor {name!r} has shape {tuple(f.get_slice(name).get_shape())}, "
                                    f"config.json implies {shapes[name]}")
            where[name] = f
    missing = sorted(set(shapes) - set(where))
    if missing:
        raise PipelineError(f"{path}: tensor {missing[0]!r} is missing; the checkpoint is incomplete")
    return where


def _merged(shapes: dict[str, tuple[int, ...]], handles: list[dict[str, Any]], weights: list[float],
            dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weighted mean) in the model's parameter order, summed in float64 (the order of the inputs does
    not matter) slice by slice of rows."""
    # Two float64 slices, reused for every tensor: the sum, and each input's slice cast into it (an add that
    # promoted on the fly would allocate, and the allocator keep, a new float64 slice each time).
    total, cast = torch.empty(SLICE_BYTES // 8, dtype=torch.float64), torch.empty(SLICE_BYTES // 8, dtype=torch.float64)
    for name, shape in shapes.items():
        out = torch.empty(shape, dtype=dtype)
        rows = shape[0] if shape else 1
        per_row = max(1, out.numel() // max(1, rows))
        step = max(1, len(total) // per_row)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            n = (hi - lo) * per_row
            acc, tmp = (total[:n], cast[:n]) if n <= len(total) else (torch.empty(n, dtype=torch.float64),
                                                                      torch.empty(n, dtype=torch.float64))
            acc.zero_()
            for h, w in zip(handles, weights):
                tmp.copy_(h[name].get_slice(name)[lo:hi].reshape(-1))
                acc.add_(tmp, alpha=w)
            out[lo:hi] = acc.view(hi - lo, *shape[1:])
        yield name, out


def _fingerprint(path: Path) -> str | None:
    tok = path / "tokenizer.model"
    return Tokenizer.load(tok).fingerprint if tok.is_file() else None
