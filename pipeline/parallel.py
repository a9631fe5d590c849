"""Data parallelism for stage two with torch's own tools: DDP (a full replica per rank) or FSDP2
(`fully_shard` per decoder layer and the root: parameters, gradients and AdamW states sharded over ranks).

The model is built on the meta device and materialised where it will train: under FSDP each rank holds
only its shard from the start, and `Gemma2.init_weights` draws every tensor whole on each rank from the
one seeded generator and keeps its own rows (DTensor's implicit replication slices a full tensor into the
local shard without communication), so the weights are the same whatever the sharding or world size. One
process is neither: there is nothing to shard or average.

Everything a trainer does differently under the two lives here: wrapping, gradient sync during
accumulation, the global gradient norm, local views of sharded tensors, and gathering full tensors for
the export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.runtime import Runtime

SHARDINGS = ("ddp", "fsdp")


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


@contextlib.contextmanager
def replicated_inputs() -> Iterator[None]:
    """Plain tensors mixed with DTensors count as replicated: `p.copy_(whole)` keeps the local shard."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


def wrap(module: nn.Module, layers: nn.ModuleList, sharding: str, runtime: Runtime, init: Callable[[], None],
         compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Materialises `module` (built on the meta device) on the runtime's device, `init` filling its
    parameters, and wraps it for data parallelism. FSDP shards each of `layers` and the root (whose own
    parameters, the tied embedding and the final norm, are gathered for the whole forward and backward).

    With a `compute_dtype` (the autocast dtype), FSDP gathers the layers' weights in it (the root's stay
    float32, see below): the float32 shards stay the master copy, gradients are reduced in float32, the
    residual stream stays float32 (inputs are not cast) and the layers compute what autocast would. Without
    it, autocast's cache of bf16 weight copies would hold every layer's gathered weights until the end of the
    forward: 2 bytes per parameter of the whole model on every rank."""
    if sharding not in SHARDINGS:
        raise PipelineError(f"--sharding {sharding!r}: use {' or '.join(SHARDINGS)}")
    if runtime.world > 1 and sharding == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        # The root (tied embedding, final norm) is gathered in float32: with the policy too, its bf16 gradient
        # moved a bf16 run on 2 ranks 6× further from the one-process run than DDP (0.059 against 0.0099,
        # tests/stages/test_fsdp.py's bf16 case); float32 costs V × H × 2 more bytes per GPU (1.1 GiB for the 2B).
        fully_shard(module)
        module.to_empty(device=runtime.device)
        with replicated_inputs():
            init()
        return module
    module.to_empty(device=runtime.device)
    init()
    if runtime.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Gradients as views of the communication buckets: no second copy of every gradient.
    return DistributedDataParallel(module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The module inside DDP (FSDP2 wraps in place)."""
    return getattr(wrapped, "module", wrapped)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """DDP all-reduces only on the last micro-batch of a step. FSDP reduce-scatters every micro-batch:
    holding unsharded gradients across micro-batches would cost a full model of float32 per rank."""
    no_sync = getattr(wrapped, "no_sync", None)
    if enabled or no_sync is None:
        yield
    else:
        with no_sync():
            yield


def grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (over every shard), a float32 scalar."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, foreach=False)
    return full(norm).float()


def scale_grads_(parameters: list[nn.Parameter], factor: torch.Tensor) -> None:
    """Multiplies every gradient (its local shard under FSDP) by a scalar, in place."""
    for p in parameters:
        if p.grad is not None:
            local(p.grad).mul_(factor.to(local(p.grad).device))


def clip_(parameters: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm.to(parameters[0].device), foreach=False)


def all_reduce_sum(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world > 1:
        torch.distributed.all_reduce(t)
    return t


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every rank when it is true on one (decisions that must be the same everywhere)."""
    if runtime.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=runtime.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def full_tensors(named: list[tuple[str, nn.Parameter]], runtime: Runtime) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, whole tensor on the CPU) per parameter, one at a time, on rank 0 (None elsewhere). Every rank
    must run through it: gathering a shard is a collective."""
    for name, p in named:
        whole = full(p.detach())
        yield name, (whole.to("cpu", copy=True).contiguous() if runtime.is_main else None)
        del whole
