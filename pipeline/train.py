"""Stage two: train one student (or the demo teacher) from cached teacher targets or plain token shards.

Data-parallel with torch's own tools (`pipeline.parallel`): DDP, or FSDP2 for students that do not fit one
GPU, under `torchrun`/`accelerate launch` (both set the environment `Runtime.from_env` reads); bf16 autocast
on a GPU. The model is built on the meta device and materialised where it trains (sharded under FSDP). The
reader splits rows across ranks itself, so N processes see what one process with N× the batch sees.

Checkpoints (weights, AdamW moments, step, reader cursor, RNG) go to `checkpoint/step-N/` through
torch.distributed.checkpoint (DCP) in its Hugging Face storage: safetensors files whose JSON headers carry
the layout, plus state.json; nothing pickled. Every rank writes its part (its shards under FSDP; under DDP
the replicated tensors spread over the ranks), and DCP reshards on load, so a run killed on N processes
resumes on M, under DDP or FSDP, each rank reading only the slices it holds. `checkpoint/latest.json` names
the complete one and is replaced atomically, older folders are deleted after, so a complete checkpoint
exists at every instant. A resumed run continues to the weights of an uninterrupted one (exactly on as many
processes, within float32 reduction order on another count) as long as the global batch (`tokens_per_step`)
and every setting that decides the trajectory are unchanged (`RESUMABLE` lists those that may change).
Collectives wait `timeout_minutes` (default an hour) so rank 0's checkpoint bookkeeping on a slow shared
filesystem cannot trip them. A step whose loss or gradient norm is not finite is skipped; `max_bad_steps`
of them in a row stop the run with the last good checkpoint kept.

On-policy rounds (`onpolicy`: rollout caches, `make teacher-logits` over `make rollouts`' shards): each
optimizer step takes exactly λ (`onpolicy_fraction`) of its windows from the rollout caches and the rest from
the fixed cache (pipeline/reader.py `Mix`; λ = 1 needs no fixed cache, which then serves the evaluation only
when it is there); rollout windows train on their generated tokens only (their `loss_mask`), by forward KL
on the cached targets or, with `--loss reverse-kl`, the importance-weighted reverse-KL estimate of
pipeline/losses.py, whose weights' spread goes to metrics.jsonl. A rollout cache is taken only from the
init model (`--init-from`) or a model of its lineage at most `allow_stale_rounds` rounds back (`OnPolicy`).
The student records `onpolicy_round` (the newest cache's round) and the caches' identities.

Output folder: a Hugging Face Gemma 2 directory (config.json, model.safetensors or sharded files,
tokenizer.model) written after the final evaluation, `checkpoint/`, `metrics.jsonl`, `run_config.json` (the
resolved settings) and, last of all, `finished.json`: only a folder with it is a finished model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pipeline import parallel
from pipeline.checkpoint import (
    IGNORED_KEYS,
    INDEX,
    SINGLE,
    cache_fingerprint,
    load_config,
    model_fingerprint,
    save_model,
    weight_files,
)
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_path, cached_sha256, read_json, write_json
from pipeline.losses import (
    BEHAVIOUR,
    IS_SUMS,
    LossConfig,
    check_target,
    chunked_loss,
    resolve_target,
    resolve_temperature,
)
from pipeline.model import Gemma2, Gemma2Config, preset
from pipeline.parallel import SHARDINGS
from pipeline.plan import check_training
from pipeline.progress import progress
from pipeline.reader import ONPOLICY, Cursor, Mix, ReaderConfig, ShardStream, open_split
from pipeline.runtime import PRECISIONS, Runtime, autocast, autocast_dtype
from pipeline.select import HELP as SELECT_HELP
from pipeline.select import Selection, Thresholds
from pipeline.select import resolve as resolve_selection
from pipeline.settings import setting
from pipeline.tokenizer import Tokenizer
from pipeline.verify import check_same_cache
from schemas.logits import MODE_COLUMNS, LogitsMeta, to_torch
from schemas.manifest import Manifest
from schemas.run_config import RUN_CONFIG, DataRef, RunConfig, read_run_config, write_run_config
from schemas.tokens import document_ids

FINISHED = "finished.json"  # written last: the final metrics, and the sign that the folder is a finished model
LATEST = "latest.json"  # checkpoint/latest.json: which checkpoint/step-N/ folder is the complete one
CHECKPOINT_FORMAT = "dcp-safetensors"  # state.json's `format`: torch.distributed.checkpoint, Hugging Face storage


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule ends at lr × this")
    warmup_steps: int = setting(20, "linear warm-up steps")
    warmup_fraction: float = setting(0.0, "warm-up as a fraction of the run's steps (overrides --warmup-steps when > 0)")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    clip: float = setting(1.0, "gradient-norm clipping (0: off)")


@dataclass(frozen=True)
class TrainConfig:
    max_tokens: int = setting(400_000, "training tokens per model")
    batch_size: int = setting(16, "windows per process per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    batch_tokens: int = setting(0, "tokens per optimizer step over all processes; sets --grad-accum from the number "
                                   "of processes (0: batch size × processes × grad accum × SEQ_LEN)")
    eval_every: int = setting(0, "steps between validation passes (0: only at the end)")
    eval_windows: int = setting(256, "val windows per validation pass, periodic and final (0: all)")
    save_every: int = setting(0, "steps between checkpoints (0: off)")
    save_every_tokens: int = setting(0, "training tokens between checkpoints (0: off)")
    save_every_minutes: float = setting(30.0, "minutes of training between checkpoints (0: off)")
    log_every: int = setting(10, "steps between metrics.jsonl lines")
    seed: int = setting(0, "initialisation and data-order seed")
    shuffle_tokens: int = setting(1 << 21, "tokens the reader shuffles together, in regions of 2 windows from anywhere "
                                           "in the cache (2^21 at SEQ_LEN 4096: 256 regions); its row-group cache holds "
                                           "at most this many tokens of the cache's columns, whatever SEQ_LEN")
    sharding: str = setting("ddp", "ddp: a full replica per process; fsdp: parameters, gradients and AdamW states "
                                   "sharded over the processes (for students that do not fit one GPU)", choices=SHARDINGS)
    max_bad_steps: int = setting(3, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                    "(each one is skipped)")
    gradient_checkpointing: bool = setting(False, "recompute each layer's activations in the backward pass")
    precision: str = setting("auto", "auto: bf16 autocast on a GPU, fp32 on the CPU (bf16 also speeds up CPUs with "
                                     "AVX512-BF16/AMX)", choices=PRECISIONS)
    init_from: str = setting("", "start from this HF model folder's weights (same config) instead of a random init")
    select: str = setting("", SELECT_HELP)
    timeout_minutes: float = setting(60.0, "how long a process waits in a collective (all-reduce, barrier) before the run "
                                           "fails: it must cover rank 0's checkpoint bookkeeping on a slow filesystem")
    onpolicy_fraction: float = setting(1.0, "with --onpolicy: the share λ of each optimizer step's windows drawn from the "
                                            "rollout caches (GKD's λ), exactly: λ × windows per step must be whole; the "
                                            "rest from the fixed cache (--cache). 1: rollouts only, no fixed cache needed")
    allow_stale_rounds: int = setting(0, "with --onpolicy: admit rollout caches sampled by a model of the --init-from "
                                         "model's lineage up to this many on-policy rounds back (0: only its own)")


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup (--warmup-steps, or --warmup-fraction of the run), then cosine decay to min_lr_ratio · lr."""
    warmup = max(1, round(cfg.warmup_fraction * total)) if cfg.warmup_fraction > 0 else cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
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
    """The cache columns a (resolved) loss reads from the fixed cache (reverse-kl: its forward-KL targets)."""
    return MODE_COLUMNS[loss.target if loss.kind != "ce" else "ce"]


