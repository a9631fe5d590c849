"""Stage two: train one student (or the demo teacher) from cached teacher targets or plain token shards.

accelerate places the model and runs data-parallel (DDP) under `accelerate launch`/torchrun; bf16 autocast on
a GPU. The reader splits rows across ranks itself, so N processes see what one process with N× the batch
sees. A checkpoint (weights, AdamW moments, step, reader cursor, RNG) is written atomically every
`save_every` steps; a resumed run continues to the same final weights as an uninterrupted one.

Output folder: a Hugging Face Gemma 2 directory (config.json, model.safetensors, tokenizer.model) plus
`checkpoint/`, `metrics.jsonl` and `run_config.json` (the resolved settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_path, read_json, write_json
from pipeline.losses import LossConfig, chunked_loss, resolve_target
from pipeline.model import Gemma2, Gemma2Config, preset
from pipeline.progress import progress
from pipeline.reader import KD_COLUMNS, SAMPLE_COLUMNS, Cursor, ReaderConfig, ShardStream, open_split
from pipeline.tokenizer import Tokenizer


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    max_tokens: int
    batch_size: int = 16  # windows per process per micro-step
    grad_accum: int = 1
    eval_every: int = 0  # steps; 0: only at the end
    eval_windows: int = 256  # val windows for the periodic evals (the final one uses all)
    save_every: int = 50
    log_every: int = 10
    seed: int = 0
    shuffle_rows: int = 4096
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU) | fp32 | bf16
    init_from: str = ""  # start from this HF model folder's weights (same config) instead of a random init


def mixed_precision(precision: str) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise PipelineError(f"--precision {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if precision == "fp32" else "bf16"


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio · lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))


def resolve_student(spec: str, meta: dict[str, Any]) -> Gemma2Config:
    """A preset takes the cache's vocabulary; an explicit config.json must already match it."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_dir():
        raw = read_json(path / "config.json" if path.is_dir() else path, "a student config.json")
        cfg = Gemma2Config.from_hf(raw)
        if cfg.vocab_size != meta["vocab_size"]:
            raise PipelineError(
                f"{path}: vocab_size {cfg.vocab_size} differs from the cache's {meta['vocab_size']}; the student must "
                "use the teacher's tokenizer and vocabulary"
            )
        return cfg
    return preset(spec, vocab_size=meta["vocab_size"])


def find_tokenizer(data: Path, explicit: Path | None, meta: dict[str, Any]) -> Path:
    """The data folder's tokenizer (or an explicit one) whose fingerprint the cache recorded."""
    path = explicit or data / "tokenizer.model"
    tok = Tokenizer.load(path)
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise PipelineError(
            f"{path}: tokenizer {tok.fingerprint[:16]}… is not the one the cache in {data} was made with "
            f"({meta['tokenizer_fingerprint'][:16]}…); use the cache's own tokenizer.model"
        )
    return path


class StudentWithLoss(nn.Module):
    """The model and its loss in one forward, so DDP sees one module and its gradient hooks fire once."""

    def __init__(self, model: Gemma2, loss: LossConfig) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        t = ids.shape[1] - 1
        hidden = self.model.hidden_states(ids[:, :t])
        targets = {"labels": ids[:, 1:].reshape(-1)}
        if self.loss.kind == "kd":
            for name in KD_COLUMNS[1:] + (SAMPLE_COLUMNS if self.loss.target == "sampled" else ()):
                targets[name] = batch[name].reshape(hidden.shape[0] * t, *batch[name].shape[2:])
        return chunked_loss(hidden.reshape(-1, hidden.shape[-1]), self.model.model.embed_tokens.weight,
                            self.model.config.final_logit_softcapping, targets, self.loss)


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for name, array in batch.items():
        dtype = torch.long if name in ("input_ids", "topk_ids", "sample_ids") else torch.float32
        out[name] = torch.as_tensor(array).to(device=device, dtype=dtype)
    return out


