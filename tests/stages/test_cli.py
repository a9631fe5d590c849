"""What every stage shares: TOML defaults from the stage's own table with unknown keys rejected, flags
overriding them, required settings that the config may supply."""

from __future__ import annotations

import argparse

import pytest

from pipeline.errors import PipelineError
from stages._cli import parse, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("teacher_logits", None)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--out")
    return p


def test_toml_defaults_and_flag_override(tmp_path):
    (tmp_path / "c.toml").write_text('[teacher_logits]\ntopk = 8\nout = "x"\n[tokenize]\nvocab = 3\n')
    args = parse(parser(), ["--config", str(tmp_path / "c.toml"), "--topk", "16"])
    assert (args.topk, args.out) == (16, "x")


def test_unknown_key_is_rejected(tmp_path):
    (tmp_path / "c.toml").write_text("[teacher_logits]\ntop_k = 8\n")
    with pytest.raises(PipelineError, match=r"unknown keys \['top_k'\] in \[teacher_logits\]; valid: \['out', 'topk', 'work'\]"):
        parse(parser(), ["--config", str(tmp_path / "c.toml")])


def test_unknown_table_is_rejected(tmp_path):
    (tmp_path / "c.toml").write_text("[teacher-logits]\ntopk = 8\n")
    with pytest.raises(PipelineError, match=r"unknown tables \['teacher-logits'\]"):
        parse(parser(), ["--config", str(tmp_path / "c.toml")])


def test_missing_config_file(tmp_path):
    with pytest.raises(PipelineError, match="no such config file"):
        parse(parser(), ["--config", str(tmp_path / "none.toml")])


def test_config_supplies_required_settings(tmp_path):
    """A setting without a default is required, and the config's table may supply it."""
    from dataclasses import dataclass

    from pipeline.settings import setting
    from stages._cli import add_settings, build

    @dataclass(frozen=True)
    class Needs:
        rows: int = setting(help="rows to use")
        scale: float = setting(1.0, "a scale")

    p = parser()
    add_settings(p, Needs)
    with pytest.raises(PipelineError, match=r"--rows required: pass it, or set it in the \[teacher_logits\] table"):
        parse(p, [])
    (tmp_path / "c.toml").write_text("[teacher_logits]\nrows = 12\n")
    assert build(Needs, parse(p, ["--config", str(tmp_path / "c.toml")])) == Needs(rows=12, scale=1.0)