def onpolicy_columns(loss: LossConfig) -> tuple[str, ...]:
    """The columns a rollout cache's rows read: the forward-KL targets, or for reverse-kl the teacher's and the
    sampling model's log-probs of the sampled tokens."""
    return ("input_ids", "label_mask", "label_logprob", BEHAVIOUR) if loss.kind == "reverse-kl" else loss_columns(loss)


def fixed_loss(loss: LossConfig) -> LossConfig:
    """What fixed-cache windows train with: reverse-kl's estimator needs the student's own samples, so a mix's
    fixed windows keep forward KL on the cached targets."""
    return dataclasses.replace(loss, kind="kd") if loss.kind == "reverse-kl" else loss


class StudentWithLoss(nn.Module):
    """The model and its loss in one forward, so DDP/FSDP see one module: gradient hooks fire once, and
    FSDP gathers the root's parameters (the tied embedding, which the loss also uses as the head) for the
    whole forward and backward. Documents are masked by their `<bos>`; only positions whose label trains
    (`label_mask`) enter the loss, which is their summed loss over `denominator`. With `evaluate`, the
    forward runs `evaluate(model, batch)` instead, so evaluation goes through the same wrapping."""

    def __init__(self, model: Gemma2, loss: LossConfig) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.fixed = fixed_loss(loss)
        self.targets = [c for c in loss_columns(loss) if c not in ("input_ids", "label_mask")]
        self.onpolicy_targets = [c for c in onpolicy_columns(loss) if c not in ("input_ids", "label_mask")]
        self.stats: dict[str, torch.Tensor] = {}  # reverse-kl: the importance weights' spread (losses.IS_SUMS)

    def forward(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor | None,
                evaluate: Callable[[Gemma2, dict[str, torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
        """With a mix under reverse-kl (`ONPOLICY` marks the rollout rows), the rollout positions take the
        estimator and the fixed ones forward KL, both over the same `denominator`; otherwise one loss for all."""
        if evaluate is not None:
            return evaluate(self.model, batch)
        ids = batch["input_ids"]
        inputs = ids[:, :-1]
        hidden = self.model.hidden_states(inputs, document_ids(inputs))
        keep = batch["label_mask"].reshape(-1)
        hidden, labels = hidden.reshape(keep.shape[0], -1), ids[:, 1:].reshape(-1)
        rows = batch.get(ONPOLICY)
        if rows is None or self.loss.kind != "reverse-kl":
            return self._part(hidden, labels, batch, keep, self.fixed, self.targets, denominator)
        on = rows[:, None].expand(-1, ids.shape[1] - 1).reshape(-1)
        total = None
        for part, cfg, names in ((keep & ~on, self.fixed, self.targets), (keep & on, self.loss, self.onpolicy_targets)):
            if bool(part.any()):
                value = self._part(hidden, labels, batch, part, cfg, names, denominator)
                total = value if total is None else total + value
        assert total is not None, "a micro-batch with no rows"
        return total

    def _part(self, hidden: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor], keep: torch.Tensor,
              cfg: LossConfig, names: list[str], denominator: torch.Tensor | None) -> torch.Tensor:
        targets = {"labels": labels[keep]}
        for name in names:
            targets[name] = batch[name].reshape(keep.shape[0], *batch[name].shape[2:])[keep]
        return chunked_loss(hidden[keep], self.model.head_weight, self.model.config.final_logit_softcapping, targets,
                            cfg, denominator, self.stats if cfg.kind == "reverse-kl" else None)


def grad_accum_for(cfg: TrainConfig, world: int, seq_len: int) -> int:
    """Micro-steps per optimizer step: --grad-accum, or what makes --batch-tokens exact on `world` processes."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise PipelineError(f"--batch-size {cfg.batch_size} and --grad-accum {cfg.grad_accum} must be at least 1")
    if not cfg.batch_tokens:
        return cfg.grad_accum
    micro = cfg.batch_size * world * seq_len
    if cfg.batch_tokens % micro:
        raise PipelineError(
            f"--batch-tokens {cfg.batch_tokens} is not a multiple of batch size {cfg.batch_size} × {world} processes × "
            f"SEQ_LEN {seq_len} = {micro}; use {max(1, round(cfg.batch_tokens / micro)) * micro}"
        )
    return cfg.batch_tokens // micro


# --- finished models --------------------------------------------------------------------------------


def unfinished(folder: Path) -> str | None:
    """Why a model folder that train-student made is not a finished model (None when it is, or when the
    folder was not made by training here: a merged model, a downloaded one)."""
    if (folder / RUN_CONFIG).is_file() and not (folder / FINISHED).is_file():
        return (f"{folder}: its training has not finished (no {FINISHED}); rerun the same train-student command "
                "to complete it")
    return None


def cache_note(folder: Path, data: Path | None = None) -> str | None:
    """Whether the cache a finished model was trained on is gone or was replaced since (None: it is there as
    it was, or the model recorded no cache identity)."""
    try:
        recorded = json.loads((folder / FINISHED).read_text()).get("cache") or {}
    except (OSError, ValueError):
        return None
    if not recorded.get("fingerprint"):
        return None
    data = data or Path(recorded["path"])
    now = cache_fingerprint(data)
    if now is None:
        return f"the cache it was trained on ({data}) is gone"
    if now != recorded["fingerprint"]:
        return f"the cache it was trained on ({data}) was replaced since (other settings or data)"
    return None


def _start_fresh(out: Path, config: RunConfig) -> None:
    """A new run in `out`: nothing of an earlier one may be taken for it, or resumed later."""
    (out / FINISHED).unlink(missing_ok=True)  # first: the folder must not look finished for a moment longer
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    (out / "config.json").unlink(missing_ok=True)  # an old export is no model of the new settings
    for old in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors"), out / "metrics.jsonl"]:
        old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, config)


# --- checkpoint of the training state (safetensors + JSON; nothing pickled) ---------------------------


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder that checkpoint/latest.json names, if any."""
    pointer = out / "checkpoint" / LATEST
    if not pointer.is_file():
        return None
    folder = out / "checkpoint" / read_json(pointer, "the checkpoint pointer")["folder"]
    if not (folder / "state.json").is_file():
        raise PipelineError(f"{pointer} names {folder}, which is incomplete; the checkpoint was damaged after it "
                            "was written: rerun with --no-resume")
    return folder


def _state_dict(params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The training state as DCP sees it: every parameter and AdamW state by name (DTensors under FSDP: each
    rank holds and writes only its shards) and the RNG state."""
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    for name, p in params:
        tensors[f"param/{name}"] = p.detach()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{key}/{name}"] = value
    return tensors


@contextlib.contextmanager
def _single_process(runtime: Runtime) -> Iterator[None]:
    """DCP warns that one process without a process group is one process; that is meant here."""
    with warnings.catch_warnings():
        if runtime.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_state(folder: Path, params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
               runtime: Runtime) -> None:
    """The weights, AdamW states and RNG into `folder` with torch.distributed.checkpoint, as safetensors
    files (its Hugging Face storage: the layout rides in each file's JSON header, nothing is pickled). Under
    FSDP every rank writes its own shards; under DDP the replicated tensors are spread over the ranks, each
    written once. Every rank must call it."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    with _single_process(runtime):
        save(_state_dict(params, optimizer), storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
             no_dist=runtime.world == 1)


def load_state(folder: Path, params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
               runtime: Runtime) -> None:
    """Restores what `save_state` wrote, whatever number of processes and sharding wrote it: DCP reads into
    each rank's own tensors (its shards under FSDP, the replica under DDP) only the slices they hold, straight
    from the files, so no rank ever holds the whole saved state beside its own."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    try:
        saved = set(HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata)
    except (OSError, ValueError, RuntimeError) as e:
        raise PipelineError(f"{folder}: cannot read the checkpoint ({e}); rerun with --no-resume") from None
    kinds = sorted({key.split("/", 1)[0] for key in saved} - {"param", "rng"})
    for _, p in params:  # AdamW's own layout: `step` a float32 scalar on the CPU, the moments shaped like p
        if kinds:
            optimizer.state[p] = {k: torch.zeros((), dtype=torch.float32) if k == "step" else torch.zeros_like(p)
                                  for k in kinds}
    state = _state_dict(params, optimizer)
    if set(state) != saved:
        odd = sorted(set(state) ^ saved)
        raise PipelineError(f"{folder}: holds other tensors than this model's ({odd[:3]}); the checkpoint is of "
                            "another model, rerun with --no-resume")
    try:
        with torch.no_grad(), _single_process(runtime):
            load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=runtime.world == 1)
    except (AssertionError, RuntimeError, ValueError) as e:  # DCP reports shape mismatches as these
        raise PipelineError(f"{folder}: does not fit this model ({str(e).splitlines()[0][:200]}); the checkpoint is "
                            "of another model, rerun with --no-resume") from None
    torch.set_rng_state(state["rng/torch"])


def _trim_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; drop those lines before continuing."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in lines))


def _init_from(model: Gemma2, folder: Path) -> None:
    """Continues from another run's weights (model merging averages runs that share such a start), read
    tensor by tensor into this rank's parameters (shards under FSDP)."""
    reason = unfinished(folder)
    if reason:
        raise PipelineError(f"--init-from {reason}")
    if load_config(folder) != model.config:
        raise PipelineError(f"{folder}: --init-from needs a model of the student's own config")
    params = dict(model.named_parameters())
    missing = set(params)
    with torch.no_grad():
        for file in weight_files(folder):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name in IGNORED_KEYS:
                        continue
                    if name not in params:
                        raise PipelineError(f"{file}: unexpected tensor {name!r}; not a Gemma 2 model of this config")
                    params[name].copy_(f.get_tensor(name))
                    missing.discard(name)
    if missing:
        raise PipelineError(f"{folder}: tensor {sorted(missing)[0]!r} is missing; the checkpoint is incomplete")


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
    runtime: Runtime
    wrapped: nn.Module  # what trains: DDP, FSDP (in place) or the plain module
    params: list[tuple[str, nn.Parameter]]  # the model's (sharded) parameters by HF name, as the optimizer holds them
    optimizer: torch.optim.Optimizer
    stream: ShardStream
    grad_accum: int
    dtype: torch.dtype | None  # autocast
    step: int = 0
    wall: float = 0.0
    bad: int = 0  # steps skipped in a row
    saved_step: int = -1  # the step of the newest checkpoint
    evaluates: bool = True  # False: no val split (rollouts only, no fixed cache)
    is_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # reverse-kl, since the last log line

    @property
    def model(self) -> Gemma2:
        return parallel.unwrap(self.wrapped).model

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    @property
    def sharded(self) -> bool:
        return self.cfg.sharding == "fsdp" and self.runtime.world > 1


def check_splits(data: Path, loss: LossConfig) -> tuple[Manifest, LossConfig]:
    train_manifest = open_split(data / "train")
    meta = train_manifest.meta
    check_same_cache(meta, open_split(data / "val").meta, data)
    return train_manifest, resolve_loss(loss, meta, data)


def resolve_loss(loss: LossConfig, meta: Any, data: Path) -> LossConfig:
    """The loss against the cache whose targets it reads (`auto`, τ), or refused in one line."""
    is_cache = isinstance(meta, LogitsMeta)
    if loss.kind != "ce" and not is_cache:
        raise PipelineError(f"{data}: holds token shards; --loss {loss.kind} needs a teacher logit cache "
                            "(`make teacher-logits`)")
    samples = meta.samples if is_cache else 0
    if loss.kind != "ce" and loss.target == "sampled" and not samples:
        raise PipelineError(f"{data}: the cache has no tail samples; recreate it with SAMPLES>0 or use --kd-target tail")
    loss = dataclasses.replace(loss, target=resolve_target(loss.target, bool(samples)))
    if loss.kind != "ce":
        check_target(loss.target, meta.topk, data)
    return resolve_temperature(loss, meta.temperature if is_cache else 1.0)


# --- on-policy rounds: rollout caches, the mix, staleness ---------------------------------------------


# Cache settings that may differ between a rollout cache and the fixed cache (or another rollout cache) whose
# rows share batches; everything else must agree (the teacher, tokenizer, SEQ_LEN, K, N, τ, the encoding).
PER_CACHE = frozenset({"split", "corpus", "format", "rollouts"})


def split_fingerprint(folder: Path) -> str:
    """A rollout cache's identity (it has a train split only): `cache_fingerprint` of that one split."""
    fingerprint = cache_fingerprint(folder, splits=("train",))
    if fingerprint is None:  # no finished split there: open_split raises why
        open_split(folder / "train")
        raise PipelineError(f"{folder / 'train'}: not a finished split")
    return fingerprint


def model_lineage(folder: Path) -> tuple[int, list[dict[str, Any]]]:
    """A model folder's on-policy round (its run_config's `onpolicy_round`, 0 when absent: a student trained
    off-policy, a downloaded model) and its lineage: the models it was continued from on rollouts, newest
    first, as [{"fingerprint", "round"}] (recorded by the run that trained it)."""
    path = folder / RUN_CONFIG
    if not path.is_file():
        return 0, []
    raw = read_json(path, "the init model's settings")
    return int(raw.get("onpolicy_round") or 0), list((raw.get("onpolicy") or {}).get("lineage") or [])


@dataclass(frozen=True)
class OnPolicy:
    """Rollout caches admitted for a run: their train splits, metadata, identities and lag in rounds, and the
    record that goes into run_config.json (`onpolicy`)."""

    folders: tuple[Path, ...]
    metas: tuple[LogitsMeta, ...]
    fingerprints: tuple[str, ...]
    lags: tuple[int, ...]
    rows: int  # train windows over all of them
    init: dict[str, Any]  # the init model: fingerprint and round
    lineage: list[dict[str, Any]]  # this run's: the init model, then its own lineage

    @property
    def round(self) -> int:
        """The newest cache's round: the trained student's `onpolicy_round`."""
        return max(int(m.rollouts["round"]) for m in self.metas)  # type: ignore[index]

    def record(self, fraction: float, windows: int, fixed: bool) -> dict[str, Any]:
        """What run_config.json keeps (identities by fingerprint: the paths are in finished.json)."""
        caches = [{"fingerprint": fp, "round": int(m.rollouts["round"]),  # type: ignore[index]
                   "model_round": int(m.rollouts["model_round"]),  # type: ignore[index]
                   "model_fingerprint": m.rollouts["model_fingerprint"], "lag": lag}  # type: ignore[index]
                  for fp, m, lag in zip(self.fingerprints, self.metas, self.lags)]
        return {"fraction": fraction, "windows_per_step": windows, "fixed_cache": fixed, "caches": caches,
                "init": self.init, "lineage": self.lineage}


def resolve_onpolicy(folders: tuple[Path, ...], cfg: TrainConfig, loss: LossConfig,
                     reference: LogitsMeta | None) -> OnPolicy:
    """Checks the rollout caches (each a finished teacher pass over `make rollouts` shards, of the fixed
    cache's teacher, tokenizer and settings) and their staleness against the init model: lag = the init model's
    `onpolicy_round` − the cache's `model_round`, 0 when the cache was sampled by the init model itself
    (fingerprints equal); a cache sampled by any other model must be of the init model's lineage within
    `allow_stale_rounds` rounds. Refusals are one line naming the cache and the way out."""
    if len(set(map(str, folders))) != len(folders):
        raise PipelineError(f"--onpolicy {' '.join(map(str, folders))}: a cache is listed twice")
    if loss.kind == "ce":
        raise PipelineError("--onpolicy with --loss ce: rollouts train by distillation; use --loss kd (forward KL on "
                            "the cached targets) or --loss reverse-kl")
    if cfg.allow_stale_rounds < 0:
        raise PipelineError(f"--allow-stale-rounds {cfg.allow_stale_rounds}: must be ≥ 0 (rounds)")
    metas: list[LogitsMeta] = []
    rows = 0
    for folder in folders:
        manifest = open_split(folder / "train")
        meta = manifest.meta
        if not isinstance(meta, LogitsMeta) or meta.rollouts is None:
            raise PipelineError(f"--onpolicy {folder}: not a cache of rollouts (no `rollouts` in its metadata); make "
                                f"one with `make teacher-logits TOKENS=<make rollouts' folder> CACHE={folder}`")
        if loss.kind == "reverse-kl" and not meta.signals:
            raise PipelineError(f"--onpolicy {folder}: the cache has no `label_logprob`, which --loss reverse-kl reads; "
                                "recreate it with this version's `make teacher-logits`")
        ref = reference or (metas[0] if metas else None)
        if ref is not None:
            a, b = dataclasses.asdict(ref), dataclasses.asdict(meta)
            differ = [k for k in a if k not in PER_CACHE and a[k] != b.get(k)]
            if differ:
                what = "another teacher" if "teacher_fingerprint" in differ else "other settings"
                raise PipelineError(f"--onpolicy {folder}: made by {what} than the {'fixed cache' if reference else 'first'}"
                                    f" ({', '.join(f'{k} {a[k]!r} vs {b.get(k)!r}' for k in differ)[:300]}); capture "
                                    "every cache of a run with the same `make teacher-logits` settings and teacher")
        metas.append(meta)
        rows += manifest.rows
    from pipeline.capture import HASH_CACHE  # the file hashes capture keeps beside a model

    init_dir = Path(cfg.init_from) if cfg.init_from else None
    init_fp = model_fingerprint(init_dir, file_hash=cached_sha256([init_dir / HASH_CACHE])) if init_dir else None
    init_round, init_lineage = model_lineage(init_dir) if init_dir else (0, [])
    known = {e["fingerprint"]: int(e["round"]) for e in init_lineage}
    lags = []
    for folder, meta in zip(folders, metas):
        info = meta.rollouts or {}
        sampler, model_round = info.get("model_fingerprint"), int(info.get("model_round", 0))
        if init_fp is not None and sampler == init_fp:
            lags.append(0)
            continue
        lag = init_round - model_round
        if init_dir is None:
            raise PipelineError(f"--onpolicy {folder}: rollouts train the model that sampled them ({info.get('model')}); "
                                "pass it as --init-from")
        if sampler not in known:
            raise PipelineError(f"--onpolicy {folder}: sampled by {info.get('model')} ({str(sampler)[:12]}…, round "
                                f"{model_round}), which is neither --init-from {init_dir} nor a model of its lineage; "
                                f"make rollouts from {init_dir}, or --allow-stale-rounds N only admits the lineage's")
        if lag > cfg.allow_stale_rounds:
            raise PipelineError(f"--onpolicy {folder}: sampled {lag} round(s) before --init-from {init_dir} (round "
                                f"{init_round}); pass --allow-stale-rounds {lag} to train on it importance-weighted, or "
                                f"make rollouts from {init_dir}")
        lags.append(lag)
    init = {"fingerprint": init_fp, "round": init_round} if init_fp else {}
    lineage = ([{"fingerprint": init_fp, "round": init_round}] if init_fp else []) + init_lineage
    return OnPolicy(folders, tuple(metas), tuple(split_fingerprint(f) for f in folders), tuple(lags), rows, init,
                    lineage)


def onpolicy_windows(cfg: TrainConfig, windows: int) -> int:
    """Rollout windows of each optimizer step: λ × the step's windows, which must be whole (the mix is exact)."""
    lam = cfg.onpolicy_fraction
    if not 0 < lam <= 1:
        raise PipelineError(f"--onpolicy-fraction {lam:g}: the rollouts' share of a step must be in (0, 1]; without "
                            "rollouts leave out --onpolicy")
    n = round(lam * windows)
    if abs(n - lam * windows) > 1e-6 * windows or n == 0:
        near = sorted({max(1, math.floor(lam * windows)), min(windows, math.ceil(lam * windows))})
        raise PipelineError(f"--onpolicy-fraction {lam:g} of the {windows} windows of a step is not a whole number of "
                            f"windows; use {' or '.join(f'{k / windows:g}' for k in near)}, or a --batch-tokens that "
                            "makes it whole")
    return n


def micro_counts(windows: int, grad_accum: int) -> tuple[int, ...]:
    """A step's rollout windows spread over its micro-batches as evenly as can be (first ones get fewer)."""
    return tuple((m + 1) * windows // grad_accum - m * windows // grad_accum for m in range(grad_accum))


def run_config(name: str, student: str, data: Path, loss: LossConfig, optim: OptimConfig, cfg: TrainConfig,
               train_manifest: Manifest, model_cfg: Gemma2Config, world: int,
               onpolicy: OnPolicy | None = None, fixed: bool = True) -> RunConfig:
    """`train_manifest`: the fixed cache's (`fixed` False, rollouts only with no fixed cache: the first rollout
    cache's, `train_rows` then counting every rollout cache's windows)."""
    meta = train_manifest.meta
    tokens_per_step = cfg.batch_size * world * grad_accum_for(cfg, world, meta.seq_len) * meta.seq_len
    is_cache = isinstance(meta, LogitsMeta)
    record = None
    if onpolicy is not None:
        record = onpolicy.record(cfg.onpolicy_fraction, onpolicy_windows(cfg, tokens_per_step // meta.seq_len), fixed)
    return RunConfig(
        name=name, student=student, model=model_cfg.to_hf(), data=str(data),
        cache=DataRef(kind=meta.kind, tokenizer_fingerprint=meta.tokenizer_fingerprint, seq_len=meta.seq_len,
                      vocab_size=meta.vocab_size, train_rows=train_manifest.rows if fixed else onpolicy.rows,  # type: ignore[union-attr]
                      teacher_fingerprint=meta.teacher_fingerprint if is_cache else None,
                      topk=meta.topk if is_cache else None, samples=meta.samples if is_cache else None,
                      format=meta.format),
        loss=_loss_settings(loss), optim=dataclasses.asdict(optim), train=_train_settings(cfg),
        world_size=world, total_steps=max(1, cfg.max_tokens // tokens_per_step),
        tokens_per_step=tokens_per_step, parameters=model_cfg.num_parameters(),
        onpolicy_round=onpolicy.round if onpolicy is not None else None, onpolicy=record,
    )


def _train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The recorded settings; `select` only when set, so runs recorded before it existed still resume. The
    on-policy settings go to the run config's `onpolicy` record instead."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if (k != "select" or v) and k not in ("onpolicy_fraction", "allow_stale_rounds")}


def _loss_settings(loss: LossConfig) -> dict[str, Any]:
    """The recorded loss; `is_clip` only for reverse-kl (which reads it), so runs recorded before it existed
    still resume."""
    return {k: v for k, v in dataclasses.asdict(loss).items() if k != "is_clip" or loss.kind == "reverse-kl"}


# Settings a resumed run may change: they decide how the same global steps are computed, evaluated, saved
# and logged, not which steps those are (the global batch, `tokens_per_step`, must stay the same).
RESUMABLE = frozenset({"batch_size", "grad_accum", "batch_tokens", "eval_every", "eval_windows", "save_every",
                       "save_every_tokens", "save_every_minutes", "log_every", "max_bad_steps",
                       "gradient_checkpointing", "sharding", "timeout_minutes"})


def trajectory(config: RunConfig) -> RunConfig:
    """The settings that decide the weights a run ends with: what a resume must find unchanged."""
    train = {k: v for k, v in config.train.items() if k not in RESUMABLE}
    return dataclasses.replace(config, train=train, world_size=0)


def check_same_run(out: Path, config: RunConfig) -> None:
    """Resuming needs the settings that decide the run's trajectory; the number of processes, the split of
    the global batch into micro-batches, the sharding and the eval/save/log cadence may change."""
    saved = read_run_config(out)
    if saved.tokens_per_step != config.tokens_per_step:
        raise PipelineError(
            f"{out}: the run there takes {saved.tokens_per_step} tokens a step, this one {config.tokens_per_step} "
            f"({config.world_size} processes); keep the global batch: set --batch-tokens {saved.tokens_per_step}, "
            "or start over with --no-resume"
        )
    changed = trajectory(config).changed(trajectory(saved))
    if changed:
        raise PipelineError(f"{out}: a run with other settings ({', '.join(changed)}) is there; "
                            "train it under another name (STUDENTS=newname=spec) or in another STUDENT_DIR "
                            "(--students), or pass --no-resume to start over")


def prepare(name: str, config: RunConfig, model_cfg: Gemma2Config, data: Path, out: Path, loss: LossConfig,
            optim: OptimConfig, cfg: TrainConfig, tokenizer: Path, runtime: Runtime, resume: bool,
            select: Thresholds | None = None, onpolicy: OnPolicy | None = None, fixed: bool = True) -> Run:
    """Builds the model where it trains (sharded under FSDP), the optimizer and the reader (with the data
    selection, if any), and restores the checkpoint when resuming; otherwise clears the folder of any earlier
    run."""
    folder = latest_checkpoint(out) if resume else None
    state: dict[str, Any] | None = None
    if folder is not None:
        check_same_run(out, config)
        state = read_json(folder / "state.json", "the checkpoint's state")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise PipelineError(f"{folder}: a checkpoint in an older layout (one file per rank), which this version "
                                "does not read; finish the run with the version that wrote it, or rerun with --no-resume")
        if runtime.is_main:
            write_run_config(out, config)  # this session's processes and cadence; the trajectory is the same
    elif runtime.is_main:
        _start_fresh(out, config)
    runtime.barrier()

    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        student = StudentWithLoss(Gemma2(model_cfg), loss)
    student.model.gradient_checkpointing = cfg.gradient_checkpointing

    def init() -> None:  # a resumed run's weights come from its checkpoint instead
        if state is None:
            student.model.init_weights(cfg.seed)
            if cfg.init_from:
                _init_from(student.model, Path(cfg.init_from))

    dtype = autocast_dtype(cfg.precision, runtime.device)
    wrapped = parallel.wrap(student, student.model.model.layers, cfg.sharding, runtime, init, dtype)
    params = list(student.model.named_parameters())
    decay = [p for n, p in params if not n.endswith("norm.weight")]
    no_decay = [p for n, p in params if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), foreach=False,
    )
    cursor = Cursor()
    if state is not None:
        assert folder is not None
        load_state(folder, params, optimizer, runtime)
        cursor = Cursor(**state["cursor"])
        if runtime.is_main:
            _trim_metrics(out / "metrics.jsonl", state["step"])
    runtime.barrier()
    grad_accum = grad_accum_for(cfg, runtime.world, config.cache.seq_len)
    mix = None
    if onpolicy is not None:
        assert config.onpolicy is not None
        mix = Mix(tuple(f / "train" for f in onpolicy.folders), onpolicy_columns(loss),
                  micro_counts(config.onpolicy["windows_per_step"], grad_accum))
    trains_fixed = mix is None or cfg.onpolicy_fraction < 1
    stream = ShardStream(data / "train" if trains_fixed else None, loss_columns(loss),
                         ReaderConfig(cfg.batch_size, cfg.shuffle_tokens, cfg.seed), runtime, cursor, select=select,
                         mix=mix)
    run = Run(name, data, out, loss, optim, cfg, config, tokenizer, runtime, wrapped, params, optimizer, stream,
              grad_accum, dtype, evaluates=fixed)
    if state is not None:
        run.step, run.wall, run.bad, run.saved_step = state["step"], state["wall_s"], state["bad_steps"], state["step"]
    return run


def train_step(run: Run) -> tuple[float, float, bool]:
    """One optimizer step over grad_accum micro-batches: (mean loss, gradient norm, whether both are finite).
    The loss is the mean over every trained position of the global step (all ranks, all micro-batches), so
    N processes and gradient accumulation give what one large batch gives even when masks differ. Each
    micro-batch is taken from the reader when its turn comes and back-propagated as a sum; the count of
    trained positions is all-reduced at the end and the gradients scaled by it before the norm and the
    clipping: the same gradient as dividing each micro-batch by the global count up front, without holding
    the step's micro-batches (so the reader's prefetch keeps reading while they train). A step with a
    non-finite loss or gradient norm is skipped: no update, its gradients dropped."""
    runtime = run.runtime
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, run.config.total_steps, run.optim)
    unit = torch.ones((), device=runtime.device)  # each micro-batch's loss is its sum over trained positions
    running = torch.zeros((), device=runtime.device)
    trained = 0
    for micro in range(run.grad_accum):
        arrays = run.stream.next_batch()
        trained += int(arrays["label_mask"].sum())
        rows = arrays.pop(ONPOLICY, None)
        batch = to_torch(arrays, runtime.device)
        if rows is not None:
            batch[ONPOLICY] = torch.as_tensor(rows).to(runtime.device)
        del arrays
        with parallel.gradient_sync(run.wrapped, micro == run.grad_accum - 1):
            with autocast(run.dtype, runtime.device):
                value = run.wrapped(batch, unit)
            value.backward()
        running += value.detach()
        del batch, value
    # One all-reduce for the step's summed loss and its trained positions over every rank (and the importance
    # weights' sums, with reverse-kl).
    student = parallel.unwrap(run.wrapped)
    sums = [running, torch.tensor(float(trained), device=runtime.device)]
    if run.loss.kind == "reverse-kl":
        sums += [student.stats.get(k, torch.zeros(())).to(runtime.device).float() for k in IS_SUMS]
    totals = parallel.all_reduce_sum(torch.stack(sums), runtime)
    if run.loss.kind == "reverse-kl":
        _gather_is_stats(run, student.stats, totals[2:])
    student.stats.clear()
    positions = totals[1].clamp(min=1.0)
    trainable = [p for _, p in run.params]
    # DDP and FSDP average gradients over ranks: world / positions turns each rank's sums into the global mean.
    parallel.scale_grads_(trainable, runtime.world / positions)
    norm = parallel.grad_norm(trainable)
    loss = totals[0] / positions
    finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(norm).item())
    if finite:
        if run.optim.clip > 0:
            parallel.clip_(trainable, run.optim.clip, norm)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss.item(), norm.item(), finite


def _gather_is_stats(run: Run, stats: dict[str, torch.Tensor], sums: torch.Tensor) -> None:
    """Adds one step's importance-weight statistics (summed over ranks; min and max reduced) to the run's
    running ones, which the next metrics line reports and resets."""
    inf = torch.tensor(float("inf"), device=run.runtime.device)
    ends = torch.stack([-stats.get("is_min", inf).to(inf.device).float(), stats.get("is_max", -inf).to(inf.device).float()])
    if run.runtime.world > 1:
        torch.distributed.all_reduce(ends, op=torch.distributed.ReduceOp.MAX)
    acc = run.is_stats
    for key, value in zip(IS_SUMS, sums.tolist()):
        acc[key] = acc.get(key, 0.0) + value
    acc["is_min"] = min(acc.get("is_min", math.inf), -ends[0].item())
    acc["is_max"] = max(acc.get("is_max", -math.inf), ends[1].item())


def is_metrics(run: Run) -> dict[str, float]:
    """The importance weights p_S(y)/μ(y) of the rollout tokens since the last metrics line: the ratio's
    mean, min and max, the share clipped at --is-clip, the mean weight used, and the rollout tokens' mean
    reverse-KL estimate (nats/token); then reset."""
    acc, run.is_stats = run.is_stats, {}
    n = acc.get("is_tokens", 0.0)
    if not n:
        return {}
    return {"is_mean": acc["is_sum"] / n, "is_min": acc["is_min"], "is_max": acc["is_max"],
            "is_clipped": acc["is_clipped"] / n, "is_weight_mean": acc["is_weight_sum"] / n,
            "onpolicy_rkl": acc["rkl_sum"] / n, "onpolicy_tokens": n}


def run_eval(run: Run, limit: int) -> dict[str, float]:
    """Validation through the wrapped module on every rank (under FSDP its forward gathers the shards), in
    float32 as the report evaluates other models, except where FSDP gathers the layers in bf16: there under
    the training's autocast."""
    dtype = run.dtype if run.sharded else None

    def forward(fn: Callable[[Gemma2, dict[str, torch.Tensor]], torch.Tensor],
                batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(dtype, run.runtime.device):
            return run.wrapped(batch, None, evaluate=fn)

    return evaluate(run.model, run.data / "val", run.cfg.batch_size, run.loss.loss_chunk, limit, run.runtime, forward)


def save_checkpoint(run: Run) -> None:
    """Training state into checkpoint/step-N/ (every rank writes its part), then the atomic switch of
    latest.json to it, then the older folders removed: a complete checkpoint exists at every instant."""
    if run.saved_step == run.step:
        return
    runtime, root = run.runtime, run.checkpoint_dir
    name = f"step-{run.step:08d}"
    tmp = root / f".{name}.tmp"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    save_state(tmp, run.params, run.optimizer, runtime)
    runtime.barrier()
    if runtime.is_main:
        state = {"step": run.step, "cursor": dataclasses.asdict(run.stream.cursor), "wall_s": run.wall,
                 "tokens": run.step * run.tokens_per_step, "bad_steps": run.bad, "world": runtime.world,
                 "sharding": run.cfg.sharding, "format": CHECKPOINT_FORMAT}
        write_json(tmp / "state.json", state)
        shutil.rmtree(root / name, ignore_errors=True)
        tmp.rename(root / name)
        write_json(root / LATEST, {"folder": name, "step": run.step})
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    run.saved_step = run.step
    runtime.barrier()


def export(run: Run) -> None:
    """The Hugging Face directory, gathered tensor by tensor through every rank and written by rank 0."""
    tensors = parallel.full_tensors(run.params, run.runtime)
    if run.runtime.is_main:
        save_model(run.model, run.out, tokenizer=run.tokenizer, tensors=tensors)
    else:
        for _ in tensors:
            pass
    run.runtime.barrier()


def log(run: Run, record: dict[str, Any]) -> None:
    if run.runtime.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _save_due(run: Run, since_save: float) -> bool:
    cfg, step = run.cfg, run.step
    due = bool(cfg.save_every) and step % cfg.save_every == 0
    if cfg.save_every_tokens:
        due |= step * run.tokens_per_step // cfg.save_every_tokens > (step - 1) * run.tokens_per_step // cfg.save_every_tokens
    if cfg.save_every_minutes:  # clocks differ between ranks: they agree to save if one says so
        due = parallel.any_rank(due or since_save >= 60 * cfg.save_every_minutes, run.runtime)
    return due


def _guard(run: Run, loss: float, norm: float) -> None:
    """Counts a skipped step; stops the run after max_bad_steps of them in a row."""
    run.bad += 1
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    log(run, {"step": run.step, "skipped": f"non-finite {what}", "bad_in_a_row": run.bad})
    if run.runtime.is_main:
        print(f"{run.name}: step {run.step} skipped (non-finite {what})", file=sys.stderr)
    if run.bad >= run.cfg.max_bad_steps:
        kept = f"the last good checkpoint (step {run.saved_step}) is kept in {run.checkpoint_dir}" if run.saved_step >= 0 \
            else "no checkpoint was written yet"
        raise PipelineError(
            f"{run.name}: {run.bad} steps in a row had a non-finite {what} (last at step {run.step}); stopped, "
            f"{kept}; lower --lr or check the cache (`make verify`), then rerun"
        )


def loop(run: Run) -> None:
    """Steps until the token budget is spent: the non-finite guard, logging, evaluation and checkpoints."""
    cfg, total = run.cfg, run.config.total_steps
    bar = progress(total=total, initial=run.step, desc=run.name, unit=" step", disable=not run.runtime.is_main)
    session_start, wall_before = time.perf_counter(), run.wall
    last_time, last_step, last_save = session_start, run.step, session_start
    run.wrapped.train()
    try:
        while run.step < total:
            loss, norm, finite = train_step(run)
            step = run.step
            bar.update(1)
            now = time.perf_counter()
            run.wall = wall_before + now - session_start
            if finite:
                run.bad = 0
            else:
                _guard(run, loss, norm)
            if finite and (step % cfg.log_every == 0 or step == total):
                tok_s = (step - last_step) * run.tokens_per_step / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
                log(run, {"step": step, "tokens": step * run.tokens_per_step, "loss": loss, "grad_norm": norm,
                          "lr": lr_at(step - 1, total, run.optim), "tok_s": tok_s, "wall_s": run.wall,
                          **is_metrics(run)})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total and run.evaluates:
                log(run, {"step": step, "tokens": step * run.tokens_per_step, "eval": "periodic",
                          **run_eval(run, cfg.eval_windows)})
            if step < total and not run.bad and _save_due(run, now - last_save):  # never in a run of bad steps
                save_checkpoint(run)
                last_save = time.perf_counter()
    finally:
        bar.close()  # before any error line, which must come last


def train(name: str, student: str, data: Path | None, out: Path, loss: LossConfig, optim: OptimConfig,
          cfg: TrainConfig, tokenizer: Path | None = None, resume: bool = True,
          onpolicy: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Trains one model; returns the final validation metrics. A finished run (same settings) is not redone.
    `onpolicy`: rollout caches mixed in at `cfg.onpolicy_fraction`; `data` (the fixed cache) may then be None
    when the fraction is 1 (no validation then: the final metrics hold the run's size and time only)."""
    fixed = data is not None
    if data is None:
        if not onpolicy or cfg.onpolicy_fraction != 1:
            raise PipelineError("no fixed cache (--cache): only --onpolicy-fraction 1 trains on rollout caches alone")
        data = Path(onpolicy[0])
        train_manifest = open_split(data / "train")
        loss = resolve_loss(loss, train_manifest.meta, data)
    else:
        train_manifest, loss = check_splits(data, loss)
    meta = train_manifest.meta
    rollouts = resolve_onpolicy(tuple(map(Path, onpolicy)), cfg, loss, meta if fixed else None) if onpolicy else None
    # The rollout caches' τ, K and draws need no resolve_loss of their own: resolve_onpolicy refuses any whose
    # settings differ from the cache the loss was resolved against.
    if rollouts is None and loss.kind == "reverse-kl":
        raise PipelineError("--loss reverse-kl trains on the student's own samples: pass rollout caches with --onpolicy "
                            "(`make rollouts`, then `make teacher-logits TOKENS=...`)")
    select = resolve_selection(Selection.parse(cfg.select), meta, train_manifest.stats, data / "train") if fixed else None
    tok_path = find_tokenizer(data, tokenizer, meta.tokenizer_fingerprint)
    model_cfg = resolve_student(student, meta.vocab_size)
    runtime = Runtime.from_env(60 * cfg.timeout_minutes)
    config = run_config(name, student, data, loss, optim, cfg, train_manifest, model_cfg, runtime.world, rollouts,
                        fixed)
    if resume and (out / FINISHED).is_file():
        check_same_run(out, config)
        if runtime.is_main:
            print(f"{name}: already complete ({out}); nothing to do")
            note = cache_note(out, data)
            if note:
                print(f"{name}: {note}; --no-resume retrains it on the cache there now", file=sys.stderr)
        return read_json(out / FINISHED, "the finished run's metrics")["final"]
    check_training(model_cfg, fixed_loss(loss), cfg, meta, runtime.device, runtime.world)  # on a GPU: what cannot fit
    run = prepare(name, config, model_cfg, data, out, loss, optim, cfg, tok_path, runtime, resume, select, rollouts,
                  fixed)
    if rollouts is not None and run.step == 0 and runtime.is_main:
        record = config.onpolicy or {}
        print(f"{name}: on-policy round {rollouts.round}: {record['windows_per_step']} of {config.tokens_per_step // meta.seq_len} "
              f"windows a step from {len(rollouts.folders)} rollout cache(s) (lag {', '.join(map(str, rollouts.lags))} "
              f"round(s)), loss {loss.kind}", file=sys.stderr)
    if select is not None and run.step == 0:
        log(run, {"step": 0, "selection": select.summary()})
    try:
        loop(run)
        save_checkpoint(run)  # the training is safe before the final evaluation and export
        final = {**(run_eval(run, cfg.eval_windows) if run.evaluates else {}), "wall_s": run.wall,
                 "tokens": run.step * run.tokens_per_step, "parameters": run.config.parameters}
        log(run, {"step": run.step, "eval": "final", **final})
        export(run)
        if runtime.is_main:
            record: dict[str, Any] = {"final": final, "step": run.step}
            if fixed:
                record["cache"] = {"path": str(data), "fingerprint": cache_fingerprint(data)}
            if rollouts is not None:
                record["onpolicy_round"] = rollouts.round
                record["onpolicy"] = [{"path": str(f), "fingerprint": fp, "round": int(m.rollouts["round"]),  # type: ignore[index]
                                       "lag": lag}
                                      for f, fp, m, lag in zip(rollouts.folders, rollouts.fingerprints, rollouts.metas,
                                                               rollouts.lags)]
            write_json(out / FINISHED, record)
        runtime.barrier()
    finally:
        run.stream.close()
    return final
