"""The process's place among its peers, from accelerate (works under `accelerate launch` and torchrun,
one host or many; a plain `python` is one process)."""

from __future__ import annotations

import torch

from pipeline.capture import Dist


def current() -> tuple[Dist, torch.device]:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device if state.device.type == "cuda" else torch.device("cpu")
    return Dist(state.process_index, state.num_processes, state.wait_for_everyone), device
