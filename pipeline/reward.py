"""`make reward-model`: a Gemma 2 reward model trained on preference pairs with TRL's RewardTrainer.

The model is `Gemma2ForSequenceClassification` with one output (`num_labels` 1), initialised from any Hugging
Face Gemma 2 directory `BASE` (the teacher or a student; its causal-LM head is dropped, the scalar head `score`
starts random) and `config.pad_token_id` set to Gemma's pad id 0, so the reward is read at each sequence's
last token. The pairs are our preference shards (pipeline/preferences.py, schemas/preferences.py), built
from `PREFERENCES` with BASE's `tokenizer.model` into `REWARD_MODEL/data/` (or, when `PREFERENCES` is a folder
`make tokens FORMAT=preference` built with that tokenizer, read from there); TRL reads them as a tokenized
dataset (`chosen_ids`/`rejected_ids`), so our chat template is the one the reward model learns, not a
Hugging Face chat template. The loss is TRL's Bradley–Terry loss −log σ(r_chosen − r_rejected), plus
`--center-rewards` × mean(r²) (TRL's `center_rewards_coefficient`: rewards near 0, which RL against the
model wants).

Held-out pairs (the val split) are scored once training ends with the final weights: pairwise accuracy
(the share with r_chosen > r_rejected; ties count as wrong) and the mean margin r_chosen − r_rejected.

Output `REWARD_MODEL/`: config.json + model.safetensors (`AutoModelForSequenceClassification` loads it),
tokenizer.model (BASE's), `run_config.json`, `metrics.jsonl` (TRL's logs, one JSON object per line),
`finished.json` (written last: eval_accuracy, eval_margin, counts), `data/` (the preference shards). While
it trains, Hugging Face Trainer checkpoints go to `checkpoints/` every `--save-every` steps; a rerun of the
same command resumes from the last one (they are removed once the model is finished; the Trainer's
optimizer and RNG states are torch files, read back with `weights_only=True`, which unpickles nothing but
tensors and plain containers). A finished folder is skipped.

No network: HF_HUB_OFFLINE is set and nothing is reported anywhere (`report_to` none). On a GPU the model
trains under bf16 autocast with gradient checkpointing; on the CPU in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig
from pipeline.fsutil import read_json, write_json
from pipeline.layout import SPLITS
from pipeline.preferences import PreferenceConfig, build_preferences, shard_paths
from pipeline.settings import setting
from pipeline.tokenizer import PAD, Tokenizer
from schemas.preferences import PreferencesManifest, read_preferences_manifest

FINISHED = "finished.json"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
DATA = "data"
HF_CACHE = ".hf-cache"
MIN_TRAIN_PAIRS = 8
PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig:
    max_steps: int = setting(0, "optimizer steps (0: one pass over the train pairs)")
    batch_size: int = setting(16, "pairs per optimizer step and process (each pair is two sequences)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-5, "peak learning rate (AdamW, linear decay)")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    center_rewards: float = setting(0.01, "weight of mean(r²) in the loss (TRL's center_rewards_coefficient; 0: off)")
    eval_every: int = setting(0, "also evaluate the held-out pairs (TRL's running metrics) every this many steps "
                                 "(0: only the final evaluation)")
    save_every: int = setting(200, "write a resumable checkpoint every this many steps (0: none)")
    eval_batch: int = setting(32, "pairs per batch when scoring the held-out pairs")
    seed: int = setting(0, "seed of the scalar head's initialisation and the pair order")
    precision: str = setting("auto", "auto: bf16 autocast on a GPU that supports it, else float32", choices=PRECISIONS)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_base(base: Path) -> Tokenizer:
    """BASE must be a Hugging Face Gemma 2 directory with its tokenizer.model; returns the tokenizer."""
    base = Path(base)
    if not base.is_dir():
        raise PipelineError(f"BASE={base}: no such directory; pass a Hugging Face Gemma 2 directory (the teacher or a "
                            "finished student)")
    raw = read_json(base / "config.json", "BASE needs a Hugging Face Gemma 2 config.json")
    if raw.get("model_type") != "gemma2":
        raise PipelineError(f"{base / 'config.json'}: model_type is {raw.get('model_type')!r}; the reward model starts "
                            "from a Gemma 2 directory (model_type gemma2)")
    if not (base / "tokenizer.model").is_file():
        raise PipelineError(f"{base}: no tokenizer.model; copy the SentencePiece tokenizer the model was trained with "
                            "into it")
    from pipeline.checkpoint import weight_files

    weight_files(base)  # one line when the weights are missing or pickled
    return Tokenizer.load(base / "tokenizer.model")


def train_reward_model(preferences: Path, base: Path, out: Path, cfg: RewardTrainConfig = RewardTrainConfig(),
                       data_cfg: PreferenceConfig = PreferenceConfig(),
                       filters: FilterConfig = FilterConfig()) -> dict[str, Any]:
    """Builds the preference shards, trains (or resumes, or skips a finished folder) and evaluates; returns
    the contents of finished.json."""
    _offline()
    out, base, preferences = Path(out), Path(base), Path(preferences)
    if cfg.max_steps < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.eval_batch < 1:
        raise PipelineError("--max-steps must be >= 0 and --batch-size/--grad-accum/--eval-batch >= 1")
    tokenizer = check_base(base)
    started = time.time()
    from pipeline.rlhf import last_checkpoint, process_state
    from pipeline.train import _trim_metrics

    state = process_state()  # under LAUNCH: accelerate's processes, shared with the Trainer below
    if preferences.is_dir():  # built by `make tokens FORMAT=preference`: used as it is
        data_dir, data = preferences, built_preferences(preferences, tokenizer)
    else:
        data_dir = out / DATA
        # The main process builds the shards; the others then find the build complete and only read it (all at
        # once, they would delete each other's shards).
        with state.main_process_first():
            data = build_preferences(preferences, tokenizer, data_dir, data_cfg, filters, threads=os.cpu_count() or 1)
    counts = data["train"].counts
    summary = {k: counts.get(k, 0) for k in ("rows", "kept", "train", "val")}
    print(json.dumps({"preferences": {k: v for k, v in counts.items() if v}}), flush=True)
    if data["train"].rows < MIN_TRAIN_PAIRS or data["val"].rows < 1:
        raise PipelineError(
            f"{preferences}: {data['train'].rows} train and {data['val'].rows} held-out pairs after dropping bad rows "
            f"and filtering ({summary}); need at least {MIN_TRAIN_PAIRS} and 1: give more pairs (or change "
            "--val-fraction)")
    run_config = _run_config(preferences, base, out, data, cfg, data_cfg)
    if (out / FINISHED).is_file():
        changed = _changed(read_json(out / RUN_CONFIG, "the finished reward model's settings"), run_config)
        if not changed:
            print(f"{out}: a finished reward model with these settings; nothing to do", flush=True)
            return read_json(out / FINISHED, "the finished reward model's metrics")
        raise PipelineError(f"{out}: a finished reward model made with other settings ({', '.join(changed)}); pass "
                            "another REWARD_MODEL= (--out) or delete it")
    checkpoints = out / CHECKPOINTS
    resume = last_checkpoint(checkpoints)
    if resume is not None and (out / RUN_CONFIG).is_file():
        changed = _changed(read_json(out / RUN_CONFIG, "the interrupted run's settings"), run_config)
        if changed:
            raise PipelineError(f"{out}: an interrupted run with other settings ({', '.join(changed)}); rerun it with "
                                f"its settings, or delete {checkpoints} to start over")
    if state.is_main_process:  # the other processes only read the folder
        write_json(out / RUN_CONFIG, run_config)
    state.wait_for_everyone()
    trainer = _trainer(base, tokenizer, data_dir, out, cfg)
    if state.is_main_process:  # the one process that logs (the Metrics callback: world process zero)
        if resume is not None:
            print(f"resuming from {resume}", flush=True)
            _trim_metrics(out / METRICS, int(resume.name.split("-")[-1]))
        elif (out / METRICS).is_file():
            (out / METRICS).unlink()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    model = trainer.model
    if not trainer.is_world_process_zero():
        return {}
    model.eval()
    chosen, rejected = score_shards(model, shard_paths(data_dir / "val"), cfg.eval_batch)
    margin = chosen - rejected
    final = {
        "eval_accuracy": float((margin > 0).mean()), "eval_margin": float(margin.mean()),
        "eval_pairs": int(len(margin)), "eval_reward_chosen": float(chosen.mean()),
        "eval_reward_rejected": float(rejected.mean()), "train_pairs": data["train"].rows,
        "steps": int(trainer.state.global_step), "epochs": float(trainer.state.epoch or 0.0),
        "data": {k: v for k, v in counts.items() if v}, "wall_s": round(time.time() - started, 1),
        "base": str(base),
    }
    _save(model, tokenizer, base, out)
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": final["steps"], "final_eval_accuracy": final["eval_accuracy"],
                            "final_eval_margin": final["eval_margin"]}) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)
    shutil.rmtree(out / DATA / HF_CACHE, ignore_errors=True)  # the datasets library's Arrow copy of the shards
    if data_dir != out / DATA:  # the shards were read in place: nothing of ours is left in data/
        shutil.rmtree(out / DATA, ignore_errors=True)
    write_json(out / FINISHED, final)  # last: the folder is a finished reward model
    return final


def _run_config(preferences: Path, base: Path, out: Path, data: dict[str, Any], cfg: RewardTrainConfig,
                data_cfg: PreferenceConfig) -> dict[str, Any]:
    import transformers
    import trl

    from pipeline.capture import teacher_hashes
    from pipeline.checkpoint import model_fingerprint

    # BASE's file hashes are cached beside it (else in `out`), as every stage caches a model's: a rerun (and the
    # "already finished" check) does not read its weights again.
    fingerprint = model_fingerprint(base, file_hash=teacher_hashes(base, out))
    return {
        "stage": "reward_model", "base": str(base), "base_fingerprint": fingerprint,
        "preferences": str(preferences),
        "data": {s: {"pairs": data[s].rows, "sha256": [sh.sha256 for sh in data[s].shards]} for s in SPLITS},
        "data_settings": dataclasses.asdict(data_cfg), "filters": data["train"].meta.filters,
        "train": dataclasses.asdict(cfg), "model_class": "Gemma2ForSequenceClassification", "num_labels": 1,
        "pad_token_id": PAD, "loss": "bradley-terry (trl.RewardTrainer)",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
    }


# Settings a resume (or a rerun on a finished folder) may change: they do not decide the trajectory (paths are
# informative: the data and BASE are identified by their sha256s and fingerprint).
RESUMABLE = ("train.eval_every", "train.save_every", "train.eval_batch", "preferences", "base", "versions")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k in ("train", "data_settings"):
            out += [f"{k}.{n}" for n in sorted(a.keys() | b.keys()) if a.get(n) != b.get(n)]
        elif a != b:
            out.append(k)
    return [c for c in out if c not in RESUMABLE]


def _precision(cfg: RewardTrainConfig) -> bool:
    import torch

    if cfg.precision == "bf16":
        if not torch.cuda.is_available():
            raise PipelineError("--precision bf16 needs a GPU here (the CPU trains in float32); use auto")
        return True
    return cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def built_preferences(folder: Path, tokenizer: Tokenizer) -> dict[str, PreferencesManifest]:
    """The two splits of a `make tokens FORMAT=preference` folder, refused when BASE's tokenizer is another."""
    data = {s: read_preferences_manifest(folder / s) for s in SPLITS}
    meta = data["train"].meta
    if meta.tokenizer_fingerprint != tokenizer.fingerprint:
        raise PipelineError(f"{folder}: tokenized with another tokenizer than BASE's tokenizer.model ({meta.source}); "
                            "rebuild it with `make tokens FORMAT=preference TOKENIZER=<BASE>/tokenizer.model`, or pass "
                            "the preference file itself as PREFERENCES")
    return data


