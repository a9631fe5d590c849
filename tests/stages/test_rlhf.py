"""`make rlhf` on a transformers-made tiny Gemma 2 and a tiny reward model (the hold-out check's RLHF half): a few
RLOO steps write a finished student folder that transformers loads (its logits equal our loader's) and `make
generate` answers from in the chat template; the KL penalty is to the starting student: none at the first step
(the reference is the start), and after a kill the resumed run logs the uninterrupted run's KL at every step and
ends with its weights (a reference rebuilt from the checkpoint would log 0 again); a changed setting is refused in
one line. (A behavioural check, "a huge KL_COEF keeps the policy close", is not one here: at these sizes Adam's
normalised steps on a 2–8-sample REINFORCE estimate random-walk as far with β = 1000 as with β = 0 in 6–10 steps
(measured KL to the start 0.02–0.10 either way), so it would be a coin toss, not a test.)"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import load_model, save_model
from pipeline.model import Gemma2
from pipeline.tokenizer import EOS, Tokenizer
from tests.conftest import tiny_config
from tests.stages.helpers import ENV, ROOT, popen, stage, torchrun

STEPS = ["--max-steps", "6", "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "12", "--lr", "1e-2",
         "--save-every", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_file):
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    root = tmp_path_factory.mktemp("rlhf")
    vocab = Tokenizer.load(tokenizer_file).vocab_size
    config = tiny_config(vocab_size=vocab, num_hidden_layers=1, max_position_embeddings=128, sliding_window=32)
    student = Gemma2(config, "math")
    student.init_weights(0)
    save_model(student, root / "student", tokenizer=tokenizer_file)
    raw = config.to_hf()
    raw.pop("architectures")
    torch.manual_seed(1)
    reward = Gemma2ForSequenceClassification(Gemma2Config(**raw, num_labels=1))
    reward.save_pretrained(root / "reward")
    (root / "reward" / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What does f{i} return?"}]})
                               + "\n" for i in range(8)))
    return root


def make(*args: str) -> subprocess.CompletedProcess:
    # --no-print-directory: under `make test` the nested make would print its directory after the JSON line.
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def rlhf_args(inputs, out, *extra: str) -> list[str]:
    return ["--model", inputs / "student", "--reward-model", inputs / "reward", "--prompts", inputs / "prompts.jsonl",
            "--out", out, *STEPS, *extra]


@pytest.fixture(scope="module")
def policy(inputs):
    """The uninterrupted run, through make."""
    out = inputs / "policy"
    result = make("rlhf", f"MODEL={inputs / 'student'}", f"REWARD_MODEL={inputs / 'reward'}",
                  f"PROMPTS={inputs / 'prompts.jsonl'}", f"RLHF_OUT={out}", "MAX_STEPS=6", "KL_COEF=0.5", "LR=1e-2",
                  "EXTRA=--batch-size 4 --num-generations 2 --max-new-tokens 12 --save-every 2")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_make_rlhf_writes_a_student_transformers_loads_and_generate_answers_from(inputs, policy):
    from transformers import Gemma2ForCausalLM

    finished = json.loads((policy / "finished.json").read_text())
    assert finished["step"] == 6 and finished["final"]["steps"] == 6
    lines = [json.loads(x) for x in (policy / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines[:-1]] == [1, 2, 3, 4, 5, 6] and lines[-1]["eval"] == "final"
    run = json.loads((policy / "run_config.json").read_text())
    assert run["cache"]["format"] == "chat" and run["loss"]["kind"] == "rlhf" and run["loss"]["kl_coef"] == 0.5
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    hf = Gemma2ForCausalLM.from_pretrained(str(policy), attn_implementation="eager").eval()
    ours = load_model(policy)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(ids), atol=1e-4)
        assert not torch.allclose(ours(ids), load_model(inputs / "student")(ids), atol=1e-4)  # it trained
    # completions stop at <end_of_turn> (and <eos>): the eos ids TRL reads from the policy's generation config
    from pipeline.rlhf import load_policy

    end_of_turn = Tokenizer.load(policy / "tokenizer.model").chat_ids()[1]
    assert load_policy(inputs / "student").generation_config.eos_token_id == [EOS, end_of_turn]
    result = make("generate", f"MODEL={policy}", "PROMPT=What does f1 return?", "MAX_NEW_TOKENS=8", "EXTRA=--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["chat"] is True and answer["prompt"].endswith("<start_of_turn>model\n")


def test_the_kl_penalty_is_to_the_starting_student(policy):
    lines = [json.loads(x) for x in (policy / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert lines[0]["kl"] == 0.0  # the reference is the policy's start: the first samples have no KL
    assert all(x["kl"] != 0.0 for x in lines[1:])  # and it is there: the policy moved away from it


def test_a_killed_run_resumes_to_the_uninterrupted_weights(inputs, policy):
    out = inputs / "killed"
    proc = popen("rlhf", *rlhf_args(inputs, out, "--kl-coef", "0.5"))
    deadline = time.time() + 300
    while not (out / "checkpoint" / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "finished.json").is_file() and not (out / "checkpoint" / "checkpoint-6").exists()
    result = stage("rlhf", *rlhf_args(inputs, out, "--kl-coef", "0.5"))
    assert "resuming from" in result.stdout
    a, b = load_file(policy / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed, whole = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (out, policy))
    assert [x["step"] for x in resumed[:-1]] == [1, 2, 3, 4, 5, 6]
    assert [(x["kl"], x["reward"]) for x in resumed[:-1]] == [(x["kl"], x["reward"]) for x in whole[:-1]]
    again = stage("rlhf", *rlhf_args(inputs, out, "--kl-coef", "0.1"), check=False)
    assert again.returncode == 2 and "loss.kl_coef 0.5 -> 0.1" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_two_processes_under_torchrun(inputs):
    """`LAUNCH="torchrun --nproc_per_node 2"` on CPUs: one data-parallel run (accelerate's MULTI_CPU), twice the
    completions a step, one finished student written by rank 0."""
    out = inputs / "two"
    stage("rlhf", *rlhf_args(inputs, out, "--max-steps", "2"), launcher=torchrun(2))
    run = json.loads((out / "run_config.json").read_text())
    assert run["world_size"] == 2 and run["tokens_per_step"] == 2 * 4 * 12
    assert json.loads((out / "finished.json").read_text())["step"] == 2
    load_model(out)