# --- checkpoint of the training state (safetensors + JSON; nothing pickled) ---------------------------


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}, indent=2) + "\n")


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = read_json(folder / "state.json", "the training checkpoint is incomplete; rerun without --resume")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(folder / "model.safetensors").items()})
    tensors = load_file(folder / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


def _trim_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; drop those lines before continuing."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in lines))


def _init_from(model: Gemma2, folder: Path) -> None:
    """Continues from another run's weights (model merging averages runs that share such a start)."""
    source = load_model(folder, dtype=torch.float32)
    if source.config != model.config:
        raise PipelineError(f"{folder}: --init-from needs a model of the student's own config")
    model.load_state_dict(source.state_dict())


# --- the loop ----------------------------------------------------------------------------------------


def train(name: str, student: str, data: Path, out: Path, loss: LossConfig, optim: OptimConfig, cfg: TrainConfig,
          tokenizer: Path | None = None, resume: bool = True) -> dict[str, Any]:
    """Trains one model; returns the final validation metrics."""
    from accelerate import Accelerator

    train_manifest = open_split(data / "train")
    meta = train_manifest["meta"]
    val_meta = open_split(data / "val")["meta"]
    if val_meta["tokenizer_fingerprint"] != meta["tokenizer_fingerprint"] or val_meta["seq_len"] != meta["seq_len"]:
        raise PipelineError(f"{data}: train and val splits were made with different tokenizers or SEQ_LEN; rebuild them")
    if loss.kind == "kd" and meta["kind"] != "logits":
        raise PipelineError(f"{data}: holds token shards; --loss kd needs a teacher logit cache (`make teacher-logits`)")
    if loss.kind == "kd" and loss.target == "sampled" and not meta.get("samples"):
        raise PipelineError(f"{data}: the cache has no tail samples; recreate it with SAMPLES>0 or use --kd-target tail")
    loss = dataclasses.replace(loss, target=resolve_target(loss.target, bool(meta.get("samples"))))
    tok_path = find_tokenizer(data, tokenizer, meta)
    model_cfg = resolve_student(student, meta)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.precision))
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = cfg.batch_size * world * cfg.grad_accum * meta["seq_len"]
    total_steps = max(1, cfg.max_tokens // tokens_per_step)
    run_config = {
        "name": name, "student": student, "model": model_cfg.to_hf(), "data": str(data),
        "cache": {**{k: meta.get(k) for k in ("kind", "teacher_fingerprint", "tokenizer_fingerprint", "topk", "samples",
                                              "seq_len", "vocab_size")}, "train_rows": train_manifest["rows"]},
        "loss": dataclasses.asdict(loss), "optim": dataclasses.asdict(optim), "train": dataclasses.asdict(cfg),
        "world_size": world, "total_steps": total_steps, "tokens_per_step": tokens_per_step,
        "parameters": model_cfg.num_parameters(),
    }

    torch.manual_seed(cfg.seed)
    model = Gemma2(model_cfg)
    model.init_weights(cfg.seed)
    if cfg.init_from:
        _init_from(model, Path(cfg.init_from))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), foreach=False,
    )
    wrapped, optimizer = accelerator.prepare(StudentWithLoss(model, loss), optimizer)

    step, cursor, wall = 0, Cursor(), 0.0
    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.json").is_file():
        saved = read_json(out / "run_config.json", "the run's settings")
        # The data is identified by its fingerprints in "cache", not by the path it was reached through.
        changed = sorted(k for k in run_config if k != "data" and saved.get(k) != run_config[k])
        if changed:
            raise PipelineError(f"{out}: a run with other settings ({', '.join(changed)}) is there; "
                                "use another --out or --no-resume to start over")
        state = load_state(ckpt, accelerator.unwrap_model(wrapped).model, optimizer)
        step, cursor, wall = state["step"], Cursor(**state["cursor"]), state["wall_s"]
        if rank == 0:
            _trim_metrics(out / "metrics.jsonl", step)
        if state.get("done"):
            accelerator.print(f"{name}: already complete ({out}); nothing to do")
            return state["final_metrics"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        write_json(out / "run_config.json", run_config)
    accelerator.wait_for_everyone()

    columns = ("input_ids",) if loss.kind == "ce" else KD_COLUMNS + (SAMPLE_COLUMNS if loss.target == "sampled" else ())
    stream = ShardStream(data / "train", columns, ReaderConfig(cfg.batch_size, cfg.shuffle_rows, cfg.seed),
                         rank, world, cursor)
    metrics_file = out / "metrics.jsonl"

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def run_eval(limit: int) -> dict[str, float]:
        return evaluate(accelerator.unwrap_model(wrapped).model, data / "val", cfg.batch_size, loss.chunk_tokens,
                        limit, rank, world, lambda t: accelerator.reduce(t, "sum"))

    def checkpoint(done: bool, final: dict[str, float] | None = None) -> None:
        if rank == 0:
            inner = accelerator.unwrap_model(wrapped).model
            state = {"step": step, "cursor": dataclasses.asdict(stream.cursor), "wall_s": wall, "done": done,
                     "tokens": step * tokens_per_step, "final_metrics": final}
            save_state(ckpt, inner, optimizer, state)
            save_model(inner, out, tokenizer=tok_path)
        accelerator.wait_for_everyone()

    bar = progress(total=total_steps, initial=step, desc=name, unit=" step", disable=rank != 0)
    session_start, wall_before = time.perf_counter(), wall
    last_time, last_step = session_start, step
    wrapped.train()
    while step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, optim)
        running = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = to_torch(stream.next_batch(), accelerator.device)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(wrapped)
            with sync:
                value = wrapped(batch) / cfg.grad_accum
                accelerator.backward(value)
            running += value.detach()
        if optim.clip > 0:
            accelerator.clip_grad_norm_(wrapped.parameters(), optim.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        now = time.perf_counter()
        wall = wall_before + now - session_start
        if step % cfg.log_every == 0 or step == total_steps:
            mean_loss = accelerator.reduce(running, "mean").item()
            tok_s = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            log({"step": step, "tokens": step * tokens_per_step, "loss": mean_loss,
                 "lr": lr_at(step - 1, total_steps, optim), "tok_s": tok_s, "wall_s": wall})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            log({"step": step, "tokens": step * tokens_per_step, "eval": "periodic", **run_eval(cfg.eval_windows)})
        if step % cfg.save_every == 0 and step < total_steps:
            checkpoint(done=False)
    bar.close()
    final = {**run_eval(0), "wall_s": wall, "tokens": step * tokens_per_step, "parameters": model_cfg.num_parameters()}
    log({"step": step, "eval": "final", **final})
    checkpoint(done=True, final=final)
    return final