def _trainer(base: Path, tokenizer: Tokenizer, data_dir: Path, out: Path, cfg: RewardTrainConfig) -> Any:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, TrainerCallback, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    datasets.disable_progress_bars()
    cache = out / DATA / HF_CACHE

    def dataset(split: str) -> Any:
        files = [str(p) for p in shard_paths(data_dir / split)]
        ds = datasets.Dataset.from_parquet(files, cache_dir=str(cache), columns=["chosen_ids", "rejected_ids"])
        return ds

    cuda = torch.cuda.is_available()
    set_seed(cfg.seed)  # the scalar head is drawn when the model loads: the same head for the same seed
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=1, dtype=torch.float32, attn_implementation="eager")
    model.config.pad_token_id = PAD
    args = RewardConfig(
        output_dir=str(out / CHECKPOINTS), max_steps=cfg.max_steps or -1, num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, lr_scheduler_type="linear", seed=cfg.seed, data_seed=cfg.seed,
        center_rewards_coefficient=cfg.center_rewards or None, max_length=None,
        logging_steps=max(1, min(10, cfg.max_steps // 10)) if cfg.max_steps else 10,
        eval_strategy="steps" if cfg.eval_every else "no", eval_steps=cfg.eval_every or None,
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500, save_total_limit=1,
        report_to="none", bf16=_precision(cfg), fp16=False, gradient_checkpointing=cuda, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=True, push_to_hub=False, save_only_model=False,
    )

    class Metrics(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if state.is_world_process_zero and logs:
                with open(out / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset("train"),
                            eval_dataset=dataset("val") if cfg.eval_every else None,
                            processing_class=vocab_tokenizer(tokenizer), callbacks=[Metrics()])
    # The stand-in tokenizer only told TRL the pad token; checkpoints must not carry it as if it could encode.
    trainer.processing_class = None
    return trainer


def vocab_tokenizer(tokenizer: Tokenizer) -> Any:
    """A transformers tokenizer holding our vocabulary and Gemma's special tokens, for what TRL asks of a
    processing class (the pad token and its id): the data is already tokenized, so it never encodes. (A
    real conversion of the SentencePiece model needs protobuf; the project reads tokenizer.model itself.)"""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tokenizer.piece(i): i for i in range(tokenizer.vocab_size)}
    hf = HFTokenizer(WordLevel(vocab, unk_token=tokenizer.piece(3)))
    return PreTrainedTokenizerFast(tokenizer_object=hf, pad_token=tokenizer.piece(PAD), eos_token=tokenizer.piece(1),
                                   bos_token=tokenizer.piece(2), unk_token=tokenizer.piece(3))


def _save(model: Any, tokenizer: Tokenizer, base: Path, out: Path) -> None:
    """config.json + model.safetensors (float32, as trained) and BASE's tokenizer.model."""
    (out / "config.json").unlink(missing_ok=True)
    model = getattr(model, "module", model)
    model.config.pad_token_id = PAD
    model.save_pretrained(str(out), safe_serialization=True)
    shutil.copyfile(base / "tokenizer.model", out / "tokenizer.model")


def score_ids(model: Any, sequences: list[list[int]], batch: int = 32) -> np.ndarray:
    """The reward of each token sequence (`<bos>` first, as `template_ids` makes them), right-padded in
    batches of similar length."""
    import torch

    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in sequences], kind="stable")
    rewards = np.zeros(len(sequences), np.float64)
    with torch.no_grad():
        for a in range(0, len(order), batch):
            take = order[a: a + batch]
            width = max(len(sequences[i]) for i in take)
            ids = torch.full((len(take), width), PAD, dtype=torch.long)
            mask = torch.zeros((len(take), width), dtype=torch.long)
            for row, i in enumerate(take):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            rewards[take] = logits.float().squeeze(-1).cpu().numpy()
    return rewards


def score_shards(model: Any, paths: list[Path], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of every pair's chosen and rejected sequence in preference shards, shard by shard."""
    import pyarrow.parquet as pq

    chosen, rejected = [], []
    for path in paths:
        for group in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["chosen_ids", "rejected_ids"]):
            chosen.append(score_ids(model, group.column("chosen_ids").to_pylist(), batch))
            rejected.append(score_ids(model, group.column("rejected_ids").to_pylist(), batch))
    return (np.concatenate(chosen), np.concatenate(rejected)) if chosen else (np.zeros(0), np.zeros(0))
