"""`make demo-rlhf` (after `make demo-chat`): RLHF on the embedded default, in WORK/chat. The chat demo's
instruction set → preference pairs built offline (pipeline/preferences.py: chosen the right reply, rejected a
plausible wrong one) → a reward model from the chat teacher (`make reward-model`, held-out pairwise accuracy) →
RLOO of the chat KD student against it on the train questions (`make rlhf`, KL to the student) → the RL
policy merged with its SFT start at a ratio (`make merge`) → a table for the SFT student, the RL policy and
the merge on the held-out tasks (conversations the tokenize split kept out of training): mean reward of their
greedy replies, exact-match task accuracy, and their KL to the SFT student on their own samples. Each step is
the stage a user runs, with `--config configs/demo_rlhf.toml`; finished steps are skipped on a rerun.
Writes WORK/chat/rlhf/ (preferences, prompts, the reward model, report.md, summary.json) and the students
WORK/chat/students/<student>-rlhf and <student>-rlhf-merged."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import chat
from pipeline.errors import PipelineError
from pipeline.fsutil import read_json, write_json
from pipeline.layout import Layout
from pipeline.rlhf import (
    hf_tokenizer,
    load_policy,
    load_reward_model,
    offline,
    policy_kl,
    replies,
    reward_scores,
    reward_tokenizer,
    write_jsonl,
)
from pipeline.tokenizer import EOS, Tokenizer
from stages._cli import load_config, run
from stages.demo import Steps, demo_parser, demo_table, parse_overrides
from stages.demo_chat import finished

KEYS = {"student", "kinds", "merge_ratio", "eval_new_tokens", "kl_samples"}


def parser() -> argparse.ArgumentParser:
    return demo_parser("demo_rlhf", __doc__, "configs/demo_rlhf.toml")


def train_prompts(preferences: Path, out: Path, kinds: list[str], val_fraction: float) -> int:
    """The RL prompts: the questions of the preference pairs in the train split, of the given kinds, once each."""
    from pipeline.preferences import pair_split, parse_pair

    seen, rows = set(), []
    with open(preferences, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if row.get("kind") not in kinds:
                continue
            if pair_split(parse_pair(row, lambda n=n: f"{preferences}:{n}"), val_fraction) != "train":
                continue
            key = json.dumps(row["messages"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({"messages": row["messages"]})
    write_jsonl(out, rows)
    return len(rows)


def evaluate(models: dict[str, Path], sft: Path, reward: Path, tasks: list[Any], new_tokens: int,
             kl_samples: int) -> list[dict[str, Any]]:
    """Per model: greedy replies to the held-out tasks → exact match and mean reward; its KL to the SFT student
    on its own samples (temperature 1)."""
    from pipeline.tasks import exact_match

    tokenizer = Tokenizer.load(sft / "tokenizer.model")
    text_tok, score_tok = hf_tokenizer(sft / "tokenizer.model"), reward_tokenizer(reward / "tokenizer.model")
    stop = (tokenizer.chat_ids()[1], EOS)
    turns = [chat.normalize(t.messages, lambda: "task") for t in tasks]
    prompts = [chat.prompt_ids(tokenizer, t) for t in turns]
    texts = [text_tok.bos_token + chat.render(t, generation_prompt=True).text for t in turns]
    reward_model = load_reward_model(reward)
    reference = load_policy(sft).eval()
    rows = []
    for name, folder in models.items():
        start = time.perf_counter()
        model = reference if folder == sft else load_policy(folder).eval()  # the SFT student is loaded once
        greedy = replies(model, prompts, stop, new_tokens)
        decoded = [text_tok.decode(r, skip_special_tokens=True) for r in greedy]
        rewards = reward_scores(reward_model, score_tok, [p + d for p, d in zip(texts, decoded)])
        answers = [tokenizer.decode([t for t in r if t not in stop]) for r in greedy]
        hits = [exact_match(a, t) for a, t in zip(answers, tasks)]
        kl = policy_kl(model, reference, prompts, stop, new_tokens, samples=kl_samples) if folder != sft else 0.0
        rows.append({"model": name, "folder": str(folder), "mean_reward": sum(rewards) / len(rewards),
                     "exact_match": sum(hits) / len(hits),
                     **{f"exact_match_{k}": _share([h for h, t in zip(hits, tasks) if t.kind == k])
                        for k in sorted({t.kind for t in tasks})},
                     "kl_to_sft": kl, "eval_s": round(time.perf_counter() - start, 1),
                     "example": {"question": tasks[0].messages[-1]["content"], "reply": answers[0]}})
    return rows


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def markdown(rows: list[dict[str, Any]], reward: dict[str, Any], rl: dict[str, Any], tasks: int, ratio: float,
             wall: float) -> str:
    lines = ["# RLHF demo", "",
             f"Reward model (from the chat teacher): held-out pairwise accuracy {reward['eval_accuracy']:.3f} on "
             f"{reward['eval_pairs']} pairs (target ≥ 0.90), mean margin {reward['eval_margin']:.3f}; "
             f"{reward['train_pairs']} train pairs, {reward['steps']} steps.",
             f"RL (RLOO): {rl['steps']} steps, last-10% mean train reward {rl['reward']:.3f}, TRL's KL "
             f"{rl['kl']:.4f} per token; merge = {ratio:g} × RL + {1 - ratio:g} × SFT.", "",
             f"Held-out tasks: {tasks} (greedy replies; exact match of the module / signature).", "",
             "| model | mean reward | exact match | where | signature | KL to SFT (per token) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mean_reward']:.3f} | {r['exact_match']:.3f} | "
                     f"{_fmt(r.get('exact_match_where'))} | {_fmt(r.get('exact_match_signature'))} | "
                     f"{r['kl_to_sft']:.4f} |")
    lines += ["", f"Wall time of the demo: {wall:.0f} s."]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    demo = demo_table(args.config, "demo_rlhf", KEYS)
    offline()
    chat_work = Layout(args.work / "chat")
    data = chat_work.work / "data" / "instructions.jsonl"
    sft = chat_work.students / demo["student"]
    if not data.is_file() or not finished(sft) or not finished(chat_work.teacher):
        raise PipelineError(f"{chat_work.work}: no finished chat demo (instructions.jsonl, the chat teacher and "
                            f"students/{demo['student']}); run `make demo-chat` first")
    start = time.perf_counter()
    folder = chat_work.work / "rlhf"
    folder.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.overrides)
    val_fraction = float(_flag(overrides, "reward_model", "--val-fraction",
                               load_config(args.config).get("reward_model", {}).get("val_fraction", 0.05)))

    preferences = folder / "preferences.jsonl"
    if not preferences.is_file():
        from pipeline.preferences import write_demo_preferences

        counts = write_demo_preferences(data, preferences, val_fraction)
        print(f"== preferences: {counts['pairs']} pairs ({counts['train_pairs']} train, {counts['val_pairs']} "
              f"held out) -> {preferences}", flush=True)
    prompts = folder / "prompts-train.jsonl"
    if not prompts.is_file():
        n = train_prompts(preferences, prompts, list(demo["kinds"]), val_fraction)
        print(f"== RL prompts: {n} train questions ({', '.join(demo['kinds'])}) -> {prompts}", flush=True)
    from pipeline.tasks import held_out_tasks, prompts_jsonl

    tasks = held_out_tasks(data, val_fraction)
    prompts_jsonl(tasks, folder / "prompts-heldout.jsonl")

    step = Steps(chat_work.work, args.config, overrides, "make demo-rlhf")
    step.start = start
    reward = folder / "reward-model"
    step("reward model: Bradley-Terry on the train pairs, from the chat teacher", "reward_model",
         "--preferences", str(preferences), "--base", str(chat_work.teacher), "--out", str(reward))
    policy = chat_work.students / f"{demo['student']}-rlhf"
    step(f"rlhf: RLOO of {demo['student']} against the reward model", "rlhf", "--model", str(sft),
         "--reward-model", str(reward), "--prompts", str(prompts), "--out", str(policy))
    ratio = float(demo["merge_ratio"])
    merged = chat_work.students / f"{demo['student']}-rlhf-merged"
    if not finished(merged) or read_json(merged / "merge_config.json", "the merge")["weights"] != [ratio, 1 - ratio]:
        step(f"merge: {ratio:g} x {policy.name} + {1 - ratio:g} x {sft.name}", "merge", "--inputs", str(policy),
             str(sft), "--weights", str(ratio), str(1 - ratio), "--out", str(merged))

    print(f"\n== evaluation on {len(tasks)} held-out tasks  [{time.perf_counter() - start:.0f} s]", flush=True)
    torch.manual_seed(0)
    rows = evaluate({f"{sft.name} (SFT)": sft, f"{policy.name} (RL)": policy, f"{merged.name} (merge)": merged},
                    sft, reward, tasks, int(demo["eval_new_tokens"]), int(demo["kl_samples"]))
    reward_final = read_json(reward / "finished.json", "the reward model")
    rl_final = read_json(policy / "finished.json", "the RL policy")["final"]
    wall = time.perf_counter() - start
    write_json(folder / "summary.json", {"reward_model": reward_final, "rlhf": rl_final, "models": rows,
                                         "held_out_tasks": len(tasks), "merge_ratio": ratio, "wall_s": round(wall, 1)})
    text = markdown(rows, reward_final, rl_final, len(tasks), ratio, wall)
    (folder / "report.md").write_text(text)
    print("\n" + text)
    print(f"rlhf demo finished in {wall:.0f} s; see {folder / 'report.md'}")


def _flag(overrides: dict[str, list[str]], stage: str, flag: str, default: Any) -> Any:
    """The value a `--set stage.key=value` gives a flag, else the default."""
    extra = overrides.get(stage, [])
    values = [v for f, v in zip(extra[::2], extra[1::2]) if f == flag]
    return values[-1] if values else default


if __name__ == "__main__":
    run(main)
