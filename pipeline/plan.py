"""`make plan`: the real stages traced at full shape on fake tensors, so a job's memory per GPU, FLOPs per
token and GPU-hours are known before a GPU is rented.

What is traced, on `FakeTensorMode` tensors (shapes and dtypes, no data, no compute):
  capture  `pipeline.topk`'s device work for one `CAPTURE_BATCH` of the teacher (forward, chunked head,
           targets) in the capture dtype, the head on its CUDA path (a bf16 matmul writing float32).
  student  one optimizer step of `pipeline.train` (`StudentWithLoss` forward with the chunked loss, backward,
           gradient clipping, AdamW), with the recipe's gradient checkpointing and autocast, the AdamW states
           already there (a steady-state step), the loss's matmuls on their CUDA path too.
The tensors are fake *CPU* tensors: in a CPU-only torch build fake CUDA tensors abort at indexing and in
autograd (both ask the CUDA runtime for a device guard). So the CUDA-only choices are made explicitly
(`cuda_head`, `fused_attention`), and the student runs under CPU autocast, which gives every op of this
model the dtype CUDA autocast gives it (matmuls in bf16; norms, softmax and the loss in float32 by the code
itself).

Memory is counted by `MemoryTracer`, a dispatch mode that sees every tensor storage the code allocates and
frees (weak references: a storage counts while something holds it). Every allocation is logged, so one
trace yields any weighting of its parts afterwards; that is how data parallelism is costed:
  DDP      the traced step, plus the float32 gradient buckets for the whole run (`gradient_as_bucket_view`:
           the gradients live in them from the first step on);
  FSDP2    parameters, gradients and AdamW states divided by WORLD; the bf16 weight copies autocast makes
           replaced by FSDP's gathers: the root's parameters (the tied embedding, in float32, see
           pipeline/parallel.py) for the whole step, two layers at once (the one computing and the one
           prefetched) and one layer's float32 gradient for the reduce-scatter. Collectives' own buffers
           (NCCL) are in the reserve, not traced.
Attention is accounted as the fused kernel the GPU runs (flex attention, compiled): it keeps q, k, v, the
output and a float32 log-sum-exp per query for the backward, never the [T × T] scores; its FLOPs are counted
from the mask (causal, sliding window) at 4·d multiply-adds per allowed pair forward, 2.5× that backward.
Compiled flex cannot run on fake tensors, so this is the one part of the step that is modelled, not traced.

Validated in tests/pipeline/test_plan.py: fake against real tensors, against a process's resident memory,
and DDP / FSDP against two gloo ranks' resident memory (within 15%).

`fits`: the traced peak plus 5% (the caching allocator's slack) plus `RESERVE` (CUDA context, cuBLAS and
NCCL workspaces) within the card's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.errors import PipelineError
from pipeline.model import AttentionMasks, Gemma2, Gemma2Config
from pipeline.settings import setting

GIB = 2**30
RESERVE = 2 * GIB  # CUDA context, cuBLAS and NCCL workspaces
FRAGMENTATION = 1.05  # the caching allocator's slack over the live bytes
# Named cards: memory (GiB, as the cards are sold: an "80 GB" H100 has 80 GiB) and the dense bf16 peak
# (TFLOP/s, the vendors' datasheets without sparsity) that MFU is a fraction of.
GPUS: dict[str, tuple[float, float]] = {
    "h100-80gb": (80.0, 989.0),
    "h200-141gb": (141.0, 989.0),
    "a100-80gb": (80.0, 312.0),
    "a100-40gb": (40.0, 312.0),
    "l40s-48gb": (48.0, 362.0),
}
# Target bytes per token of the cache (v2 encoding), measured at V = 256,000 by benchmarks/storage.py (README,
# Storage arithmetic), by (K, N, 8-bit log-probs); other settings are estimated from these rows.
CACHE_BYTES: dict[tuple[int, int, bool], float] = {
    (64, 0, False): 152.5, (64, 16, False): 181.6, (8, 16, False): 56.0, (0, 40, False): 25.1, (0, 80, False): 37.7,
    (64, 0, True): 120.1, (64, 16, True): 149.2, (8, 16, True): 49.6, (0, 40, True): 25.1, (0, 80, True): 37.7,
}


@dataclass(frozen=True)
class PlanConfig:
    world: int = setting(8, "GPUs of the planned job")
    gpu: str = setting("h100-80gb", "the card: " + ", ".join(GPUS) + " (or --gpu-memory-gb)", choices=tuple(GPUS))
    gpu_memory_gb: float = setting(0.0, "the card's memory in GiB, for a card not in the table (0: --gpu's)")
    mfu: float = setting(0.4, "model FLOPs utilisation assumed for time and GPU-hours (of the card's dense bf16 peak)")
    plan_tokens: int = setting(10_000_000_000, "corpus tokens to cost (time, GPU-hours, cache size)")
    seq_len: int = setting(4096, "tokens per window (SEQ_LEN of the token shards)")

    def __post_init__(self) -> None:
        if self.world < 1:
            raise PipelineError(f"--world {self.world}: must be >= 1")
        if self.gpu not in GPUS:
            raise PipelineError(f"--gpu {self.gpu!r}: use one of {', '.join(GPUS)} or --gpu-memory-gb")
        if not 0 < self.mfu <= 1:
            raise PipelineError(f"--mfu {self.mfu}: must be within (0, 1]")
        if self.gpu_memory_gb < 0 or self.seq_len < 1 or self.plan_tokens < 0:
            raise PipelineError("--gpu-memory-gb, --seq-len and --plan-tokens must be positive")

    @property
    def memory_bytes(self) -> int:
        return int((self.gpu_memory_gb or GPUS[self.gpu][0]) * GIB)

    @property
    def gpu_name(self) -> str:
        return f"custom-{self.gpu_memory_gb:g}gb" if self.gpu_memory_gb else self.gpu

    @property
    def peak_flops(self) -> float:
        return GPUS[self.gpu][1] * 1e12


# --- the tracer ---------------------------------------------------------------------------------------


class MemoryTracer(TorchDispatchMode):
    """Counts the bytes of every live tensor storage created under it (and of those `track`ed), logging each
    allocation and free so that `peak` can weigh kinds of storage differently afterwards. Works on real and
    fake tensors. Stands in for data-dependent shapes, which fake tensors cannot have: a boolean mask index
    is taken as all true (every position trains: the worst case)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = WeakIdKeyDictionary()
        self.sizes: list[int] = []
        self.events: list[int] = []  # +(id + 1) allocated, -(id + 1) freed
        self.casts: set[int] = set()  # storages made by casting a tracked parameter (autocast's weight copies)
        self.params: set[int] = set()
        self.flops = 0  # matmul FLOPs of the ops run under it

    def track(self, t: torch.Tensor, param: bool = False) -> int:
        st = t.untyped_storage()
        sid = self.ids.get(st)
        if sid is None:
            sid = len(self.sizes)
            self.ids[st] = sid
            self.sizes.append(st.nbytes())
            self.events.append(sid + 1)
            weakref.finalize(st, self.events.append, -(sid + 1))
        if param:
            self.params.add(sid)
        return sid

    def id_of(self, t: torch.Tensor) -> int | None:
        return self.ids.get(t.untyped_storage())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            args = (args[0], [torch.arange(i.numel(), device=i.device) if isinstance(i, torch.Tensor)
                              and i.dtype == torch.bool else i for i in args[1]])
        elif func is torch.ops.aten.nonzero.default:
            return torch.arange(args[0].numel(), device=args[0].device)[:, None].expand(-1, args[0].dim()).clone()
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:  # FlopCounterMode's formulas (that mode itself defeats checkpointing's frees)
            self.flops += formula(*args, **kwargs, out_val=out)
        source = self.id_of(args[0]) if func is torch.ops.aten._to_copy.default and args else None
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # Views and in-place results share an input's storage: nothing was allocated.
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage()._cdata not in inputs:
                sid = self.track(t)
                if source is not None and source in self.params and sid != source:
                    self.casts.add(sid)
        return out

    def live(self) -> int:
        return self.peak(upto=len(self.events), current=True)

    def mark(self) -> int:
        """A point in the log, to take peaks over a part of the trace."""
        return len(self.events)

    def peak(self, weight: Callable[[int], float] | None = None, start: int = 0, upto: int | None = None,
             current: bool = False) -> int:
        """The most bytes live at once between two marks, each storage weighted by `weight(id)` (default 1);
        `current`: the bytes live at `upto` instead."""
        upto = len(self.events) if upto is None else upto
        live = best = 0.0
        for i, e in enumerate(self.events[:upto]):
            sid = abs(e) - 1
            w = 1.0 if weight is None else weight(sid)
            live += w * self.sizes[sid] * (1 if e > 0 else -1)
            if i >= start:
                best = max(best, live)
        return int(live if current else max(best, live))


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flex, compiled) allocates: the output and a float32 log-sum-exp per
    query, q, k, v and both kept for the backward, which makes dq, dk, dv and a per-query float32 sum."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[no-untyped-def,override]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        q, k, v, out, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del delta
        return dq, dk, dv


