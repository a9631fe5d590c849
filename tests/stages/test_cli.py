"""What every stage shares: TOML defaults with unknown keys rejected, flags overriding them."""

from __future__ import annotations

import argparse

import pytest

from pipeline.errors import PipelineError
from stages._cli import parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--out")
    return p


def test_toml_defaults_and_flag_override(tmp_path):
    (tmp_path / "c.toml").write_text('topk = 8\nout = "x"\n')
    args = parse(parser(), ["--config", str(tmp_path / "c.toml"), "--topk", "16"])
    assert (args.topk, args.out) == (16, "x")


def test_unknown_key_is_rejected(tmp_path):
    (tmp_path / "c.toml").write_text("top_k = 8\n")
    with pytest.raises(PipelineError, match=r"unknown keys \['top_k'\]; valid: \['out', 'topk'\]"):
        parse(parser(), ["--config", str(tmp_path / "c.toml")])


def test_missing_config_file(tmp_path):
    with pytest.raises(PipelineError, match="no such config file"):
        parse(parser(), ["--config", str(tmp_path / "none.toml")])
