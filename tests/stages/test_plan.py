"""`make plan`: plan.json's schema, exit 2 with one line naming the setting, a teacher from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.model import preset
from stages import plan as stage


def teacher_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset(name).to_hf()))
    return folder


def test_plan_json_has_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = teacher_dir(tmp_path, "demo-teacher")
    stage.main(["--work", str(tmp_path), "--teacher", str(teacher), "--student", "demo-student-s", "--seq-len", "256",
                "--capture-batch", "2", "--batch-size", "2", "--world", "2", "--sharding", "fsdp", "--gpu", "l40s-48gb"])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan) == {"gpu", "capture", "students"}
    assert plan["gpu"] == {"name": "l40s-48gb", "memory_bytes": 48 * 2**30}
    assert set(plan["capture"]) == {"weights_bytes", "head_peak_bytes", "peak_bytes", "fits", "flops_per_token",
                                    "tokens_per_s", "gpu_hours", "cache_bytes"}
    student = plan["students"]["demo-student-s"]
    assert set(student) == {"sharding", "world", "params", "peak_bytes", "fits", "flops_per_token", "tokens_per_s",
                            "gpu_hours"}
    assert student["sharding"] == "fsdp" and student["world"] == 2 and student["fits"] and plan["capture"]["fits"]
    # the student takes the teacher's vocabulary
    assert student["params"] == preset("demo-student-s", vocab_size=4096).num_parameters()
    assert "traced on fake tensors, not run" in capsys.readouterr().out


def test_refusal_names_the_setting_and_a_value_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo teacher on a card just big enough for a small head chunk: exit 2, one line, HEAD_CHUNK ≤ a value
    that the plan then accepts; plan.json is written with fits false."""
    teacher = teacher_dir(tmp_path, "demo-teacher")
    args = ["--work", str(tmp_path), "--teacher", str(teacher), "--seq-len", "1024", "--capture-batch", "8",
            "--gpu-memory-gb", "2.1"]
    with pytest.raises(SystemExit) as e:
        stage.run(stage.main, [*args, "--head-chunk", "8192"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HEAD_CHUNK=8192 needs" in err and "use HEAD_CHUNK ≤ " in err
    assert json.loads((tmp_path / "plan.json").read_text())["capture"]["fits"] is False
    fits = err.rsplit("HEAD_CHUNK ≤ ", 1)[1].split()[0]
    stage.main([*args, "--head-chunk", fits])
    assert json.loads((tmp_path / "plan.json").read_text())["capture"]["fits"] is True


def test_nothing_to_plan_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        stage.run(stage.main, ["--work", str(tmp_path)])
    assert e.value.code == 2 and "nothing to plan" in capsys.readouterr().err


def test_recipe_config_sets_the_student_step(tmp_path: Path) -> None:
    """CONFIG's [train_student] table (the 9B recipe: FSDP, batch 1, checkpointing, bf16) sizes the plan."""
    root = Path(__file__).resolve().parents[2]
    args = stage.parse(["--work", str(tmp_path), "--config", str(root / "configs" / "gemma-2-9b.toml"),
                        "--student", "gemma-2-9b"])
    assert (args.sharding, args.batch_size, args.gradient_checkpointing, args.precision) == ("fsdp", 1, True, "bf16")
    assert stage.parse(["--work", str(tmp_path), "--config", str(root / "configs" / "gemma-2-9b.toml"),
                        "--sharding", "ddp"]).sharding == "ddp"