def attention_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs a causal row of `length` attends, within `window` keys when sliding."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


@dataclass
class AttentionCount:
    flops: float = 0.0


@contextlib.contextmanager
def fused_attention(count: AttentionCount) -> Iterator[None]:
    """Attention as the GPU's fused kernel for the duration: no [T × T] scores, masks the size of a block
    mask, FLOPs counted from the mask into `count` (forward; the backward's 2.5× is added by the hook)."""
    attend, get = AttentionMasks.attend, AttentionMasks.get

    def fused_attend(self: AttentionMasks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     cap: float | None, window: int | None) -> torch.Tensor:
        b, nh, t, d = q.shape
        forward = 4.0 * b * nh * d * attention_pairs(t, window)
        count.flops += forward
        out = FusedAttention.apply(q, k, v)
        if out.requires_grad:
            out.register_hook(lambda g: count.__setattr__("flops", count.flops + 2.5 * forward) or g)
        return out

    def block_mask(self: AttentionMasks, window: int | None) -> Any:
        if window not in self._built:  # a BlockMask's index tensors: about 4 × B × (T/128)² int32
            rows = 1 if self.doc_ids is None else self.doc_ids.shape[0]
            blocks = -(-self.length // 128)
            self._built[window] = torch.empty(4, rows, blocks, blocks, dtype=torch.int32, device=self.device)
        return self._built[window]

    AttentionMasks.attend, AttentionMasks.get = fused_attend, block_mask  # type: ignore[method-assign]
    try:
        yield
    finally:
        AttentionMasks.attend, AttentionMasks.get = attend, get  # type: ignore[method-assign]


def materialize(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Gives a model built on the meta device empty parameters on `device` (fake ones under FakeTensorMode,
    where `to_empty` cannot swap a meta parameter for a fake one)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                         requires_grad=p.requires_grad)


@contextlib.contextmanager
def fake_mode() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


# --- capture ------------------------------------------------------------------------------------------


@dataclass
class CaptureTrace:
    weights_bytes: int
    forward_peak: int  # the most live during the forward (weights included)
    hidden_bytes: int  # live when the head starts (weights, hidden states, labels)
    head_peaks: dict[int, int]  # head chunk → the most the head's own buffers take at once
    flops_per_token: float
    seconds: float

    def peak(self, chunk: int) -> int:
        return max(self.forward_peak, self.hidden_bytes + self.head_peaks[chunk])


@contextlib.contextmanager
def cuda_head() -> Iterator[None]:
    """The CUDA path of the head and the loss (a bf16 matmul writing float32) on a trace's fake CPU tensors."""
    from pipeline import model

    added = "cpu" not in model.FLOAT32_MM_DEVICES
    model.FLOAT32_MM_DEVICES.add("cpu")
    try:
        yield
    finally:
        if added:
            model.FLOAT32_MM_DEVICES.discard("cpu")


def trace_capture(cfg: Gemma2Config, seq_len: int, batch: int, topk: Any, dtype: torch.dtype,
                  chunks: list[int], device: str = "cpu", gpu_head: bool = True, fused: bool = True,
                  fake: bool = True) -> CaptureTrace:
    """One capture batch of the teacher: `pipeline.topk.teacher_hidden`, then `head_chunks` at each head
    chunk in `chunks` (the forward is traced once, the head once per chunk). Fake CPU tensors: fake CUDA
    ones fail in a CPU-only torch build (indexing asks for a CUDA device guard); `gpu_head` makes the head
    take its CUDA path on them. `fused=False` traces the CPU's math attention instead (what runs there);
    `fake=False` runs it on real tensors (what the tests hold the fake trace to)."""
    from pipeline.topk import head_chunks, teacher_hidden

    start = time.perf_counter()
    count = AttentionCount()
    head = cuda_head() if gpu_head else contextlib.nullcontext()
    attention = fused_attention(count) if fused else contextlib.nullcontext()
    with fake_mode() if fake else contextlib.nullcontext(), attention, torch.no_grad(), head:
        with torch.device("meta"):
            model = Gemma2(cfg)
        materialize(model, device, dtype)
        if not fake:
            model.init_weights(0)
        model.eval()
        tracer = MemoryTracer()
        for p in model.parameters():
            tracer.track(p, param=True)
        weights = tracer.live()
        ids = torch.zeros(batch, seq_len + 1, dtype=torch.long, device=device)
        with tracer:
            hidden, labels, _ = teacher_hidden(model, ids, None)
            # The draws' uniforms, made on the host and moved to the GPU a chunk at a time (float64).
            uniforms = torch.zeros(hidden.shape[0], topk.samples, dtype=torch.float64) if topk.samples else None
        forward_flops = tracer.flops + count.flops
        forward_peak = tracer.peak()
        hidden_bytes = tracer.live()
        head_peaks, head_flops = {}, 0.0
        for chunk in chunks:
            mark, before = tracer.mark(), tracer.flops
            with tracer:
                out = head_chunks(model, hidden, labels, uniforms, dataclasses.replace(topk, head_chunk=chunk))
                del out
            head_peaks[chunk] = tracer.peak(start=mark) - hidden_bytes
            head_flops = head_flops or tracer.flops - before
    tokens = batch * seq_len
    return CaptureTrace(weights, forward_peak, hidden_bytes, head_peaks, (forward_flops + head_flops) / tokens,
                        time.perf_counter() - start)


# --- students -----------------------------------------------------------------------------------------


@dataclass
class StudentTrace:
    params: int
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    world1_peak: int  # the step on one GPU, nothing sharded
    transient: Callable[[bool], int]  # peak without parameters, gradients and states (and without casts)
    gather_bytes: int  # FSDP: the root in float32, two layers in the compute dtype, one layer's float32 gradient
    flops_per_token: float
    seconds: float
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    def peak(self, sharding: str, world: int) -> int:
        persistent = self.param_bytes + self.grad_bytes + self.optim_bytes
        if world == 1:
            return self.world1_peak
        if sharding == "ddp":  # gradients live in DDP's buckets for the whole run
            return self.transient(True) + persistent
        return self.transient(False) + -(-persistent // world) + self.gather_bytes


def trace_student(cfg: Gemma2Config, seq_len: int, batch: int, micro_steps: int, loss: Any, precision: str,
                  checkpointing: bool, columns: dict[str, tuple[tuple[int, ...], torch.dtype]], fused: bool = True,
                  fake: bool = True) -> StudentTrace:
    """One optimizer step of `pipeline.train.StudentWithLoss` as `train_step` runs it (its device work, without
    the reader and the host-side reads of the loss: min(micro_steps, 2)
    micro-batches traced: the later ones repeat the second), after one untraced step that creates AdamW's
    states. `columns`: the cache columns of a batch with their shape per window and dtype. `fused=False`:
    the CPU's kernels (math attention; no float32-output matmuls in the loss) instead of the GPU's;
    `fake=False`: real tensors (what the tests hold the fake trace to)."""
    from pipeline import parallel
    from pipeline.train import StudentWithLoss

    start = time.perf_counter()
    dtype = torch.bfloat16 if precision in ("auto", "bf16") else None
    count = AttentionCount()
    device = "cpu"
    attention = fused_attention(count) if fused else contextlib.nullcontext()
    gpu = cuda_head() if fused else contextlib.nullcontext()
    with fake_mode() if fake else contextlib.nullcontext(), attention, gpu:
        with torch.device("meta"):
            student = StudentWithLoss(Gemma2(cfg), loss)
        materialize(student, device, torch.float32)
        if not fake:
            student.model.init_weights(0)
        student.model.gradient_checkpointing = checkpointing
        student.train()
        params = list(student.model.named_parameters())
        decay = [p for n, p in params if not n.endswith("norm.weight")]
        no_decay = [p for n, p in params if n.endswith("norm.weight")]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay,
                                                                                 "weight_decay": 0.0}],
                                      lr=1e-4, foreach=False)
        for _, p in params:  # the states of a steady-state step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracer = MemoryTracer()
        for _, p in params:
            tracer.track(p, param=True)
        state_ids = {tracer.track(v) for s in optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.dim()}
        batch_cols = {name: torch.zeros((batch, *shape), dtype=dt, device=device) for name, (shape, dt) in
                      columns.items()}
        batch_cols["label_mask"] = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        denominator = torch.ones((), device=device)  # train_step's: each micro-batch's loss is its sum
        traced = min(micro_steps, 2)
        with tracer:
            for micro in range(traced):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    value = student(dict(batch_cols), denominator)
                value.backward()
                del value
                if micro == 0:
                    step_flops = tracer.flops + count.flops
            trainable = [p for _, p in params]
            scale = getattr(parallel, "scale_grads_", None)  # train_step scales the summed gradients to the mean
            if scale is not None:
                scale(trainable, torch.tensor(1.0 / (batch * seq_len * micro_steps), device=device))
            norm = parallel.grad_norm(trainable)
            parallel.clip_(trainable, 1.0, norm)
            optimizer.step()
            grad_ids = {tracer.id_of(p.grad) for p in trainable if p.grad is not None}
            optimizer.zero_grad(set_to_none=True)
    param_ids, casts = set(tracer.params), set(tracer.casts)
    sizes = tracer.sizes
    param_bytes = sum(sizes[i] for i in param_ids)
    grad_bytes = sum(p.numel() * 4 for _, p in params)
    optim_bytes = sum(sizes[i] for i in state_ids)
    persistent = param_ids | state_ids | grad_ids

    def transient(keep_casts: bool) -> int:
        return tracer.peak(lambda i: 0.0 if i in persistent or (not keep_casts and i in casts) else 1.0)

    compute = 2 if dtype is not None else 4
    h = cfg.hidden_size
    root = cfg.vocab_size * h + h
    layer = (cfg.num_parameters() - root) // cfg.num_hidden_layers
    gather = root * 4 + 2 * layer * compute + layer * 4  # the root is gathered in float32 (pipeline/parallel.py)
    return StudentTrace(sum(p.numel() for _, p in params), param_bytes, grad_bytes, optim_bytes, tracer.peak(),
                        transient, gather, step_flops / (batch * seq_len), time.perf_counter() - start,
                        checkpointing)


