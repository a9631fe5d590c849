"""RLHF of a chat student on TRL (the Gemma 2 report's post-training after SFT): the policy is optimised against a
sequence-classification reward model with a KL penalty to the student it starts from; plus what the demo
measures of a policy (mean reward, exact-match task accuracy, its KL to the start on its own samples).

**Why RLOO** (TRL's `RLOOTrainer`, not GRPO): neither needs a value model, so memory is the policy (with its
AdamW state), a frozen reference copy of the start and the reward model. RLOO puts the KL where the classic RLHF
objective has it, in the reward: each completion scores `r − β·Σ_t (log π − log π_ref)` over its tokens, and its
advantage is that minus the mean of the other completions of the same prompt (leave-one-out), which is unbiased
with no learned critic. GRPO adds the KL to the loss as a per-token estimator and divides advantages by the
group's standard deviation, which the RLOO paper and Gemma 2's `reward − β·KL` formulation do not.

**Our data path.** Prompts are a chat JSONL (`{"messages": [...]}` ending with the user's turn, or
`{"prompt": "..."}`) rendered by pipeline/chat.py's template with the model turn's header, exactly the text the
student was trained on, and passed to TRL as text already in the template (`<bos>` spelled as its piece), so TRL
applies no template of its own. `SentencePieceTokenizer` is the transformers face of our tokenizer.model: it
encodes with sentencepiece itself, so its ids equal pipeline.tokenizer's (tested on the chat template), and
decodes with it (byte fallback, whitespace kept). A completion stops at `<end_of_turn>` (declared as an eos id
of the policy's generation config, which TRL honours) or `<eos>`; the reward model reads prompt + completion as
`RewardTokenizer` turns TRL's text into the exact sequence it was trained on (`make reward-model`:
`<bos>` + the template of the conversation, the reply closed by `<end_of_turn>` and a newline).

**Resumable**: HF Trainer checkpoints in `OUT/checkpoint/checkpoint-N` (TRL's own; their optimizer, scheduler
and RNG files are read back with `torch.load(weights_only=True)`, which restores tensors and plain containers
and refuses arbitrary objects); a rerun continues from the last complete one (its `trainer_state.json`,
written last, present). The policy is always loaded from the start folder (so TRL's reference model, built from
the policy's `name_or_path`, is the start on a resume too) and the checkpoint's weights are loaded over it.

**Output**: a student folder like every other: the policy written by `save_model` (config.json last),
tokenizer.model, run_config.json (format chat, so `make generate` applies the template), metrics.jsonl (one line
per step: reward, KL, completion length; a last `eval: final` line) and finished.json (written last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from pipeline import chat
from pipeline.capture import teacher_hashes
from pipeline.checkpoint import load_config, model_fingerprint, save_model
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, read_json, write_json
from pipeline.model import Gemma2
from pipeline.settings import setting
from pipeline.tokenizer import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN, Tokenizer
from schemas.run_config import RUN_CONFIG, DataRef, RunConfig, read_run_config, write_run_config

FINISHED = "finished.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoint"
GENERATIONS = ("auto", "vllm", "transformers")
# Settings a resumed run may change: how long it runs and how often it saves (the LR schedule is constant).
RESUMABLE = frozenset({"max_steps", "save_every"})


@dataclass(frozen=True)
class RLHFConfig:
    max_steps: int = setting(200, "optimizer steps; each samples batch_size completions per process")
    kl_coef: float = setting(0.05, "β: the KL penalty to the starting student, subtracted from each completion's "
                                   "reward as β·Σ_t (log π − log π_ref) over its tokens (0: no reference model)")
    lr: float = setting(1e-6, "AdamW learning rate, constant after warm-up (TRL's default)")
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps")
    batch_size: int = setting(8, "completions per step per process (prompts × num_generations)")
    num_generations: int = setting(4, "completions sampled per prompt; each one's baseline is the others' mean "
                                      "reward (RLOO)")
    max_new_tokens: int = setting(128, "tokens per completion at most (it stops at <end_of_turn> or <eos>)")
    temperature: float = setting(1.0, "sampling temperature of the completions (and of their log-probs)")
    grad_accum: int = setting(1, "gradient accumulation steps per optimizer step")
    save_every: int = setting(50, "steps between checkpoints in OUT/checkpoint (the last step is always saved)")
    seed: int = setting(0, "seed of the sampling and the prompt order")
    generation: str = setting("auto", "completions from TRL's colocated vLLM ('vllm', a GPU) or transformers' "
                                      "generate ('transformers'); auto: vLLM on a GPU when it is installed",
                              choices=GENERATIONS)
    precision: str = setting("auto", "bf16 autocast ('bf16'; auto: on a GPU) or float32 ('fp32'; auto: on a CPU)",
                             choices=("auto", "bf16", "fp32"))

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_new_tokens < 1:
            raise PipelineError(f"--max-steps {self.max_steps}, --batch-size {self.batch_size}, --grad-accum "
                                f"{self.grad_accum} and --max-new-tokens {self.max_new_tokens} must be ≥ 1")
        if self.num_generations < 2:
            raise PipelineError(f"--num-generations {self.num_generations}: RLOO needs ≥ 2 completions per prompt "
                                "(each one's baseline is the others' mean reward)")
        if self.kl_coef < 0 or self.lr <= 0 or self.temperature <= 0 or self.warmup_steps < 0:
            raise PipelineError(f"--kl-coef {self.kl_coef} must be ≥ 0, --lr {self.lr} and --temperature "
                                f"{self.temperature} > 0, --warmup-steps {self.warmup_steps} ≥ 0")
        if self.save_every < 1:
            raise PipelineError(f"--save-every {self.save_every} must be ≥ 1 (steps between checkpoints)")


# --- the tokenizer TRL sees ----------------------------------------------------------------------------------


class SentencePieceTokenizer(SentencePieceBackend):
    """A transformers tokenizer over a SentencePiece `tokenizer.model` that encodes and decodes with
    sentencepiece itself: text between special tokens is `sp.encode(text)` whole (transformers' own
    SentencePiece backend strips, and its converted fast tokenizers re-implement the model), so ids equal
    `pipeline.tokenizer.Tokenizer.encode`. No special token is added: a prompt spells `<bos>` as the piece
    (`bos_token`), which the added-token split maps to id 2."""

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(str(vocab_file))
        for key, token_id in (("pad_token", PAD), ("eos_token", EOS), ("bos_token", BOS), ("unk_token", 3)):
            kwargs.setdefault(key, sp.id_to_piece(token_id))
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(vocab_file=str(vocab_file), legacy=True, **kwargs)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return self.sp_model.decode([t for t in ids if t not in skip])


class RewardTokenizer(SentencePieceTokenizer):
    """The reward model's tokenizer: the text TRL hands over (prompt + completion) in the exact template the reward
    model was trained on (pipeline/reward.py: `<bos>` + `chat.render` of the conversation) — the reply stripped,
    and a closed reply (ending `<end_of_turn>`) followed by the template's newline, so the reward is read at the
    token it was trained to be read at. A reply cut at the length limit is scored as it is."""

    def prepare_for_tokenization(self, text: str, **kwargs: Any) -> tuple[str, dict]:
        head, header, reply = text.rpartition(f"{START_OF_TURN}model\n")
        if header:
            closed = reply.endswith(END_OF_TURN)
            reply = reply.removesuffix(END_OF_TURN).strip()
            text = head + header + reply + (END_OF_TURN + "\n" if closed else "")
        return text, kwargs


def reward_tokenizer(path: Path) -> RewardTokenizer:
    Tokenizer.load(path)
    return RewardTokenizer(str(path))


def hf_tokenizer(path: Path) -> SentencePieceTokenizer:
    """The transformers tokenizer of a tokenizer.model, checked to be a Gemma-id SentencePiece model."""
    Tokenizer.load(path)  # one clear error for a missing file or other special ids
    return SentencePieceTokenizer(str(path))


# --- prompts ---------------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> Iterator[tuple[str, tuple[chat.Turn, ...]]]:
    """(where, turns) per row of a chat JSONL: a `messages` list ending with the user's turn, or a `prompt`
    string (and an optional `system`); one error naming file:line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such prompts file; pass a chat JSONL (one {{\"messages\": [...]}} or "
                            "{\"prompt\": \"...\"} object a line)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{where}: not JSON ({e.msg}); each line is one prompt object") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{where}: a {type(row).__name__}, expected an object with messages or prompt")
            if row.get("messages") is not None:
                messages = row["messages"]
            elif isinstance(row.get("prompt"), str):
                messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
                    {"role": "user", "content": row["prompt"]}]
            else:
                raise PipelineError(f"{where}: no messages list and no prompt string (keys: {sorted(row)})")
            turns = chat.normalize(messages, lambda where=where: where)
            if turns[-1].role != "user":
                raise PipelineError(f"{where}: the last message is the model's; a prompt ends with the user's turn "
                                    "(drop the reply: the policy writes it)")
            if chat.has_markers(turns):
                raise PipelineError(f"{where}: a message holds <start_of_turn>/<end_of_turn>, which would forge a turn")
            yield where, turns


def prompt_texts(path: Path, tokenizer: Tokenizer, bos: str, max_prompt: int) -> tuple[list[str], int]:
    """The prompts as template text starting with the `<bos>` piece (what TRL tokenizes), and how many were
    dropped for being longer than `max_prompt` tokens (no room for the completion)."""
    specials = {tokenizer.piece(i) for i in (PAD, EOS, BOS, 3)}
    texts, dropped = [], 0
    for where, turns in read_prompts(path):
        if any(s in t.content for t in turns for s in specials):
            raise PipelineError(f"{where}: a message holds a special token's text ({sorted(specials)}), which the "
                                "tokenizer would read as that token")
        if len(chat.prompt_ids(tokenizer, turns)) > max_prompt:
            dropped += 1
            continue
        texts.append(bos + chat.render(turns, generation_prompt=True).text)
    return texts, dropped


# --- models ----------------------------------------------------------------------------------------------------


def unfinished_model(folder: Path, what: str) -> str | None:
    """Why a folder is not a finished model: no config.json, or a run (run_config.json) without finished.json."""
    if not (folder / "config.json").is_file():
        return f"{folder}: no config.json; {what} is a Hugging Face model folder"
    if (folder / RUN_CONFIG).is_file() and not (folder / FINISHED).is_file():
        return f"{folder}: its training has not finished (no {FINISHED}); finish it first"
    return None


def load_policy(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' Gemma2ForCausalLM of a student folder (eager attention: Gemma 2's soft-cap), whose
    generation stops at `<end_of_turn>` or `<eos>`."""
    from transformers import Gemma2ForCausalLM

    load_config(folder)  # our checks first: one line for a config that is not Gemma 2
    model = Gemma2ForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    end_of_turn = Tokenizer.load(folder / "tokenizer.model").chat_ids()[1]
    model.generation_config.eos_token_id = [EOS, end_of_turn]
    model.generation_config.pad_token_id = PAD
    return model


def load_reward_model(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The reward model: a sequence classifier with one output (AutoModelForSequenceClassification)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    reason = unfinished_model(folder, "--reward-model")
    if reason:
        raise PipelineError(reason)
    if not (folder / "tokenizer.model").is_file():
        raise PipelineError(f"{folder}: no tokenizer.model beside the reward model; copy its base's")
    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "num_labels", 1) != 1:
        raise PipelineError(f"{folder}: the reward model has {config.num_labels} outputs; a reward model has one "
                            "(make reward-model)")
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise PipelineError(f"{folder}: architectures {architectures} is not a sequence classifier; pass the output "
                            "of `make reward-model`")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=dtype,
                                                               attn_implementation="eager")
    model.config.pad_token_id = PAD
    return model.eval()


@torch.no_grad()
def reward_scores(reward_model: Any, tokenizer: SentencePieceTokenizer, texts: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """The reward of each text (prompt + completion) as TRL scores it: tokenized by the reward tokenizer
    (`RewardTokenizer`) with no special tokens added, right-padded; the score is read at the last non-pad token."""
    device = next(reward_model.parameters()).device
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(text=list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                          padding_side="right", add_special_tokens=False)
        logits = reward_model(**{k: v.to(device) for k, v in batch.items()}).logits
        out += logits[:, 0].float().cpu().tolist()
    return out


# --- the run ---------------------------------------------------------------------------------------------------


def _run_config(model: Path, reward: Path, prompts: Path, out: Path, cfg: RLHFConfig, tokenizer: Tokenizer,
                n_prompts: int, world: int) -> RunConfig:
    config = load_config(model)
    start = read_run_config(model) if (model / RUN_CONFIG).is_file() else None
    completions = cfg.batch_size * cfg.grad_accum * world
    out.mkdir(parents=True, exist_ok=True)
    # Weights are hashed once, into the file-hash cache every stage keeps beside a model (else in `out`), then
    # known by size and mtime.
    start_fp = model_fingerprint(model, teacher_hashes(model, out))
    reward_fp = _folder_fingerprint(reward, teacher_hashes(reward, out))
    return RunConfig(
        name=out.name, student=start.student if start else str(model), model=config.to_hf(), data=str(prompts),
        cache=DataRef(kind="prompts", tokenizer_fingerprint=tokenizer.fingerprint,
                      seq_len=config.max_position_embeddings, vocab_size=config.vocab_size, train_rows=n_prompts,
                      format="chat"),
        loss={"kind": "rlhf", "algorithm": "rloo", "kl_coef": cfg.kl_coef, "start": str(model),
              "start_fingerprint": start_fp, "reward_model": str(reward), "reward_fingerprint": reward_fp,
              "target": "-"},
        optim={"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "schedule": "constant"},
        train={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("kl_coef", "lr", "warmup_steps")},
        world_size=world, total_steps=cfg.max_steps, tokens_per_step=completions * cfg.max_new_tokens,
        parameters=config.num_parameters())


def _folder_fingerprint(folder: Path, file_hash: Callable[[Path], str]) -> str:
    """sha256 over a model folder's config.json and weight files (any architecture)."""
    import hashlib

    from pipeline.checkpoint import weight_files

    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in weight_files(folder):
        digest.update(file.name.encode() + file_hash(file).encode())
    return digest.hexdigest()


def _changed(saved: RunConfig, now: RunConfig) -> list[str]:
    """`setting old -> new` for each setting that decides the trajectory and differs."""
    keep = {f"train.{k}" for k in RESUMABLE} | {"total_steps", "tokens_per_step", "world_size"}
    old, new = saved.to_json(), now.to_json()

    def value(raw: dict, name: str) -> Any:
        group, _, key = name.partition(".")
        return raw.get(group, {}).get(key) if key else raw.get(group)

    return [f"{c} {value(old, c)} -> {value(new, c)}" for c in now.changed(saved) if c not in keep]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (its trainer_state.json, written last, parses)."""
    found = []
    for d in folder.glob("checkpoint-*") if folder.is_dir() else ():
        suffix = d.name.removeprefix("checkpoint-")
        if d.is_dir() and suffix.isdigit():
            found.append((int(suffix), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return d
    return None


def _start_fresh(out: Path) -> None:
    (out / FINISHED).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / "config.json").unlink(missing_ok=True)
    for old in [out / METRICS, out / "model.safetensors", out / "model.safetensors.index.json",
                *out.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)


def process_state() -> Any:
    """accelerate's view of the processes (shared by the Trainer TRL builds): under torchrun / accelerate on
    CPUs too (several CPU processes are accelerate's MULTI_CPU only when asked for the CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def use_vllm(generation: str) -> bool:
    import importlib.util

    available = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if generation == "vllm" and not available:
        raise PipelineError("--generation vllm needs a GPU and vLLM installed (pip install vllm); use "
                            "--generation transformers")
    return generation == "vllm" or (generation == "auto" and available)


def train_rlhf(model: Path, reward: Path, prompts: Path, out: Path, cfg: RLHFConfig, resume: bool = True) -> dict:
    """RLOO from the student in `model` against the reward model in `reward` on the prompts; the policy and
    its records in `out`. Returns the final metrics. Under accelerate / torchrun every process calls this."""
    model, reward, prompts, out = Path(model), Path(reward), Path(prompts), Path(out)
    reason = unfinished_model(model, "--model")
    if reason:
        raise PipelineError(reason)
    if out.resolve() == model.resolve():
        raise PipelineError(f"--out {out} is the starting model's folder; write the policy elsewhere")
    tok_path = model / "tokenizer.model"
    tokenizer = Tokenizer.load(tok_path)
    tokenizer.chat_ids()  # the turn markers the template needs
    config = load_config(model)
    state = process_state()
    world = state.num_processes
    if (cfg.batch_size * cfg.grad_accum * world) % cfg.num_generations:
        raise PipelineError(f"--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} × {world} processes must "
                            f"be a multiple of --num-generations {cfg.num_generations} (whole groups per step)")
    hf_tok = hf_tokenizer(tok_path)
    texts, dropped = prompt_texts(prompts, tokenizer, hf_tok.bos_token,
                                  config.max_position_embeddings - cfg.max_new_tokens)
    if not texts:
        raise PipelineError(f"{prompts}: no prompt leaves room for {cfg.max_new_tokens} new tokens within the "
                            f"model's {config.max_position_embeddings} positions ({dropped} too long)")
    if dropped and state.is_main_process:
        print(f"rlhf: {dropped} prompts longer than {config.max_position_embeddings - cfg.max_new_tokens} tokens "
              "dropped (no room for the completion)", flush=True)
    run = _run_config(model, reward, prompts, out, cfg, tokenizer, len(texts), world)

    if (out / RUN_CONFIG).is_file() and resume:
        changed = _changed(read_run_config(out), run)
        if changed:
            raise PipelineError(f"{out} holds an RLHF run with other settings ({', '.join(changed)}); rerun with "
                                "those, pass --no-resume to start over, or choose another --out")
        if (out / FINISHED).is_file() and read_json(out / FINISHED, "the finished run")["step"] >= cfg.max_steps:
            if state.is_main_process:
                print(f"rlhf: {out} is finished ({cfg.max_steps} steps)", flush=True)
            return read_json(out / FINISHED, "the finished run")["final"]
    elif state.is_main_process:
        _start_fresh(out)
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / FINISHED).unlink(missing_ok=True)  # a run extended past its finished steps is unfinished again
        write_run_config(out, run)
    state.wait_for_everyone()
    return _train(model, reward, texts, out, cfg, hf_tok, run)


def _train(model: Path, reward: Path, texts: list[str], out: Path, cfg: RLHFConfig,
           hf_tok: SentencePieceTokenizer, run: RunConfig) -> dict:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RLOOConfig, RLOOTrainer

    gpu = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and gpu)
    vllm = use_vllm(cfg.generation)
    args = RLOOConfig(
        output_dir=str(out / CHECKPOINTS), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.kl_coef,
        learning_rate=cfg.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps,
        bf16=bf16, fp16=False, activation_checkpointing=gpu, use_cpu=not gpu, seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2, logging_steps=1, report_to="none",
        disable_tqdm=True, use_vllm=vllm, vllm_mode="colocate",
        vllm_max_model_length=run.model["max_position_embeddings"] if vllm else None)
    policy = load_policy(model)
    reward_model = load_reward_model(reward, torch.bfloat16 if bf16 else torch.float32)
    reward_tok = reward_tokenizer(reward / "tokenizer.model")
    trainer = RLOOTrainer(model=policy, reward_funcs=reward_model, args=args,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=hf_tok,
                          reward_processing_classes=reward_tok)
    main = trainer.accelerator.is_main_process
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume_from = last_checkpoint(out / CHECKPOINTS)
    # Wall time per step, across sessions: a resumed session continues from the time logged at its checkpoint.
    walls: dict[int, float] = {}
    if resume_from is not None and (out / METRICS).is_file():
        for line in (out / METRICS).read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                walls[int(json.loads(line)["step"])] = float(json.loads(line)["wall_s"])
    offset = walls.get(int(resume_from.name.removeprefix("checkpoint-")), 0.0) if resume_from else 0.0
    trainer.add_callback(_log_callback(out / METRICS, walls, offset, main))
    if resume_from is not None and main:
        print(f"rlhf: resuming from {resume_from}", flush=True)
    if resume_from is None and main:
        (out / METRICS).unlink(missing_ok=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathered under FSDP / DeepSpeed
    lines = [{**_step_line(x), "wall_s": walls.get(int(x["step"]))} for x in trainer.state.log_history
             if "reward" in x]
    final = _final(lines, trainer.state)
    if main:
        _export(state_dict, model, out)
        with atomic_path(out / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(x) + "\n" for x in lines) +
                           json.dumps({"eval": "final", **final}) + "\n")
        write_json(out / FINISHED, {"final": final, "step": trainer.state.global_step, "start": str(model),
                                    "reward_model": str(reward), "algorithm": "rloo"})
    trainer.accelerator.wait_for_everyone()
    return final


