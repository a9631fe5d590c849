from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import PipelineError
from pipeline.merge import merge_models
from pipeline.model import Gemma2, preset
from tests.conftest import tiny_config


def saved(path, cfg, seed, tokenizer=None):
    model = Gemma2(cfg)
    model.init_weights(seed)
    save_model(model, path, tokenizer=tokenizer)
    return model


def test_weighted_average(tmp_path, tokenizer_file):
    cfg = preset("debug", vocab_size=400)
    a = saved(tmp_path / "a", cfg, 1, tokenizer_file)
    b = saved(tmp_path / "b", cfg, 2, tokenizer_file)
    merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m", [3, 1])
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name, p in a.state_dict().items():
        assert torch.allclose(merged[name], 0.75 * p + 0.25 * b.state_dict()[name], atol=1e-7)
    assert load_model(tmp_path / "m").config == cfg
    assert (tmp_path / "m" / "tokenizer.model").is_file()


def test_refuses_other_shapes(tmp_path):
    saved(tmp_path / "a", tiny_config(), 1)
    saved(tmp_path / "b", tiny_config(hidden_size=64), 1)
    with pytest.raises(PipelineError, match=r"config differs .* in \['hidden_size'\]"):
        merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_refuses_other_tokenizers(tmp_path, tokenizer_file):
    from pipeline.tokenizer import Tokenizer
    from tests.conftest import CORPUS_TEXTS

    other = tmp_path / "other.model"
    Tokenizer.train(CORPUS_TEXTS[:40], vocab_size=400).save(other)
    saved(tmp_path / "a", tiny_config(), 1, tokenizer_file)
    saved(tmp_path / "b", tiny_config(), 2, other)
    with pytest.raises(PipelineError, match="tokenizer.model differs"):
        merge_models([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


MEASURE = """
import sys, threading, time
from pathlib import Path
import torch
from pipeline.checkpoint import load_config
from pipeline.merge import merge_models
from pipeline.model import Gemma2

with torch.device("meta"):  # the one-off cost of the model code's first use (lazy imports), not data
    Gemma2(load_config(Path(sys.argv[2])))

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [anon()], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

base = anon()
t = threading.Thread(target=poll)
t.start()
merge_models([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))
done.set()
t.join()
print(peak[0] - base)
"""


def test_merge_streams_tensor_by_tensor_in_bounded_host_memory(tmp_path):
    """Three 130 MB float32 models merged: the process's anonymous memory grows by at most 1.5× one model
    (the output file being assembled, and slices), not by the inputs or a float64 sum of the model."""
    import subprocess
    import sys

    from tests.stages.helpers import ENV, ROOT

    cfg = tiny_config(vocab_size=16000, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    inputs = [tmp_path / f"m{i}" for i in range(3)]
    for i, path in enumerate(inputs):
        saved(path, cfg, i)
    size = sum(p.numel() * 4 for p in Gemma2(cfg).parameters())
    assert size > 100 << 20
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "m"), *map(str, inputs)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown <= 1.5 * size, f"{grown / size:.2f}× one model"
    merged = load_file(tmp_path / "m" / "model.safetensors")
    parts = [load_file(p / "model.safetensors") for p in inputs]
    for name in ("model.embed_tokens.weight", "model.layers.5.mlp.down_proj.weight"):
        want = (parts[0][name].double() + parts[1][name].double() + parts[2][name].double()) / 3
        assert torch.allclose(merged[name], want.float(), atol=1e-7)