# --- the plan: capture and students against a card -----------------------------------------------------


@dataclass(frozen=True)
class CaptureJob:
    """Stage one's settings that size it (`make teacher-logits`' flags)."""

    batch: int
    topk: Any  # pipeline.topk.TopKConfig
    dtype: torch.dtype
    q8: bool = False


@dataclass(frozen=True)
class StudentJob:
    """Stage two's settings that size a student's step (`make train-student`'s flags and recipe)."""

    batch: int
    micro_steps: int
    sharding: str
    precision: str
    checkpointing: bool
    loss: Any  # pipeline.losses.LossConfig, target resolved
    topk: int
    samples: int


def cache_bytes_per_token(topk: int, samples: int, q8: bool) -> tuple[float, bool]:
    """Target bytes per token at V = 256,000 and whether it is measured (else estimated from the measured
    rows: 8 bytes a position, 2.24 a top-K entry, 1.82 a draw beside a top K, 0.32 a draw without one)."""
    if (topk, samples, q8) in CACHE_BYTES:
        return CACHE_BYTES[(topk, samples, q8)], True
    per_draw = 1.82 if topk else 0.32
    return 8.0 + (2.24 if not q8 else 1.74) * topk + per_draw * samples, False


def batch_columns(job: StudentJob, seq_len: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The cache columns one window of a batch carries to the GPU for this loss (`schemas.logits.to_torch`'s
    dtypes), label_mask apart."""
    from schemas.logits import MODE_COLUMNS, TORCH_DTYPES

    mode = job.loss.target if job.loss.kind == "kd" else "ce"
    shapes = {"input_ids": (seq_len + 1,), "topk_ids": (seq_len, job.topk), "topk_logprobs": (seq_len, job.topk),
              "tail_mass": (seq_len,), "sample_ids": (seq_len, job.samples), "sample_counts": (seq_len, job.samples)}
    return {c: (shapes[c], TORCH_DTYPES[c]) for c in MODE_COLUMNS[mode] if c != "label_mask"}


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def needed(peak: int) -> int:
    """The card memory a traced peak needs: 5% allocator slack and the reserve."""
    return int(peak * FRAGMENTATION) + RESERVE


def _fits(peak: int, plan: PlanConfig) -> bool:
    return needed(peak) <= plan.memory_bytes


def _needs(what: str, peak: int, plan: PlanConfig) -> str:
    return f"{what} needs {_gib(needed(peak))} GiB (traced {_gib(peak)}, + 5% and {_gib(RESERVE)} reserve) of " \
           f"{_gib(plan.memory_bytes)} on {plan.gpu_name}"


def plan_capture(cfg: Gemma2Config, job: CaptureJob, plan: PlanConfig) -> tuple[dict[str, Any], str | None]:
    """The capture's entry of plan.json, and the one-line refusal (None: it fits)."""
    chunk = job.topk.head_chunk
    trace = trace_capture(cfg, plan.seq_len, job.batch, job.topk, job.dtype, [chunk])
    peak = trace.peak(chunk)
    problem = None
    if not _fits(peak, plan):
        problem = _capture_advice(cfg, job, plan, trace)
    buffer = min(chunk, job.batch * plan.seq_len) * cfg.vocab_size * 4
    per_gpu = plan.mfu * plan.peak_flops / trace.flops_per_token
    per_token, measured = cache_bytes_per_token(job.topk.topk, job.topk.samples, job.q8)
    entry = {
        "params": cfg.num_parameters(), "dtype": str(job.dtype).removeprefix("torch."), "batch": job.batch,
        "head_chunk": chunk, "weights_bytes": trace.weights_bytes, "head_peak_bytes": trace.head_peaks[chunk],
        "head_chunk_buffer_bytes": buffer, "peak_bytes": peak, "fits": problem is None,
        "flops_per_token": trace.flops_per_token, "tokens_per_s": per_gpu * plan.world,
        "gpu_hours": plan.plan_tokens / per_gpu / 3600, "cache_bytes": int(per_token * plan.plan_tokens),
        "cache_bytes_per_token": per_token, "cache_bytes_measured": measured, "trace_s": round(trace.seconds, 1),
    }
    return entry, problem


def _capture_advice(cfg: Gemma2Config, job: CaptureJob, plan: PlanConfig, trace: CaptureTrace) -> str:
    chunk = job.topk.head_chunk
    head = f"HEAD_CHUNK={chunk}"
    if not _fits(trace.weights_bytes, plan):
        return f"{_needs('the teacher weights alone', trace.weights_bytes, plan)}: use a larger card (GPU=h200-141gb)"
    if _fits(trace.forward_peak, plan):
        smaller = [c for c in (chunk >> i for i in range(1, 12)) if c >= 512]
        retrace = trace_capture(cfg, plan.seq_len, job.batch, job.topk, job.dtype, smaller)
        for c in smaller:
            if _fits(retrace.peak(c), plan):
                return f"{_needs(head, trace.peak(chunk), plan)}: use HEAD_CHUNK ≤ {c}"
    batch = job.batch
    while batch > 1:
        batch //= 2
        small = trace_capture(cfg, plan.seq_len, batch, job.topk, job.dtype, [chunk])
        if _fits(small.peak(chunk), plan):
            return f"{_needs(f'CAPTURE_BATCH={job.batch}', trace.peak(chunk), plan)}: use CAPTURE_BATCH ≤ {batch}"
    return f"{_needs(f'CAPTURE_BATCH=1 {head}', trace.peak(chunk), plan)}: use a larger card (GPU=h200-141gb)"


def plan_student(cfg: Gemma2Config, job: StudentJob, plan: PlanConfig) -> tuple[dict[str, Any], str | None]:
    """A student's entry of plan.json, and the one-line refusal (None: it fits)."""
    columns = batch_columns(job, plan.seq_len)
    trace = trace_student(cfg, plan.seq_len, job.batch, job.micro_steps, job.loss, job.precision, job.checkpointing,
                          columns)
    sharding = job.sharding if plan.world > 1 else "none"
    peak = trace.peak(job.sharding, plan.world)
    problem = None
    if not _fits(peak, plan):
        problem = _student_advice(cfg, job, plan, trace, columns)
    per_gpu = plan.mfu * plan.peak_flops / trace.flops_per_token
    entry = {
        "sharding": sharding, "world": plan.world, "params": trace.params, "batch": job.batch,
        "gradient_checkpointing": job.checkpointing, "precision": job.precision, "peak_bytes": peak,
        "state_bytes": trace.param_bytes + trace.grad_bytes + trace.optim_bytes, "fits": problem is None,
        "flops_per_token": trace.flops_per_token, "tokens_per_s": per_gpu * plan.world,
        "gpu_hours": plan.plan_tokens / per_gpu / 3600, "trace_s": round(trace.seconds, 1),
        "peak_bytes_by_sharding": {"ddp": trace.peak("ddp", plan.world), "fsdp": trace.peak("fsdp", plan.world)},
    }
    return entry, problem


def _student_advice(cfg: Gemma2Config, job: StudentJob, plan: PlanConfig, trace: StudentTrace,
                    columns: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    what = f"SHARDING={job.sharding} WORLD={plan.world} BATCH_SIZE={job.batch}"
    peak = trace.peak(job.sharding, plan.world)
    if plan.world > 1 and job.sharding == "ddp" and _fits(trace.peak("fsdp", plan.world), plan):
        return f"{_needs(what, peak, plan)}: use SHARDING=fsdp ({_gib(trace.peak('fsdp', plan.world))} GiB a GPU)"
    for world in (plan.world * 2, plan.world * 4, plan.world * 8):
        if job.sharding == "fsdp" or plan.world == 1:
            if _fits(trace.peak("fsdp", world), plan) and world <= 64:
                return f"{_needs(what, peak, plan)}: use SHARDING=fsdp WORLD ≥ {world}"
    batch = job.batch
    while batch > 1:
        batch //= 2
        small = trace_student(cfg, plan.seq_len, batch, job.micro_steps, job.loss, job.precision, job.checkpointing,
                              columns)
        if _fits(small.peak(job.sharding, plan.world), plan):
            return f"{_needs(what, peak, plan)}: use BATCH_SIZE ≤ {batch} (and GRAD_ACCUM or BATCH_TOKENS for the step)"
    if not job.checkpointing:
        return f"{_needs(what, peak, plan)}: set gradient_checkpointing = true in the CONFIG's [train_student]"
    return f"{_needs(what, peak, plan)}: use a larger card (GPU=h200-141gb) or more GPUs under SHARDING=fsdp"


def table(result: dict[str, Any]) -> str:
    """The plan as text: one line per job."""
    gpu = result["gpu"]
    lines = [f"plan on {gpu['world']} × {gpu['name']} ({_gib(gpu['memory_bytes'])} GiB, {_gib(RESERVE)} reserved; "
             f"{gpu['peak_tflops']:g} TFLOP/s dense bf16 at MFU {gpu['mfu']:g}); {result['tokens']:,} tokens; "
             "traced on fake tensors, not run",
             f"{'job':<28} {'peak GiB':>9} {'fits':>5} {'GFLOP/token':>12} {'tokens/s':>12} {'GPU-hours':>10}  notes"]
    cap = result.get("capture")
    if cap:
        notes = (f"weights {_gib(cap['weights_bytes'])} GiB, head {_gib(cap['head_peak_bytes'])} GiB = "
                 f"{cap['head_peak_bytes'] / cap['head_chunk_buffer_bytes']:.2f} × one float32 chunk "
                 f"({cap['head_chunk']} × V); cache {cap['cache_bytes'] / 1e12:.1f} TB "
                 f"({cap['cache_bytes_per_token']:.1f} B/token, {'measured' if cap['cache_bytes_measured'] else 'est.'})")
        lines.append(f"{'capture ' + result['teacher']:<28} {_gib(cap['peak_bytes']):>9} {str(cap['fits']):>5} "
                     f"{cap['flops_per_token'] / 1e9:>12.1f} {cap['tokens_per_s']:>12,.0f} {cap['gpu_hours']:>10,.0f}  "
                     + notes)
    for name, s in result["students"].items():
        by = s["peak_bytes_by_sharding"]
        notes = (f"{s['sharding']}, batch {s['batch']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; "
                 f"DDP {_gib(by['ddp'])} / FSDP {_gib(by['fsdp'])} GiB")
        lines.append(f"{'student ' + name:<28} {_gib(s['peak_bytes']):>9} {str(s['fits']):>5} "
                     f"{s['flops_per_token'] / 1e9:>12.1f} {s['tokens_per_s']:>12,.0f} {s['gpu_hours']:>10,.0f}  {notes}")
    lines.append("attention: accounted as the fused flex kernel (no [T × T] scores), not traced; DDP/FSDP: one rank's "
                 "traced step with the states sharded and FSDP's gathers added (pipeline/plan.py)")
    return "\n".join(lines)


def make_plan(plan: PlanConfig, teacher: tuple[str, Gemma2Config] | None, capture: CaptureJob | None,
              students: list[tuple[str, Gemma2Config]], job: StudentJob | None) -> tuple[dict[str, Any], list[str]]:
    """plan.json's content and the refusals (empty: everything fits)."""
    result: dict[str, Any] = {
        "gpu": {"name": plan.gpu_name, "memory_bytes": plan.memory_bytes, "reserve_bytes": RESERVE,
                "world": plan.world, "peak_tflops": GPUS[plan.gpu][1], "mfu": plan.mfu},
        "tokens": plan.plan_tokens, "seq_len": plan.seq_len, "traced": "fake tensors, not run",
        "attention": "fused flex kernel accounted (q, k, v, output, float32 log-sum-exp), not traced",
    }
    problems = []
    if teacher is not None and capture is not None:
        result["teacher"] = teacher[0]
        result["capture"], problem = plan_capture(teacher[1], capture, plan)
        if problem:
            problems.append(f"capture: {problem}")
    result["students"] = {}
    for name, cfg in students:
        assert job is not None
        result["students"][name], problem = plan_student(cfg, job, plan)
        if problem:
            problems.append(f"{name}: {problem}")
    return result, problems


CAPTURE_KEYS = ("weights_bytes", "head_peak_bytes", "peak_bytes", "fits", "flops_per_token", "tokens_per_s",
                "gpu_hours", "cache_bytes")
STUDENT_KEYS = ("sharding", "world", "params", "peak_bytes", "fits", "flops_per_token", "tokens_per_s", "gpu_hours")


def plan_json(result: dict[str, Any]) -> dict[str, Any]:
    """What plan.json holds: the documented keys only (the table shows the rest)."""
    cap = result.get("capture")
    return {"gpu": {"name": result["gpu"]["name"], "memory_bytes": result["gpu"]["memory_bytes"]},
            "capture": None if cap is None else {k: cap[k] for k in CAPTURE_KEYS},
            "students": {n: {k: s[k] for k in STUDENT_KEYS} for n, s in result["students"].items()}}


# --- the real stages' check before they load weights on a GPU -------------------------------------------


def device_plan(device: torch.device, world: int) -> PlanConfig | None:
    """The plan of this GPU (its total memory), or None off CUDA: a CPU run is not checked."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return PlanConfig(world=world, gpu_memory_gb=total / GIB)


def check_capture(teacher: Gemma2Config, seq_len: int, batch: int, topk: Any, dtype: torch.dtype,
                  plan: PlanConfig | None) -> None:
    """`make teacher-logits`' check before the teacher's weights are loaded: refuses a capture that would not
    fit this GPU with the plan's one line. Nothing on the CPU (`plan` None)."""
    if plan is None:
        return
    entry, problem = plan_capture(teacher, CaptureJob(batch, topk, dtype), dataclasses.replace(plan, seq_len=seq_len))
    if problem:
        raise PipelineError(f"{problem} (make plan traced this run before loading the teacher)")


def check_student(student: Gemma2Config, seq_len: int, job: StudentJob, plan: PlanConfig | None) -> None:
    """`make train-student`'s check before the student is built: the same for one optimizer step."""
    if plan is None:
        return
    entry, problem = plan_student(student, job, dataclasses.replace(plan, seq_len=seq_len))
    if problem:
        raise PipelineError(f"{problem} (make plan traced this run before building the student)")


def check_training(student: Gemma2Config, loss: Any, cfg: Any, meta: Any, device: torch.device, world: int) -> None:
    """`check_student` from `pipeline.train`'s settings: `cfg` its TrainConfig, `meta` the data's metadata
    (a logit cache's K and N size the batch's columns; token shards have neither), `loss` resolved."""
    plan = device_plan(device, world)
    if plan is None:
        return
    from pipeline.train import grad_accum_for

    job = StudentJob(cfg.batch_size, grad_accum_for(cfg, world, meta.seq_len), cfg.sharding, cfg.precision,
                     cfg.gradient_checkpointing, loss, getattr(meta, "topk", 0), getattr(meta, "samples", 0))
    check_student(student, meta.seq_len, job, plan)


def check_capture_run(teacher: Any, tokens: Any, cfg: Any, device: torch.device) -> None:
    """`check_capture` from `make teacher-logits`' inputs: the teacher's folder (its config.json), the token
    shards (their SEQ_LEN) and its CaptureConfig. Nothing off CUDA."""
    plan = device_plan(device, 1)
    if plan is None:
        return
    from pathlib import Path

    from pipeline.capture import resolve_dtype
    from pipeline.checkpoint import load_config
    from schemas.manifest import read_manifest

    seq_len = read_manifest(Path(tokens) / "train", "tokens").meta.seq_len
    check_capture(load_config(teacher), seq_len, cfg.batch_size, cfg.topk, resolve_dtype(cfg, device), plan)
