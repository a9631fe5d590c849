"""Rollouts: a model's own sampled replies to chat prompts, as chat token shards with the sampling model's
log-probabilities (`make rollouts`; the shard contract is in schemas/tokens.py).

Prompts: a JSONL file, one object a line: `messages` (a list of {role, content} whose last turn is the
user's; a leading system message is folded into the first user turn as in pipeline/chat.py) or `prompt`
(and optional `system`). Each is rendered in Gemma's chat template ending with the model's turn header
(`pipeline.chat.prompt_ids`, what `make generate` sends) and goes through the `make tokens` filters of
chat data (pipeline/filters.py): turn markers in a content drop it, personal information is scrubbed, and
exact and near duplicates, length bounds (the prompts' contents) drop prompts in file order, first one
kept. A prompt whose template leaves no room for a reply in SEQ_LEN is dropped (`too_long`).

Generation: transformers' `generate` on the model's Hugging Face directory (`AutoModelForCausalLM`, eager
attention: Gemma 2's soft-capped attention has no SDPA kernel), batches of `batch_size` sequences with
left padding and the KV cache, `ROLLOUTS_PER_PROMPT` samples per prompt. The draw is ours, made inside
`generate` by a logits processor (`Sampler`) that returns a one-hot score, so `generate` (greedy over it)
takes exactly our token: sequence j of prompt i draws its uniforms from its own generator seeded by
hash(seed, i, j), one uniform per step, and picks the token by inverse CDF over the tempered (and top-p
restricted) distribution in float64 — so the random numbers do not depend on the batch, the rank or the
order of work. The same processor records the log-probability of the drawn token under that distribution
(`behaviour_logprob`: at the sampling temperature; with top-p < 1 the nucleus renormalised, the
distribution actually sampled). A reply ends at `<end_of_turn>` or `<eos>` (kept, trained), at `<bos>` or
`<pad>` (a new document or filler: not kept), or at `max_new_tokens` / the window's end.

Batch-size independence: whether a left-padded row of a batch computes bitwise the logits it computes
alone is the kernels' business, not ours. On the CPU (float32) we measured it (README, On-policy rounds;
tests/pipeline/test_rollouts.py checks the shards byte for byte at batch sizes 1, 3 and 5). `batch_size = 1`
is exact by construction (no padding), and is what the output is defined by.

Packing: one conversation per window, `<bos> prompt reply <pad>…` of SEQ_LEN+1 tokens (SEQ_LEN: the
model's `max_position_embeddings` unless set); `loss_mask[t]` = 1 exactly where `input_ids[t+1]` was
generated; `continued` false; window index = prompt index × ROLLOUTS_PER_PROMPT + j (the prompt's line in
the file, so indices do not move when a filter drops another prompt).

Shards of `shard_prompts` kept prompts (× ROLLOUTS_PER_PROMPT windows), `train/train-SSSSS.parquet`, dealt
round-robin to the ranks under LAUNCH; each is written under a temporary name and renamed, then a record
`records/train-SSSSS.json` (its manifest entry and the settings' key) is written. A rerun keeps shards with
a record for these settings. Rank 0 waits for every record (polling the shared folder, no collective) and
writes `train/manifest.json` last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import chat
from pipeline.capture import teacher_hashes
from pipeline.checkpoint import load_config, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.filters import DROPS, KEEP, FilterConfig, Filters, Sketches, decide, scrub_turns, sketch_chat
from pipeline.fsutil import clean_stale_tmp, list_names, sha256_file, write_json
from pipeline.progress import progress
from pipeline.runtime import Runtime
from pipeline.settings import setting
from pipeline.shards import ShardWriter, rows_per_group
from pipeline.tokenizer import BOS, EOS, PAD, Tokenizer
from pipeline.train import model_lineage
from schemas.common import to_json, with_meta
from schemas.manifest import MANIFEST, ShardRecord, TokensStats, read_manifest, write_manifest
from schemas.tokens import TokensMeta, encode, token_schema

ENGINES = ("transformers", "vllm")
RECORDS = "records"  # beside train/: one record per finished shard
POLL_S = 1.0


@dataclass(frozen=True)
class RolloutConfig:
    rollouts_per_prompt: int = setting(4, "replies sampled per prompt")
    max_new_tokens: int = setting(64, "tokens generated per reply at most (and never past the window)")
    temperature: float = setting(1.0, "sampling temperature (1: the model's own distribution)")
    top_p: float = setting(1.0, "nucleus sampling: draw from the smallest set of tokens whose probability reaches "
                                "this (1: all)")
    seed: int = setting(0, "seed of the draws: sequence j of prompt i uses its own generator, seeded by "
                           "hash(seed, i, j)")
    seq_len: int = setting(0, "positions per window (one conversation per window; 0: the model's "
                              "max_position_embeddings)")
    batch_size: int = setting(8, "sequences per generate call (left padding, KV cache)")
    shard_prompts: int = setting(256, "prompts per output shard (each holds this × ROLLOUTS_PER_PROMPT windows)")
    engine: str = setting("transformers", "transformers (generate, CPU or GPU) or vllm (needs vllm and a GPU)",
                          choices=ENGINES)
    dtype: str = setting("float32", "the sampling model's weights and activations", choices=("float32", "bfloat16"))

    def __post_init__(self) -> None:
        if self.rollouts_per_prompt < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.shard_prompts < 1:
            raise PipelineError("--rollouts-per-prompt, --max-new-tokens, --batch-size and --shard-prompts must be ≥ 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise PipelineError(f"--temperature {self.temperature} must be > 0 and --top-p {self.top_p} in (0, 1]")
        if self.seq_len < 0:
            raise PipelineError(f"--seq-len {self.seq_len}: must be ≥ 0 (0: the model's context)")

    def key(self) -> dict[str, Any]:
        """What the shards depend on (batch size, shard size aside: the former does not change them, the latter
        is in the record's file names)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class Prompt:
    index: int  # its line in the prompts file (0-based): fixes its windows' indices and its seeds
    ids: tuple[int, ...]  # `<bos>` and the template up to the model's turn header


# ---------------------------------------------------------------- prompts


def read_prompts(path: Path, tokenizer: Tokenizer, filters: Filters, seq_len: int) -> tuple[list[Prompt], dict[str, int]]:
    """The prompts kept, in file order, and the counts of each drop. Every rank reads the whole file (the
    dropping filters decide in file order); memory: a sketch (~300 bytes) and the ids per prompt."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: no such prompts file; pass PROMPTS= (--prompts) a JSONL of {{\"messages\": "
                            "[...]}} or {\"prompt\": ...} lines")
    counts = {"read": 0, "markers": 0, "too_long": 0, **{f"filter_{name}": 0 for name in DROPS.values()}}
    turns_of: list[tuple[int, tuple[chat.Turn, ...]]] = []
    sketches = Sketches()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            where = lambda n=n: f"{path}:{n + 1}"  # noqa: E731
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{where()}: not a JSON object ({e.msg}); one object a line") from None
            turns = prompt_turns(row, where)
            counts["read"] += 1
            if chat.has_markers(turns):
                counts["markers"] += 1
                continue
            if filters.pii:
                turns, _ = scrub_turns(turns)
            turns_of.append((n, turns))
            sketches.add(sketch_chat(turns, filters))
    codes = np.zeros(len(turns_of), np.int8)
    if filters.drops:
        with tempfile.TemporaryDirectory(prefix="rollout-filters-") as folder:  # decide's working files
            codes = decide([sketches.arrays(filters)], filters, Path(folder))[0]
    tokenizer.chat_ids()  # one clear line for a tokenizer without the turn markers
    kept = []
    for (n, turns), code in zip(turns_of, codes):
        if code != KEEP:
            counts[f"filter_{DROPS[int(code)]}"] += 1
            continue
        ids = chat.prompt_ids(tokenizer, turns)
        if len(ids) >= seq_len:  # at least one generated token must fit the window of seq_len + 1
            counts["too_long"] += 1
            continue
        kept.append(Prompt(n, tuple(ids)))
    counts["kept"] = len(kept)
    return kept, counts


def prompt_turns(row: Any, where: Any) -> tuple[chat.Turn, ...]:
    """A prompts line's conversation: `messages` ending with the user's turn, or `prompt` (and `system`)."""
    if not isinstance(row, dict):
        raise PipelineError(f"{where()}: expected a JSON object with `messages` or `prompt`")
    if row.get("messages") is not None:
        turns = chat.normalize(row["messages"], where)
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        turns = chat.normalize(messages, where)
    else:
        raise PipelineError(f"{where()}: no `messages` list and no `prompt` string (keys: {sorted(row)})")
    if turns[-1].role != "user":
        raise PipelineError(f"{where()}: the last turn is the model's; a prompt ends with the user's turn for the "
                            "model to answer (drop the reply)")
    return turns


# ---------------------------------------------------------------- sampling


def sequence_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt`: 63 bits of sha256, so nearby seeds are unrelated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}:{sample}".encode()).digest()[:8], "little") >> 1


def tempered_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] logits → float64 log-probabilities of the distribution sampled from: softmax(logits / T),
    restricted to the top-p nucleus (the most likely tokens until their mass reaches top_p) and
    renormalised when top_p < 1."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    if top_p < 1:
        sorted_lp, order = logp.sort(dim=-1, descending=True, stable=True)
        p = sorted_lp.exp()
        outside = (p.cumsum(-1) - p) >= top_p  # the token that reaches top_p stays in
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(outside, float("-inf")))
        logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    return logp


def draw(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] tokens by inverse CDF over [B, V] float64 log-probabilities at uniforms u ∈ [0, 1) (token-id order):
    the first id whose cumulative probability exceeds u × the total."""
    cdf = logp.exp().cumsum(-1)
    token = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    vocab = logp.shape[-1]
    last = (vocab - 1) - torch.isfinite(logp).flip(-1).int().argmax(-1)  # u × total rounded up to the total
    return torch.where(token >= vocab, last, token)


class Sampler:
    """A transformers logits processor that draws each row's token itself and returns a one-hot score, so
    greedy `generate` takes that token. Each row's uniforms come from its own generator (drawn up front: one
    per step of its budget), so they do not depend on the batch. Records the tokens and their
    log-probabilities; a row is done after a stop token or its own budget, and gets `<pad>` after (what
    `generate` pads finished rows with). Vectorised over the batch: no Python per token."""

    def __init__(self, seeds: list[int], budgets: list[int], stops: tuple[int, ...], cfg: RolloutConfig,
                 device: torch.device) -> None:
        steps = max(budgets)
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                                     for s in seeds]).to(device)
        self.budgets = torch.tensor(budgets, device=device)
        self.stops = torch.tensor(stops, device=device)
        self.cfg = cfg
        self.step = 0
        self.done = torch.zeros(len(seeds), dtype=torch.bool, device=device)
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = tempered_logprobs(scores, self.cfg.temperature, self.cfg.top_p)
        token = draw(logp, self.uniforms[:, self.step])
        token = torch.where(self.done, PAD, token)
        self.tokens.append(token)
        self.logprobs.append(logp.gather(-1, token[:, None])[:, 0])
        self.step += 1
        self.done |= torch.isin(token, self.stops) | (self.step >= self.budgets)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token[:, None], 0.0)

    def replies(self) -> list[tuple[list[int], list[float]]]:
        """Each row's generated tokens (up to and including its stop token, or its budget) and log-probs."""
        tokens = torch.stack(self.tokens, 1).cpu()
        logprobs = torch.stack(self.logprobs, 1).cpu()
        stopped = torch.isin(tokens, self.stops.cpu())
        out = []
        for row in range(tokens.shape[0]):
            n = int(self.budgets[row])
            hits = torch.nonzero(stopped[row, :n])
            n = int(hits[0, 0]) + 1 if len(hits) else min(n, tokens.shape[1])
            out.append((tokens[row, :n].tolist(), logprobs[row, :n].tolist()))
        return out


