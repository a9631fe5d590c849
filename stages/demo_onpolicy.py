"""`make demo-onpolicy` (after `make demo-chat`): the chat demo's distilled student (WORK/chat/students/s-kd)
continued two ways for the same teacher-token budget, from the same checkpoint with the same seeds:
- on-policy: ROUNDS rounds of `make onpolicy` — the student's own replies to prompts of the training split,
  scored by the chat teacher, trained on (forward KL on the cached targets, rollouts only);
- on-policy, reverse KL (`reverse_kl_arm`): the same rounds with `LOSS=reverse-kl` (the per-token reverse-KL
  estimate from the teacher's log-prob of each sampled token, the student's recomputed in the step) at its own
  learning rate (`reverse_kl_lr`: a single-sample score-function gradient is noisier than forward KL's);
- off-policy: `make train-student --init-from s-kd` on the fixed chat cache, for as many window tokens as the
  teacher scored in all the rounds together.
Then each model (the start and both continuations) on the held-out tasks (pipeline/tasks.py: conversations
the tokenize split put in val): response-token perplexity on the held-out chat split, the reverse KL to the
teacher on the model's own samples (mean over generated tokens of log p_S − log p_T: rollouts of the model on
the held-out prompts, scored by `make teacher-logits`), and exact match of greedy replies. Results in
WORK/chat/onpolicy-demo/report.json and report.md. Finished steps are kept on a rerun."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import chat
from pipeline.checkpoint import load_model
from pipeline.corpus import Piece, is_val, split_key
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_path, write_json
from pipeline.rollouts import RolloutConfig, load_sampler_model
from pipeline.tasks import exact_match, held_out_tasks, prompts_jsonl
from pipeline.tokenizer import EOS, PAD, Tokenizer
from pipeline.train import FINISHED
from schemas.logits import decode
from schemas.manifest import read_manifest
from stages._cli import run
from stages.demo import Steps, demo_parser, demo_table, parse_overrides, precision

KEYS = {"start", "rounds", "prompts", "eval_tasks", "eval_new_tokens", "reverse_kl_arm", "reverse_kl_lr"}


def parser() -> argparse.ArgumentParser:
    return demo_parser("demo_onpolicy", __doc__, "configs/demo_onpolicy.toml")


def train_prompts(instructions: Path, val_fraction: float, n: int, seed: int, out: Path) -> int:
    """`n` prompts from training-split conversations (a seeded sample): each conversation without its last
    reply, so the model answers its last user turn."""
    rows = []
    with open(instructions, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            messages = json.loads(line)["messages"]
            turns = chat.from_row({"messages": messages}, "messages", lambda i=i: f"{instructions}:{i}")
            if is_val(split_key(Piece(f"{instructions}:{i}", "", turns=turns)), val_fraction):
                continue
            if messages[-1]["role"] in ("assistant", "model") and len(messages) >= 2:
                rows.append(messages[:-1])
    random.Random(seed).shuffle(rows)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for messages in rows[:n]:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return min(n, len(rows))


@torch.no_grad()
def greedy_replies(model_dir: Path, messages: list[list[dict[str, str]]], new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy replies (transformers' generate, left padded, KV cache) up to `<end_of_turn>`."""
    tokenizer = Tokenizer.load(model_dir / "tokenizer.model")
    eot = tokenizer.chat_ids()[1]
    model = load_sampler_model(model_dir, RolloutConfig(), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(model.parameters()).device
    out = []
    for a in range(0, len(messages), batch):
        prompts = [chat.prompt_ids(tokenizer, chat.normalize(m, lambda: "task")) for m in messages[a : a + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=device)
        mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                          device=device)[:, None]).long()
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=[eot, EOS], pad_token_id=PAD, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in (eot, EOS, PAD)), len(row))
            out.append(tokenizer.decode(row[:cut]))
    return out


