"""Sampling from a trained model: greedy, temperature and top-p (nucleus), with a seed. No KV cache: each
new token re-runs the whole sequence through the model's document-masked forward (`<bos>` starts the one
document), which is the forward the model was trained with. A chat-trained model (its training data was
`format` chat) gets the prompt in Gemma's chat template and stops at `<end_of_turn>`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.chat import normalize, prompt_ids
from pipeline.errors import PipelineError
from pipeline.fsutil import read_json
from pipeline.model import Gemma2
from pipeline.settings import setting
from pipeline.tokenizer import BOS, EOS, Tokenizer
from schemas.tokens import document_ids


@dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = setting(64, "tokens to generate at most")
    temperature: float = setting(0.0, "softmax temperature; 0: greedy (the most likely token)")
    top_p: float = setting(1.0, "nucleus sampling: draw from the smallest set of tokens whose probability reaches "
                                "this (1: all)")
    seed: int = setting(0, "seed of the draws")

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 0:
            raise PipelineError(f"--temperature {self.temperature} must be ≥ 0, --top-p {self.top_p} in (0, 1], "
                                f"--max-new-tokens {self.max_new_tokens} ≥ 0")


def next_token(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> int:
    """One token from [V] float logits: the argmax (temperature 0), else a draw from the tempered
    distribution restricted to its top-p nucleus (the most likely tokens until their mass reaches top_p)."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / cfg.temperature, -1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # the mass of the more likely tokens
        sorted_p[before >= cfg.top_p] = 0  # the token that reaches top_p stays in, the rest go
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(model: Gemma2, prompt: list[int], cfg: SampleConfig, stop: tuple[int, ...] = (EOS,)) -> list[int]:
    """The new tokens after `prompt` (which starts with `<bos>`), up to a stop token (included) or
    max_new_tokens, and never past the model's max_position_embeddings."""
    if not prompt or prompt[0] != BOS:
        raise PipelineError("a prompt starts with <bos>")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = list(prompt)
    limit = min(len(ids) + cfg.max_new_tokens, model.config.max_position_embeddings)
    while len(ids) < limit:
        x = torch.tensor([ids], device=device)
        logits = model(x, document_ids(x))[0, -1].float().cpu()
        token = next_token(logits, cfg, generator)
        ids.append(token)
        if token in stop or token == BOS:  # a new <bos> would begin another document
            break
    return ids[len(prompt):]


def chat_trained(model_dir: Path) -> bool | None:
    """Whether a model folder was trained on chat data: its run_config records the data's `format` (older
    runs: the data's manifest, if still there; a merged model: its first input's). None when that cannot be
    told."""
    merge = model_dir / "merge_config.json"
    if merge.is_file():
        inputs = read_json(merge, "the merge settings").get("inputs") or []
        return chat_trained(Path(inputs[0])) if inputs else None
    run = model_dir / "run_config.json"
    if not run.is_file():
        return None
    recorded = read_json(run, "the run's settings").get("cache", {}).get("format")
    if recorded is not None:
        return recorded == "chat"
    data = Path(read_json(run, "the run's settings")["data"]) / "train" / "manifest.json"
    if not data.is_file():
        return None
    return read_json(data, "the training data's manifest")["meta"].get("format", "text") == "chat"


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool, system: str = "") -> tuple[list[int], tuple[int, ...]]:
    """The prompt's ids and the stop tokens: the chat template ending with the model's turn header (stop at
    `<end_of_turn>` or `<eos>`), or `<bos>` and the plain text (stop at `<eos>`)."""
    if not chat:
        return [BOS, *tokenizer.encode(prompt)], (EOS,)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    turns = normalize([*messages, {"role": "user", "content": prompt}], lambda: "--prompt")
    return prompt_ids(tokenizer, turns), (tokenizer.chat_ids()[1], EOS)
