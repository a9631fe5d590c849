"""Hugging Face Gemma 2 checkpoint I/O: safetensors and JSON only, never pickle.

Loading builds the model on the meta device and fills it tensor by tensor straight onto the target device
and dtype, so a 54 GB bf16 27B teacher loads onto one 80 GB GPU with no float32 or host-memory copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, read_json, sha256_file, write_json
from pipeline.model import Gemma2, Gemma2Config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Keys some exporters add that carry no information for a tied Gemma 2.
IGNORED_KEYS = ("lm_head.weight",)


def load_config(path: str | Path) -> Gemma2Config:
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: not a directory; pass a Hugging Face Gemma 2 checkpoint directory")
    raw = read_json(path / "config.json", "a Gemma 2 checkpoint directory needs config.json")
    try:
        return Gemma2Config.from_hf(raw)
    except PipelineError as e:
        raise PipelineError(f"{path / 'config.json'}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single or sharded (via the index)."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX, "the shard index")
        files = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise PipelineError(f"{path}: shard {missing[0]} listed in {INDEX} is missing; copy the whole checkpoint")
        return [path / f for f in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise PipelineError(
            f"{path}: only pickle weights (*.bin/*.pt) found, which this pipeline never unpickles; convert them once, "
            "where you trust the files, with transformers: python -c \"from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('{path}-safetensors', "
            "safe_serialization=True)\" (then copy tokenizer.model there and use that folder)")
    raise PipelineError(f"{path}: no {SINGLE} or {INDEX}; not a Hugging Face safetensors checkpoint")


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "auto",
) -> Gemma2:
    """Loads a HF Gemma 2 directory. dtype None keeps the stored dtype; device None is the CPU."""
    path = Path(path)
    cfg = load_config(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Gemma2(cfg, attn_implementation)
    expected = {name: p.shape for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in IGNORED_KEYS:
                    continue
                if name not in expected:
                    raise PipelineError(f"{file}: unexpected tensor {name!r}; this is not a Gemma 2 checkpoint of this config")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise PipelineError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
                    )
                state[name] = tensor.to(dtype) if dtype is not None else tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PipelineError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); the checkpoint is incomplete")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB": the export's files, and its host memory, stay this size


def save_model(model: Gemma2, path: str | Path, tokenizer: str | Path | None = None,
               tensors: Iterable[tuple[str, torch.Tensor | None]] | None = None,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes a HF Gemma 2 directory that `Gemma2ForCausalLM.from_pretrained` loads: `model.safetensors`, or
    files of at most `max_shard_bytes` named as HF names them with `model.safetensors.index.json`.

    `tensors` yields (name, CPU tensor) in the model's parameter order (default: its own, one at a time); a
    sharded trainer passes whole tensors gathered one by one, so host memory holds one file's worth. Each
    file is written under a temporary name and renamed; config.json is removed first and written last, so a
    folder with a config is complete. Other files in the folder (training state, metrics) are left alone."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    (path / "config.json").unlink(missing_ok=True)
    params = list(model.named_parameters())
    dtype = params[0][1].dtype
    files = _plan_files([(name, p.numel() * p.element_size()) for name, p in params], max_shard_bytes)
    if tensors is None:
        tensors = ((name, p.detach().to("cpu").contiguous()) for name, p in params)
    names = [name for name, _ in params]
    closes = {a for a, b in zip(names, names[1:] + [None]) if b is None or files[b] != files[a]}
    batch: dict[str, torch.Tensor] = {}
    i = -1
    for i, (name, tensor) in enumerate(tensors):
        if i >= len(names) or name != names[i] or tensor is None:
            raise PipelineError(f"{path}: export got tensor {name!r} out of the model's parameter order")
        batch[name] = tensor
        if name in closes:  # its file is whole: write it, then hold nothing
            with atomic_path(path / files[name]) as tmp:
                save_file(batch, tmp, metadata={"format": "pt"})
            batch = {}
    if batch or i != len(names) - 1:
        raise PipelineError(f"{path}: export got {i + 1} tensors for {len(names)} parameters")
    written = set(files.values())
    for stale in [*path.glob("model-*-of-*.safetensors"), path / SINGLE, path / INDEX]:
        if stale.name not in written and stale.is_file():
            stale.unlink()  # an earlier export with another layout
    if len(written) > 1:
        total = sum(p.numel() * p.element_size() for _, p in params)
        write_json(path / INDEX, {"metadata": {"total_size": total}, "weight_map": files})
    config = model.config.to_hf()
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "cache_implementation": "hybrid"}
    if tokenizer is not None:
        with atomic_path(path / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer, tmp)
    write_json(path / "generation_config.json", generation)
    write_json(path / "config.json", config)


def _plan_files(sizes: list[tuple[str, int]], max_bytes: int) -> dict[str, str]:
    """Tensor name → file, filling files in parameter order up to `max_bytes` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return {name: SINGLE for name in groups[0]}
    return {name: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, g in enumerate(groups) for name in g}


def model_fingerprint(path: str | Path, file_hash: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over the config (canonical JSON) and every weight file's sha256 (from `file_hash`, which may
    remember earlier results): identifies a teacher."""
    path = Path(path)
    digest = hashlib.sha256()
    raw = read_json(path / "config.json", "a Gemma 2 checkpoint directory needs config.json")
    digest.update(json.dumps(Gemma2Config.from_hf(raw).to_hf(), sort_keys=True).encode())
    for file in weight_files(path):
        digest.update(file.name.encode())
        digest.update(file_hash(file).encode())
    return digest.hexdigest()


def cache_fingerprint(folder: str | Path, splits: tuple[str, ...] = ("train", "val")) -> str | None:
    """A cache's (or token shards') identity: sha256 over each split manifest's settings and its shards' names
    and sha256s (the manifests, never the data). None when a split has no manifest: no finished cache there.
    A student records it, so `report` and `train-student` can say when the cache it was trained on is gone or
    was replaced. `splits`: a rollout cache has a train split only (`train.split_fingerprint`)."""
    from schemas.common import to_json
    from schemas.manifest import read_manifest

    digest = hashlib.sha256()
    for split in splits:
        try:
            manifest = read_manifest(Path(folder) / split, ("logits", "tokens"))
        except PipelineError:
            return None
        digest.update(json.dumps({"split": split, "meta": to_json(manifest.meta),
                                  "shards": [[s.file, s.sha256] for s in manifest.shards]}, sort_keys=True).encode())
    return digest.hexdigest()
