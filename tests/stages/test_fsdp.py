"""`python -m stages.train_student --sharding fsdp` under torchrun, on the CPU with gloo: two FSDP processes
train what one process trains at the same global batch (weights ≤ 1e-4, the same validation metrics through
the sharded model); FSDP and DDP runs killed on 2 processes resume on 1 at the same global batch to the
uninterrupted weights (≤ 1e-4), from DCP checkpoints that hold one shard per rank under FSDP; another global
batch is refused in one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.capture import CaptureConfig, capture
from pipeline.topk import TopKConfig
from tests.stages.helpers import ENV, ROOT, stage

COMMON = ("--student", "debug", "--lr", "1e-2", "--warmup-steps", "3", "--log-every", "1", "--precision", "fp32",
          "--save-every-minutes", "0")


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "logits"
    capture(work / "teacher", work / "tokens", out, CaptureConfig(TopKConfig(topk=8, samples=4)))
    return out


def torchrun(nproc: int, *args: object) -> list[str]:
    with socket.socket() as s:  # a free port for each launch: a killed launcher's port may linger
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "stages.train_student", *map(str, args)]


def launch(nproc: int, *args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun(nproc, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its ranks in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def weights(folder):
    return load_file(folder / "model.safetensors")


def final_metrics(folder):
    return json.loads((folder / "finished.json").read_text())["final"]


def test_two_fsdp_processes_match_one_at_the_same_global_batch(cache, tmp_path):
    args = ("--cache", cache, *COMMON, "--max-tokens", 16 * 8 * 12, "--eval-windows", 0)
    stage("train_student", "--students", tmp_path / "one", *args, "--batch-size", 8)
    # Two ranks of 2 windows, 2 micro-steps: the same 8 windows a step; layers recomputed in the backward.
    launch(2, "--students", tmp_path / "two", *args, "--sharding", "fsdp", "--batch-size", 2, "--grad-accum", 2,
           "--gradient-checkpointing")
    a, b = weights(tmp_path / "one" / "debug"), weights(tmp_path / "two" / "debug")
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # the export gathered whole tensors
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4
    one, two = final_metrics(tmp_path / "one" / "debug"), final_metrics(tmp_path / "two" / "debug")
    assert two["val_tokens"] == one["val_tokens"]  # every val window once, though the ranks' shares differ
    for key in ("val_ce", "kl_to_teacher", "top1_agreement", "ece"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    run = json.loads((tmp_path / "two" / "debug" / "run_config.json").read_text())
    assert run["world_size"] == 2 and run["train"]["sharding"] == "fsdp"


def kill_at_step(cmd: list[str], pointer: Path, step: int) -> dict:
    """Starts `cmd`, SIGKILLs it (the launcher and every rank) once a checkpoint of `step` or later is complete,
    and returns what latest.json names."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.is_file() and json.loads(pointer.read_text())["step"] >= step):
        time.sleep(0.01)
    kill_tree(proc.pid)  # the launcher and both ranks, mid-step or mid-checkpoint
    proc.wait()
    latest = json.loads(pointer.read_text())
    time.sleep(2)
    assert json.loads(pointer.read_text()) == latest, "a rank outlived the kill"
    return latest


def shard_shapes(folder: Path, name: str) -> list[list[int]]:
    """The shape of `name` in each safetensors file of a checkpoint folder that holds it (headers only)."""
    shapes = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                shapes.append(f.get_slice(name).get_shape())
    return shapes


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_a_run_killed_on_two_processes_resumes_on_one_to_the_same_weights(cache, tmp_path, sharding):
    """Killed on 2 processes, resumed on 1 at the same global batch (--batch-tokens: 2 × 2 windows then 1 × 2
    windows × 2 micro-steps): the weights of the uninterrupted 2-process run within float32 reduction order.
    The FSDP checkpoint holds one shard of each tensor per rank (DCP, safetensors); under DDP the replicas are
    written once, spread over the ranks."""
    args = ("--cache", cache, *COMMON, "--sharding", sharding, "--max-tokens", 16 * 4 * 40, "--batch-size", 2,
            "--batch-tokens", 16 * 4, "--save-every", 1, "--eval-windows", 0)
    launch(2, "--students", tmp_path / "whole", *args)
    out = tmp_path / "killed" / "debug"
    step = kill_at_step(torchrun(2, "--students", tmp_path / "killed", *args), out / "checkpoint" / "latest.json", 3)
    assert not (out / "finished.json").exists(), "the run finished before it was killed; the test proves nothing"
    folder = out / "checkpoint" / step["folder"]
    vocab = weights(tmp_path / "whole" / "debug")["model.embed_tokens.weight"].shape[0]
    embed = shard_shapes(folder, "param/model.embed_tokens.weight")
    if sharding == "fsdp":
        assert sorted(s[0] for s in embed) == [vocab // 2, vocab - vocab // 2]  # one shard per rank
        assert len(shard_shapes(folder, "exp_avg/model.layers.0.mlp.up_proj.weight")) == 2
    else:
        assert [s[0] for s in embed] == [vocab]  # the replica once
    assert not list(folder.glob(".metadata")) and not list(folder.glob("*.distcp"))  # nothing pickled

    refused = stage("train_student", "--students", tmp_path / "killed", *args[:-4], "--batch-tokens", 16 * 8,
                    "--save-every", 1, check=False)  # another global batch: refused before anything is touched
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: ") and "64 tokens a step, this one 128" in refused.stderr

    # One process, eval and save cadence changed (they do not change the trajectory).
    resumed = stage("train_student", "--students", tmp_path / "killed", *args[:-2], "--eval-windows", 8,
                    "--save-every", 5)
    assert "already complete" not in resumed.stdout
    a, b = weights(tmp_path / "whole" / "debug"), weights(out)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    run = json.loads((out / "run_config.json").read_text())
    assert run["world_size"] == 1 and run["train"]["save_every"] == 5
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 41))  # every step logged once across the two sessions


def test_bf16_fsdp_gathers_bf16_layers_and_stays_as_close_to_one_process_as_ddp(cache, tmp_path):
    """Under bf16 FSDP gathers the layers' weights in bf16 (float32 shards and reductions) instead of
    autocast copying them; it must land as near the one-process run as bf16 DDP does."""
    args = ("--cache", cache, *COMMON[:-3], "bf16", *COMMON[-2:], "--max-tokens", 16 * 8 * 12, "--eval-windows", 0)
    stage("train_student", "--students", tmp_path / "one", *args, "--batch-size", 8)
    launch(2, "--students", tmp_path / "fsdp", *args, "--sharding", "fsdp", "--batch-size", 4)
    launch(2, "--students", tmp_path / "ddp", *args, "--sharding", "ddp", "--batch-size", 4)
    one = weights(tmp_path / "one" / "debug")
    gap = {name: max((one[k] - w[k]).abs().max().item() for k in one)
           for name, w in (("fsdp", weights(tmp_path / "fsdp" / "debug")), ("ddp", weights(tmp_path / "ddp" / "debug")))}
    assert gap["ddp"] < 0.05 and gap["fsdp"] < 2 * gap["ddp"]
    ce = {n: final_metrics(tmp_path / n / "debug")["val_ce"] for n in ("one", "fsdp", "ddp")}
    assert abs(ce["fsdp"] - ce["one"]) < 0.02 and abs(ce["ddp"] - ce["one"]) < 0.02