def load_sampler_model(model_dir: Path, cfg: RolloutConfig, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise PipelineError(f"{model_dir}: transformers cannot load it as a causal LM ({' '.join(str(e).split())[:200]})"
                            "; pass MODEL= a Hugging Face Gemma 2 directory") from None
    return model.to(device).eval()


@torch.no_grad()
def generate_batch(model: Any, prompts: list[Prompt], samples: list[int], cfg: RolloutConfig, seq_len: int,
                   stops: tuple[int, ...]) -> list[tuple[list[int], list[float]]]:
    """Replies (tokens, log-probs) of (prompts[k], sample samples[k]) pairs: one `generate` call, left padded."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p.ids):] = torch.tensor(p.ids)
        mask[row, width - len(p.ids):] = 1
    budgets = [min(cfg.max_new_tokens, seq_len + 1 - len(p.ids)) for p in prompts]
    sampler = Sampler([sequence_seed(cfg.seed, p.index, j) for p, j in zip(prompts, samples)], budgets, stops, cfg,
                      device)
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(budgets),
                   do_sample=False, logits_processor=LogitsProcessorList([sampler]), eos_token_id=list(stops),
                   pad_token_id=PAD, bos_token_id=BOS, num_beams=1, temperature=None, top_p=None, top_k=None,
                   use_cache=True)
    return sampler.replies()


def load_vllm_engine(model_dir: Path, cfg: RolloutConfig, seq_len: int) -> Any:  # pragma: no cover (needs vllm + GPU)
    """The vLLM engine of the sampling model, built once per process: it loads the weights and reserves the GPU's
    KV cache, so one per shard would redo both."""
    from vllm import LLM

    return LLM(str(model_dir), dtype=cfg.dtype, seed=cfg.seed, max_model_len=seq_len + 1)


def generate_vllm(llm: Any, prompts: list[Prompt], cfg: RolloutConfig, seq_len: int,
                  stops: tuple[int, ...]) -> list[tuple[list[int], list[float]]]:  # pragma: no cover (needs vllm + GPU)
    """vLLM: the same contract (per-sequence seeds, the drawn tokens' log-probs at the sampling temperature);
    its own sampler, so its draws are not ours bit for bit. Untested here: vllm is not installed."""
    from vllm import SamplingParams, TokensPrompt

    requests, params = [], []
    for p in prompts:
        for j in range(cfg.rollouts_per_prompt):
            requests.append(TokensPrompt(prompt_token_ids=list(p.ids)))
            params.append(SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=sequence_seed(
                cfg.seed, p.index, j), max_tokens=min(cfg.max_new_tokens, seq_len + 1 - len(p.ids)),
                stop_token_ids=list(stops), logprobs=0, skip_special_tokens=False, detokenize=False))
    out = []
    for result in llm.generate(requests, params, use_tqdm=False):
        completion = result.outputs[0]
        tokens = list(completion.token_ids)
        out.append((tokens, [float(step[t].logprob) for step, t in zip(completion.logprobs, tokens)]))
    return out


def check_engine(engine: str) -> None:
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise PipelineError("ENGINE=vllm: vllm is not installed (pip install vllm, on a machine with a CUDA GPU); "
                                "or leave ENGINE unset for transformers' generate") from None
        if not torch.cuda.is_available():
            raise PipelineError("ENGINE=vllm needs a CUDA GPU; none is visible here: leave ENGINE unset for "
                                "transformers' generate")


# ---------------------------------------------------------------- packing


def pack(prompt: Prompt, tokens: list[int], logprobs: list[float],
         seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One conversation's window: ids [seq_len+1], loss_mask [seq_len], behaviour log-probs [seq_len]. A reply
    that ended on `<bos>` or `<pad>` (a new document, filler) ends before it."""
    if tokens and tokens[-1] in (BOS, PAD):
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    n, r = len(prompt.ids), len(tokens)
    if n + r > seq_len + 1:
        raise PipelineError(f"prompt {prompt.index}: {n} + {r} tokens exceed the window of {seq_len + 1}")
    ids = np.full(seq_len + 1, PAD, np.int32)
    ids[:n], ids[n : n + r] = prompt.ids, tokens
    mask = np.zeros(seq_len, np.uint8)
    behaviour = np.zeros(seq_len, np.float32)
    mask[n - 1 : n - 1 + r] = 1  # position t predicts ids[t + 1]
    behaviour[n - 1 : n - 1 + r] = logprobs
    return ids, mask, behaviour


# ---------------------------------------------------------------- the stage


def rollouts_meta(model_dir: Path, cfg: RolloutConfig, fingerprint: str) -> dict[str, Any]:
    r = model_lineage(model_dir)[0]  # the sampling model's on-policy round (0: not trained on rollouts)
    return {"model": str(model_dir), "model_fingerprint": fingerprint, "model_round": r, "round": r + 1,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
            "rollouts_per_prompt": cfg.rollouts_per_prompt, "max_new_tokens": cfg.max_new_tokens,
            "engine": cfg.engine}


def shard_name(index: int) -> str:
    return f"train-{index:05d}.parquet"


def run_rollouts(model_dir: Path, prompts_path: Path, out: Path, cfg: RolloutConfig,
                 filters: FilterConfig = FilterConfig(), runtime: Runtime = Runtime()) -> dict[str, Any] | None:
    """Samples the rollouts into `out/train/`; returns a summary on rank 0 (None elsewhere)."""
    check_engine(cfg.engine)
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.model")
    seq_len = cfg.seq_len or config.max_position_embeddings
    if seq_len > config.max_position_embeddings:
        raise PipelineError(f"--seq-len {seq_len} exceeds {model_dir / 'config.json'}'s max_position_embeddings "
                            f"{config.max_position_embeddings}")
    flt = filters.resolve("chat")
    prompts, counts = read_prompts(prompts_path, tokenizer, flt, seq_len)
    if not prompts:
        raise PipelineError(f"{prompts_path}: no prompt left to sample ({counts}); check the file and the filters")
    # The file hashes every stage keeps beside a model (else in `out`): a model is hashed once, whichever stage
    # reads it first.
    fingerprint = model_fingerprint(model_dir, file_hash=teacher_hashes(model_dir, out))
    rollouts = rollouts_meta(model_dir, cfg, fingerprint)
    meta = TokensMeta(seq_len=seq_len, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint,
                      corpus=str(prompts_path), split="train", format="chat", filters=flt.describe(),
                      shard_windows=cfg.shard_prompts * cfg.rollouts_per_prompt, rollouts=rollouts)
    key = hashlib.sha256(json.dumps({"meta": to_json(meta), "cfg": cfg.key(), "prompts": _file_id(prompts_path),
                                     "counts": counts}, sort_keys=True).encode()).hexdigest()[:16]
    train, records = out / "train", out / RECORDS
    shards = [prompts[a : a + cfg.shard_prompts] for a in range(0, len(prompts), cfg.shard_prompts)]
    if runtime.is_main:
        if _finished(train, meta, key, len(shards)):
            print(f"{out}: rollouts with these settings are complete; nothing to do", file=sys.stderr)
            return _summary(read_manifest(train, "tokens"), counts)
        (train / MANIFEST).unlink(missing_ok=True)
    train.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    mine = [s for s in range(len(shards)) if s % runtime.world == runtime.rank]
    todo = [s for s in mine if _record(records, s, key) is None or not (train / shard_name(s)).is_file()]
    if todo:
        clean_stale_tmp(train) if runtime.world == 1 else None  # several ranks: each writes its own names only
        _sample_shards(model_dir, [(s, shards[s]) for s in todo], cfg, seq_len, tokenizer, meta, key, out, runtime)
    if not runtime.is_main:
        return None
    done = _wait_for_records(records, len(shards), key)
    tokenizer.save(out / "tokenizer.model")
    manifest = write_manifest(train, meta, done, TokensStats(max_id=max(r.max_id or 0 for r in done),
                                                           documents=len(prompts) * cfg.rollouts_per_prompt,
                                                           filters=counts))
    return _summary(manifest, counts)


def _file_id(path: Path) -> dict[str, Any]:
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def _summary(manifest: Any, counts: dict[str, int]) -> dict[str, Any]:
    return {"shards": len(manifest.shards), "windows": manifest.rows, "prompts": counts, **manifest.meta.rollouts}


def _finished(train: Path, meta: TokensMeta, key: str, shards: int) -> bool:
    try:
        manifest = read_manifest(train, "tokens")
    except PipelineError:
        return False
    return manifest.meta == meta and len(manifest.shards) == shards and all(
        _record(train.parent / RECORDS, s, key) is not None for s in range(shards))


def _record(records: Path, shard: int, key: str) -> ShardRecord | None:
    path = records / f"{shard_name(shard)}.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("key") != key:
        return None
    return ShardRecord(**raw["shard"])


def _wait_for_records(records: Path, shards: int, key: str) -> list[ShardRecord]:
    """Rank 0: every shard's record of this run (other ranks write theirs; no collective, no timeout)."""
    while True:
        found = [_record(records, s, key) for s in range(shards)]
        failed = sorted(n for n in list_names(records) if n.startswith("failed-rank"))
        for name in failed:
            raw = json.loads((records / name).read_text())
            if raw.get("key") == key:
                raise PipelineError(f"{name.removesuffix('.json')}: {raw.get('error')}")
        if all(r is not None for r in found):
            return found  # type: ignore[return-value]
        time.sleep(POLL_S)


def _sample_shards(model_dir: Path, work: list[tuple[int, list[Prompt]]], cfg: RolloutConfig, seq_len: int,
                   tokenizer: Tokenizer, meta: TokensMeta, key: str, out: Path, runtime: Runtime) -> None:
    stops = (tokenizer.chat_ids()[1], EOS, BOS, PAD)
    model = load_sampler_model(model_dir, cfg, runtime.device) if cfg.engine == "transformers" else None
    schema = with_meta(token_schema(seq_len, chat=True, behaviour=True), meta)
    total = sum(len(p) for _, p in work) * cfg.rollouts_per_prompt
    bar = progress(total=total, desc=f"rollouts[{runtime.rank}]", unit=" seq", position=runtime.rank)
    failure = out / RECORDS / f"failed-rank{runtime.rank}.json"
    failure.unlink(missing_ok=True)
    try:
        if model is None:  # vLLM: built once, inside the try so that rank 0 hears of a failure (as of a shard's)
            model = load_vllm_engine(model_dir, cfg, seq_len)
        for index, prompts in work:
            replies = list(_replies(model, prompts, cfg, seq_len, stops, bar))
            rows = [pack(p, tokens, lps, seq_len) for (p, _), (tokens, lps) in zip(_pairs(prompts, cfg), replies)]
            windows = np.array([p.index * cfg.rollouts_per_prompt + j for p, j in _pairs(prompts, cfg)], np.int64)
            ids = np.stack([r[0] for r in rows])
            path = out / "train" / shard_name(index)
            with ShardWriter(path, schema, rows_per_group(ids.shape[1] * 7, seq_len)) as writer:
                writer.write(encode(windows, ids, np.zeros(len(rows), bool), schema, np.stack([r[1] for r in rows]),
                                    np.stack([r[2] for r in rows])))
            record = ShardRecord(file=path.name, rows=len(rows), tokens=len(rows) * seq_len, bytes=writer.bytes,
                                 sha256=writer.sha256, max_id=int(ids.max()))
            write_json(out / RECORDS / f"{path.name}.json", {"key": key, "shard": to_json(record)})
    except Exception as e:
        if runtime.world > 1:
            write_json(failure, {"key": key, "error": " ".join(str(e).split()) or type(e).__name__})
        raise
    finally:
        bar.close()


def _pairs(prompts: list[Prompt], cfg: RolloutConfig) -> list[tuple[Prompt, int]]:
    return [(p, j) for p in prompts for j in range(cfg.rollouts_per_prompt)]


def _replies(model: Any, prompts: list[Prompt], cfg: RolloutConfig, seq_len: int, stops: tuple[int, ...],
             bar: Any) -> Iterator[tuple[list[int], list[float]]]:
    """Replies of `model`: a transformers causal LM, or the vLLM engine (ENGINE=vllm)."""
    if cfg.engine == "vllm":  # pragma: no cover
        yield from generate_vllm(model, prompts, cfg, seq_len, stops)
        bar.update(len(prompts) * cfg.rollouts_per_prompt)
        return
    pairs = _pairs(prompts, cfg)
    for a in range(0, len(pairs), cfg.batch_size):
        batch = pairs[a : a + cfg.batch_size]
        yield from generate_batch(model, [p for p, _ in batch], [j for _, j in batch], cfg, seq_len, stops)
        bar.update(len(batch))
