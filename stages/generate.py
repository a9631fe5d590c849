"""`make generate MODEL=… PROMPT=…`: sample a reply from a trained model (a student, the teacher, a merged
model) and print it. A chat-trained model (trained on `format` chat data, as its run_config's data tells)
gets the prompt in Gemma's chat template and answers until `<end_of_turn>`; another model continues the
text. Greedy by default; --temperature and --top-p sample, reproducibly for a --seed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.checkpoint import load_model
from pipeline.errors import PipelineError
from pipeline.generate import SampleConfig, chat_trained, encode_prompt, generate
from pipeline.tokenizer import Tokenizer
from pipeline.train import unfinished
from stages._cli import add_settings, build, parse, run, stage_parser


def parser() -> argparse.ArgumentParser:
    p = stage_parser("generate", __doc__)
    p.add_argument("--model", type=Path, help="a Hugging Face Gemma 2 folder with its tokenizer.model (required)")
    p.add_argument("--prompt", help="the user's message (chat) or the text to continue (required)")
    p.add_argument("--system", default="", help="chat: a system message, folded into the user's turn")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the model was trained on chat data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    p.add_argument("--json", action="store_true", help="print a JSON object (prompt, reply, token ids) instead")
    add_settings(p, SampleConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(), argv)
    if args.model is None or args.prompt is None:
        raise PipelineError("--model and --prompt are required (make generate MODEL=dir PROMPT=\"...\")")
    reason = unfinished(args.model)
    if reason:
        raise PipelineError(reason)
    tokenizer = Tokenizer.load(args.model / "tokenizer.model")
    chat = args.chat if args.chat is not None else bool(chat_trained(args.model))
    prompt, stop = encode_prompt(tokenizer, args.prompt, chat, args.system)
    model = load_model(args.model, dtype=torch.float32, device=args.device)
    new = generate(model, prompt, build(SampleConfig, args), stop)
    reply = tokenizer.decode([t for t in new if t not in stop])
    if args.json:
        print(json.dumps({"chat": chat, "prompt": tokenizer.decode(prompt[1:]), "reply": reply, "ids": new}))
    else:
        print(reply)


if __name__ == "__main__":
    run(main)