def reverse_kl(cache: Path) -> tuple[float, int]:
    """Mean over generated tokens of log p_S − log p_T (the sampler's behaviour log-prob minus the teacher's
    label log-prob), and the tokens counted."""
    manifest = read_manifest(cache / "train", "logits")
    total, n = 0.0, 0
    for shard in manifest.shards:
        cols = decode(pq.read_table(cache / "train" / shard.file), ("behaviour_logprob", "label_logprob", "input_ids",
                                                                    "label_mask"), manifest.meta)
        mask = cols["label_mask"]
        total += float((cols["behaviour_logprob"][mask].astype(np.float64) - cols["label_logprob"][mask]).sum())
        n += int(mask.sum())
    return total / max(1, n), n


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    demo = demo_table(args.config, "demo_onpolicy", KEYS)
    chat_work = args.work / "chat"
    start_model = chat_work / "students" / demo["start"]
    instructions = chat_work / "data" / "instructions.jsonl"
    if not (start_model / FINISHED).is_file() or not instructions.is_file():
        raise PipelineError(f"{start_model}: no finished chat student (or no {instructions}); run `make demo-chat` first")
    # The held-out conversations are those the chat tokens' split put in val: read its fraction from there.
    val_fraction = read_manifest(chat_work / "tokens" / "train", "tokens", check_files=False).meta.val_fraction
    out = chat_work / "onpolicy-demo"
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    timings: dict[str, float] = {}
    step = Steps(chat_work, args.config, parse_overrides(args.overrides), "make demo-onpolicy")
    prompts = out / "prompts.jsonl"
    if not prompts.is_file():
        print(f"training prompts: {train_prompts(instructions, val_fraction, demo['prompts'], 0, prompts)}")
    tasks = held_out_tasks(instructions, val_fraction, demo["eval_tasks"])
    eval_prompts = out / "eval_prompts.jsonl"
    if not eval_prompts.is_file():
        prompts_jsonl(tasks, eval_prompts)
    prec = precision()

    # On-policy: the rounds (each: rollouts -> teacher-logits -> train-student from the previous model).
    step(f"on-policy: {demo['rounds']} rounds from {start_model}", "onpolicy", "--model", str(start_model),
         "--prompts", str(prompts), "--rounds", str(demo["rounds"]), "--out", str(out / "onpolicy"),
         "--precision", prec)
    timings["onpolicy_s"] = time.perf_counter() - clock
    rounds = [out / "onpolicy" / f"round-{r}" for r in range(1, demo["rounds"] + 1)]
    models = {"start": start_model, "onpolicy": rounds[-1] / "student"}
    if demo.get("reverse_kl_arm", False):  # the same rounds, trained with the reverse-KL estimator
        step(f"on-policy, reverse KL: {demo['rounds']} rounds from {start_model}", "onpolicy", "--model",
             str(start_model), "--prompts", str(prompts), "--rounds", str(demo["rounds"]), "--out",
             str(out / "onpolicy-rkl"), "--loss", "reverse-kl", "--lr", str(demo["reverse_kl_lr"]), "--precision", prec)
        models["onpolicy-rkl"] = out / "onpolicy-rkl" / f"round-{demo['rounds']}" / "student"
        timings["onpolicy_rkl_s"] = time.perf_counter() - clock - timings["onpolicy_s"]
    manifests = [read_manifest(r / "logits" / "train", "logits") for r in rounds]
    teacher_tokens = sum(m.tokens for m in manifests)  # window tokens the teacher ran over, all rounds
    scored = sum(m.stats.positions or 0 for m in manifests)  # of which generated: the head's positions

    # Off-policy: the same start, the fixed chat cache, the same teacher-token budget.
    offpolicy = out / "offpolicy" / "student"
    if not (offpolicy / FINISHED).is_file():
        step(f"off-policy: {teacher_tokens:,} tokens of the fixed chat cache from {start_model}", "train_student",
             "--student", f"student={start_model}", "--init-from", str(start_model), "--students",
             str(out / "offpolicy"), "--max-tokens", str(teacher_tokens), "--precision", prec)
    timings["offpolicy_s"] = time.perf_counter() - clock - sum(timings.values())

    models["offpolicy"] = offpolicy
    results: dict[str, Any] = {}
    for name, model_dir in models.items():
        folder = out / "eval" / name
        step(f"eval {name}: its own samples on the held-out prompts", "rollouts", "--model", str(model_dir),
             "--prompts", str(eval_prompts), "--rollouts", str(folder / "rollouts"), "--rollouts-per-prompt", "1",
             "--seed", "1000")
        step(f"eval {name}: the teacher on those samples", "teacher_logits", "--tokens", str(folder / "rollouts"),
             "--cache", str(folder / "logits"))
        rkl, tokens = reverse_kl(folder / "logits")
        model = load_model(model_dir, dtype=torch.float32)
        metrics = evaluate(model, chat_work / "logits" / "val", limit=0)
        replies = greedy_replies(model_dir, [t.messages for t in tasks], demo["eval_new_tokens"])
        hits = [exact_match(r, t) for r, t in zip(replies, tasks)]
        results[name] = {"response_ppl": metrics["val_ppl"], "response_ce": metrics["val_ce"],
                         "kl_to_teacher_heldout": metrics["kl_to_teacher"], "reverse_kl_own_samples": rkl,
                         "reverse_kl_tokens": tokens, "exact_match": sum(hits) / len(hits), "exact_hits": sum(hits),
                         "tasks": len(hits)}
        print(json.dumps({name: results[name]}), flush=True)
    timings["eval_s"] = time.perf_counter() - clock - sum(timings.values())
    timings["total_s"] = time.perf_counter() - clock
    report = {"start": str(start_model), "rounds": demo["rounds"], "teacher_tokens_each": teacher_tokens,
              "generated_tokens_scored": scored, "rollout_windows": sum(m.rows for m in manifests),
              "models": results, "timings": timings}
    write_json(out / "report.json", report)
    lines = ["| model | response ppl (held-out) | KL to teacher (held-out, cached) | reverse KL on own samples | "
             "exact match |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['response_ppl']:.2f} | {r['kl_to_teacher_heldout']:.3f} | "
                     f"{r['reverse_kl_own_samples']:.3f} | {r['exact_hits']}/{r['tasks']} ({r['exact_match']:.1%}) |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"demo-onpolicy finished in {timings['total_s']:.0f} s; see {out / 'report.md'}")


if __name__ == "__main__":
    run(main)