def _log_callback(path: Path, walls: dict[int, float], offset: float, main: bool) -> Any:
    """A TrainerCallback (defined here: transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class Log(TrainerCallback):
        """One line per step on stdout and in metrics.jsonl (rewritten from the trainer state at the end), the
        wall time of each step since the run began (`walls`), and a checkpoint at the last step, so a finished
        run can be extended."""

        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_save = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not logs or "reward" not in logs:
                return
            wall = walls[state.global_step] = round(offset + time.perf_counter() - self.start, 2)
            if not main:
                return
            line = {**_step_line({**logs, "step": state.global_step}), "wall_s": wall}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            print(f"rlhf: step {state.global_step}/{state.max_steps}, reward {line['reward']:.4f}, kl "
                  f"{line['kl']:.4f}, completion {line['completion_tokens']:.1f} tokens, {wall:.0f} s", flush=True)

    return Log()


def _step_line(x: dict) -> dict:
    """A step's record: TRL's names mapped to ours."""
    return {"step": int(x["step"]), "reward": float(x["reward"]), "reward_std": float(x.get("reward_std", 0.0)),
            "kl": float(x.get("kl", 0.0)), "completion_tokens": float(x["completions/mean_length"]),
            "clipped_ratio": float(x.get("completions/clipped_ratio", 0.0)), "entropy": float(x.get("entropy", 0.0)),
            "tokens": int(float(x.get("num_tokens", 0)))}


def _final(lines: list[dict], state: Any) -> dict:
    """The last steps' means (the last 10% of steps, at least one) and the run's totals."""
    tail = lines[-max(1, len(lines) // 10):] if lines else []

    def mean(key: str) -> float | None:
        return sum(x[key] for x in tail) / len(tail) if tail else None

    return {"steps": int(state.global_step), "tokens": int(state.num_input_tokens_seen),
            "reward": mean("reward"), "kl": mean("kl"), "completion_tokens": mean("completion_tokens"),
            "wall_s": lines[-1]["wall_s"] if lines else None}


def _export(state_dict: dict[str, torch.Tensor], start: Path, out: Path) -> None:
    """The policy as a student folder: transformers' keys are ours (the tied head aside), written by
    `save_model` in float32 (config.json last)."""
    with torch.device("meta"):
        policy = Gemma2(load_config(start))
    names = dict(policy.named_parameters())
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items() if k in names}
    missing = sorted(set(names) - set(state))
    if missing:
        raise PipelineError(f"the trained policy lacks {missing[0]!r}; not a Gemma 2 model of {start}'s config")
    policy.load_state_dict(state, strict=True, assign=True)
    save_model(policy, out, tokenizer=start / "tokenizer.model")


# --- evaluation (the demo's table) -----------------------------------------------------------------------------


@torch.no_grad()
def replies(model: Any, prompts: Sequence[list[int]], stop: tuple[int, ...], max_new_tokens: int,
            temperature: float = 0.0, seed: int = 0, batch_size: int = 32) -> list[list[int]]:
    """Each prompt's reply ids from transformers' `generate` (KV cache, left-padded batches): greedy at
    temperature 0, else drawn at that temperature (no top-k/top-p, as the RL samples); the stop token is
    included when one was generated, nothing after it."""
    torch.manual_seed(seed)
    out: list[list[int]] = []
    limit = model.config.max_position_embeddings
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i:i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        sampled = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        new = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max(1, min(max_new_tokens, limit - width)), eos_token_id=list(stop) or None,
                             pad_token_id=PAD, **sampled)[:, width:].tolist()
        for row in new:
            end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
            out.append(row[:end])
    return out


@torch.no_grad()
def reply_logprobs(model: Any, prompts: Sequence[list[int]], replies: Sequence[list[int]],
                   batch_size: int = 32) -> list[torch.Tensor]:
    """log p(reply[t] | prompt, reply[:t]) of each reply token under a transformers causal LM at temperature 1,
    one [len(reply)] tensor per pair (right-padded batches: the padding comes after every position read)."""
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        pairs = [(list(p), list(r)) for p, r in zip(prompts[i:i + batch_size], replies[i:i + batch_size])]
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, r) in enumerate(pairs):
            ids[j, :len(p) + len(r)] = torch.tensor(p + r)
            mask[j, :len(p) + len(r)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(model.device))[..., 0].cpu()
        out += [logprobs[j, len(p) - 1:len(p) + len(r) - 1] for j, (p, r) in enumerate(pairs)]
    return out


@torch.no_grad()
def policy_kl(policy: Any, reference: Any, prompts: Sequence[list[int]], stop: tuple[int, ...],
              max_new_tokens: int, samples: int = 2, seed: int = 0) -> float:
    """The policy's KL to the reference on its own samples: `samples` completions per prompt drawn from the
    policy at temperature 1, the mean over all their tokens of log π − log π_ref (a Monte-Carlo estimate of
    KL(π ‖ π_ref) per generated token)."""
    repeated = [p for p in prompts for _ in range(samples)]
    drawn = replies(policy, repeated, stop, max_new_tokens, 1.0, seed)
    mine, theirs = reply_logprobs(policy, repeated, drawn), reply_logprobs(reference, repeated, drawn)
    count = sum(len(r) for r in drawn)
    return float(sum((a - b).sum() for a, b in zip(mine, theirs))) / max(1, count)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def offline() -> None:
    """No network at run time: the hub and datasets read local files only."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file "Loading weights" bars; the stage prints its own lines
    # transformers 5 renamed gradient to activation checkpointing; TRL 1.16 still calls the old names.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
