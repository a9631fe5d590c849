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

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_path, read_json
from pipeline.losses import LossConfig, chunked_loss, resolve_target
from pipeline.model import Gemma2, Gemma2Config, preset
from pipeline.progress import progress
from pipeline.reader import Cursor, ReaderConfig, ShardStream, open_split
from pipeline.runtime import PRECISIONS, Runtime
from pipeline.settings import setting
from pipeline.tokenizer import Tokenizer
from schemas.logits import MODE_COLUMNS, LogitsMeta, to_torch
from schemas.manifest import Manifest
from schemas.run_config import DataRef, RunConfig, read_run_config, write_run_config
from schemas.tokens import document_ids


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule ends at lr × this")
    warmup_steps: int = setting(20, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    clip: float = setting(1.0, "gradient-norm clipping (0: off)")


@dataclass(frozen=True)
class TrainConfig:
    max_tokens: int = setting(400_000, "training tokens per model")
    batch_size: int = setting(16, "windows per process per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    eval_every: int = setting(0, "steps between validation passes (0: only at the end)")
    eval_windows: int = setting(256, "val windows in the periodic passes (the final one uses all)")
    save_every: int = setting(50, "steps between checkpoints")
    log_every: int = setting(10, "steps between metrics.jsonl lines")
    seed: int = setting(0, "initialisation and data-order seed")
    shuffle_rows: int = setting(4096, "rows permuted together by the reader (its shuffle buffer)")
    gradient_checkpointing: bool = setting(False, "recompute each layer's activations in the backward pass")
    precision: str = setting("auto", "auto: bf16 autocast on a GPU, fp32 on the CPU (bf16 also speeds up CPUs with "
                                     "AVX512-BF16/AMX)", choices=PRECISIONS)
    init_from: str = setting("", "start from this HF model folder's weights (same config) instead of a random init")


def mixed_precision(precision: str) -> str:
    """accelerate's name for the autocast dtype of --precision."""
    if precision not in PRECISIONS:
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


def resolve_student(spec: str, vocab_size: int) -> Gemma2Config:
    """A preset takes the cache's vocabulary; an explicit config.json must already match it."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_dir():
        raw = read_json(path / "config.json" if path.is_dir() else path, "a student config.json")
        cfg = Gemma2Config.from_hf(raw)
        if cfg.vocab_size != vocab_size:
            raise PipelineError(
                f"{path}: vocab_size {cfg.vocab_size} differs from the cache's {vocab_size}; the student must "
                "use the teacher's tokenizer and vocabulary"
            )
        return cfg
    return preset(spec, vocab_size=vocab_size)


def find_tokenizer(data: Path, explicit: Path | None, fingerprint: str) -> Path:
    """The data folder's tokenizer (or an explicit one) whose fingerprint the cache recorded."""
    path = explicit or data / "tokenizer.model"
    tok = Tokenizer.load(path)
    if tok.fingerprint != fingerprint:
        raise PipelineError(
            f"{path}: tokenizer {tok.fingerprint[:16]}… is not the one the cache in {data} was made with "
            f"({fingerprint[:16]}…); use the cache's own tokenizer.model"
        )
    return path


def loss_columns(loss: LossConfig) -> tuple[str, ...]:
    """The cache columns a (resolved) loss reads."""
    return MODE_COLUMNS[loss.target if loss.kind == "kd" else "ce"]


class StudentWithLoss(nn.Module):
    """The model and its loss in one forward, so DDP sees one module and its gradient hooks fire once.
    Documents are masked by their `<bos>`; only positions whose label trains (`label_mask`) enter the
    loss, which is their summed loss over `denominator`."""

    def __init__(self, model: Gemma2, loss: LossConfig) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.targets = [c for c in loss_columns(loss) if c not in ("input_ids", "label_mask")]

    def forward(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor) -> torch.Tensor:
        ids = batch["input_ids"]
        inputs = ids[:, :-1]
        hidden = self.model.hidden_states(inputs, document_ids(inputs))
        keep = batch["label_mask"].reshape(-1)
        targets = {"labels": ids[:, 1:].reshape(-1)[keep]}
        for name in self.targets:
            targets[name] = batch[name].reshape(keep.shape[0], *batch[name].shape[2:])[keep]
        return chunked_loss(hidden.reshape(keep.shape[0], -1)[keep], self.model.head_weight,
                            self.model.config.final_logit_softcapping, targets, self.loss, denominator)


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


# --- one training run: prepare, step, loop, checkpoint ------------------------------------------------


@dataclass
class Run:
    """Everything `prepare` sets up for one model, and where it stands."""

    name: str
    data: Path
    out: Path
    loss: LossConfig  # `auto` already resolved against the cache
    optim: OptimConfig
    cfg: TrainConfig
    config: RunConfig
    tokenizer: Path
    accelerator: Any
    runtime: Runtime
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    stream: ShardStream
    step: int = 0
    wall: float = 0.0
    final: dict[str, Any] | None = None  # set when the checkpoint says the run is complete

    @property
    def model(self) -> Gemma2:
        return self.accelerator.unwrap_model(self.wrapped).model

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"


def check_splits(data: Path, loss: LossConfig) -> tuple[Manifest, LossConfig]:
    """The train and val splits agree with each other and with the loss; returns the train manifest and
    the loss with `auto` resolved once, here."""
    train_manifest = open_split(data / "train")
    meta = train_manifest.meta
    val_meta = open_split(data / "val").meta
    if val_meta.tokenizer_fingerprint != meta.tokenizer_fingerprint or val_meta.seq_len != meta.seq_len:
        raise PipelineError(f"{data}: train and val splits were made with different tokenizers or SEQ_LEN; rebuild them")
    is_cache = isinstance(meta, LogitsMeta)
    if loss.kind == "kd" and not is_cache:
        raise PipelineError(f"{data}: holds token shards; --loss kd needs a teacher logit cache (`make teacher-logits`)")
    samples = meta.samples if is_cache else 0
    if loss.kind == "kd" and loss.target == "sampled" and not samples:
        raise PipelineError(f"{data}: the cache has no tail samples; recreate it with SAMPLES>0 or use --kd-target tail")
    return train_manifest, dataclasses.replace(loss, target=resolve_target(loss.target, bool(samples)))


def prepare(name: str, student: str, data: Path, out: Path, loss: LossConfig, optim: OptimConfig, cfg: TrainConfig,
            tokenizer: Path | None = None, resume: bool = True) -> Run:
    """Checks the data, builds the model, optimizer and reader, and restores a checkpoint when resuming."""
    from accelerate import Accelerator

    train_manifest, loss = check_splits(data, loss)
    meta = train_manifest.meta
    tok_path = find_tokenizer(data, tokenizer, meta.tokenizer_fingerprint)
    model_cfg = resolve_student(student, meta.vocab_size)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.precision))
    runtime = Runtime(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index,
                      accelerator.device)
    tokens_per_step = cfg.batch_size * runtime.world * cfg.grad_accum * meta.seq_len
    is_cache = isinstance(meta, LogitsMeta)
    config = RunConfig(
        name=name, student=student, model=model_cfg.to_hf(), data=str(data),
        cache=DataRef(kind=meta.kind, tokenizer_fingerprint=meta.tokenizer_fingerprint, seq_len=meta.seq_len,
                      vocab_size=meta.vocab_size, train_rows=train_manifest.rows,
                      teacher_fingerprint=meta.teacher_fingerprint if is_cache else None,
                      topk=meta.topk if is_cache else None, samples=meta.samples if is_cache else None),
        loss=dataclasses.asdict(loss), optim=dataclasses.asdict(optim), train=dataclasses.asdict(cfg),
        world_size=runtime.world, total_steps=max(1, cfg.max_tokens // tokens_per_step),
        tokens_per_step=tokens_per_step, parameters=model_cfg.num_parameters(),
    )

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

    cursor, step, wall, final = Cursor(), 0, 0.0, None
    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.json").is_file():
        changed = config.changed(read_run_config(out))
        if changed:
            raise PipelineError(f"{out}: a run with other settings ({', '.join(changed)}) is there; "
                                "use another --out or --no-resume to start over")
        state = load_state(ckpt, accelerator.unwrap_model(wrapped).model, optimizer)
        step, cursor, wall = state["step"], Cursor(**state["cursor"]), state["wall_s"]
        if runtime.is_main:
            _trim_metrics(out / "metrics.jsonl", step)
        if state.get("done"):
            final = state["final_metrics"]
    elif runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        write_run_config(out, config)
    accelerator.wait_for_everyone()

    stream = ShardStream(data / "train", loss_columns(loss), ReaderConfig(cfg.batch_size, cfg.shuffle_rows, cfg.seed),
                         runtime, cursor)
    return Run(name, data, out, loss, optim, cfg, config, tok_path, accelerator, runtime, wrapped, optimizer, stream,
               step, wall, final)


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns this rank's share of the step's mean loss.
    The loss is the mean over every trained position of the global step (all ranks, all micro-batches), so
    N processes and gradient accumulation give what one large batch gives even when masks differ."""
    acc, cfg = run.accelerator, run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, run.config.total_steps, run.optim)
    batches = [to_torch(run.stream.next_batch(), acc.device) for _ in range(cfg.grad_accum)]
    positions = acc.reduce(sum(b["label_mask"].sum() for b in batches).float(), "sum")
    # DDP averages gradients over ranks: each rank's sum is scaled by world / positions.
    denominator = positions.clamp(min=1.0) / run.runtime.world
    running = torch.zeros((), device=acc.device)
    for micro, batch in enumerate(batches):
        sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(run.wrapped)
        with sync:
            value = run.wrapped(batch, denominator)
            acc.backward(value)
        running += value.detach()
    if run.optim.clip > 0:
        acc.clip_grad_norm_(run.wrapped.parameters(), run.optim.clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return running


def run_eval(run: Run, limit: int) -> dict[str, float]:
    return evaluate(run.model, run.data / "val", run.cfg.batch_size, run.loss.loss_chunk, limit, run.runtime,
                    lambda t: run.accelerator.reduce(t, "sum"))


def save_checkpoint(run: Run, done: bool, final: dict[str, Any] | None = None) -> None:
    """Training state and the HF export, rank 0 writing; every rank waits for it."""
    if run.runtime.is_main:
        state = {"step": run.step, "cursor": dataclasses.asdict(run.stream.cursor), "wall_s": run.wall, "done": done,
                 "tokens": run.step * run.tokens_per_step, "final_metrics": final}
        save_state(run.checkpoint_dir, run.model, run.optimizer, state)
        save_model(run.model, run.out, tokenizer=run.tokenizer)
    run.accelerator.wait_for_everyone()


def log(run: Run, record: dict[str, Any]) -> None:
    if run.runtime.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def loop(run: Run) -> None:
    """Steps until the token budget is spent: logging, periodic evaluation and checkpoints."""
    cfg, total = run.cfg, run.config.total_steps
    bar = progress(total=total, initial=run.step, desc=run.name, unit=" step", disable=not run.runtime.is_main)
    session_start, wall_before = time.perf_counter(), run.wall
    last_time, last_step = session_start, run.step
    run.wrapped.train()
    while run.step < total:
        running = train_step(run)
        step = run.step
        bar.update(1)
        now = time.perf_counter()
        run.wall = wall_before + now - session_start
        if step % cfg.log_every == 0 or step == total:
            mean_loss = run.accelerator.reduce(running, "mean").item()
            tok_s = (step - last_step) * run.tokens_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            log(run, {"step": step, "tokens": step * run.tokens_per_step, "loss": mean_loss,
                      "lr": lr_at(step - 1, total, run.optim), "tok_s": tok_s, "wall_s": run.wall})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            log(run, {"step": step, "tokens": step * run.tokens_per_step, "eval": "periodic",
                      **run_eval(run, cfg.eval_windows)})
        if step % cfg.save_every == 0 and step < total:
            save_checkpoint(run, done=False)
    bar.close()


def train(name: str, student: str, data: Path, out: Path, loss: LossConfig, optim: OptimConfig, cfg: TrainConfig,
          tokenizer: Path | None = None, resume: bool = True) -> dict[str, Any]:
    """Trains one model; returns the final validation metrics."""
    run = prepare(name, student, data, out, loss, optim, cfg, tokenizer, resume)
    if run.final is not None:
        run.accelerator.print(f"{name}: already complete ({out}); nothing to do")
        return run.final
    loop(run)
    final = {**run_eval(run, 0), "wall_s": run.wall, "tokens": run.step * run.tokens_per_step,
             "parameters": run.config.parameters}
    log(run, {"step": run.step, "eval": "final", **final})
    save_checkpoint(run, done=True, final=final)
    return final
