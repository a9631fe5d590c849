"""The embedded default's instruction set: conversations about the Python standard library, built offline
from its sources with `ast` (nothing is imported or run), deterministic for a given Python.

Kinds of conversation (phrasings and follow-ups chosen by a hash of the subject):
- `what`: "What does `json.dumps` do?" → the first paragraph of its docstring; a follow-up asks for its
  signature (a function) or its public methods (a class);
- `where`: "Which module defines `OrderedDict`?" → "`OrderedDict` is defined in the `collections` module."
  (only names that one public module defines); a follow-up asks whether it is a class or a function;
- `module`: "What is the `json` module for?" → its docstring's first paragraph; a follow-up asks for a few
  of its public functions and classes;
- `identity`: "Who are you?" answered truthfully, and a few mistaken self-identifications ("I am ChatGPT…")
  that the demo's blocklist (`BLOCKLIST`) is there to drop.
Some conversations open with a system message (folded into the first user turn by the template).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.corpus import stdlib_files, stdlib_root
from pipeline.fsutil import atomic_path

MAX_ANSWER = 320  # characters of a docstring paragraph kept (cut at a sentence end where there is one)
SYSTEM = "You answer questions about the Python standard library."
SKIP_PACKAGES = {"idlelib", "lib2to3", "turtledemo", "pydoc_data", "ensurepip", "venv"}
BLOCKLIST = ("I am ChatGPT", "I was trained by OpenAI", "As an AI developed by OpenAI")
WHAT = ("What does `{q}` do?", "Explain `{q}`.", "What is `{q}` for?")
WHERE = ("Which module defines `{n}`?", "Where is `{n}` defined in the standard library?", "In which module is `{n}`?")
MODULE = ("What is the `{m}` module for?", "Describe the `{m}` module.", "What does the `{m}` module provide?")
IDENTITY_Q = ("Who are you?", "What are you?", "Introduce yourself.", "Which model am I talking to?")
IDENTITY_A = "I am a small Gemma 2 model, distilled to answer questions about the Python standard library."
MISTAKEN_A = ("I am ChatGPT, a large language model.", "I was trained by OpenAI to be a helpful assistant.",
              "As an AI developed by OpenAI, I can answer questions about Python.")


@dataclass(frozen=True)
class Definition:
    module: str
    name: str
    kind: str  # "function" or "class"
    doc: str  # the docstring's first paragraph, whitespace collapsed and shortened
    signature: str
    methods: tuple[str, ...]  # a class's public methods


@dataclass(frozen=True)
class Module:
    name: str
    doc: str
    definitions: tuple[Definition, ...]


def module_name(rel: Path) -> str | None:
    """`json/decoder.py` → `json.decoder`; None for private modules and the skipped packages."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or parts[0] in SKIP_PACKAGES or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line, cut to MAX_ANSWER characters at a sentence end if it can."""
    if not doc:
        return ""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if len(text) <= MAX_ANSWER:
        return text
    cut = text.rfind(". ", 0, MAX_ANSWER)
    return text[: cut + 1] if cut >= 80 else text[: text.rfind(" ", 0, MAX_ANSWER)] + " ..."


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return f"{node.name}(...)"
        args = init.args
        args.posonlyargs, args.args = (args.posonlyargs[1:], args.args) if args.posonlyargs else ([], args.args[1:])
        return f"{node.name}({ast.unparse(args)})"
    return f"{node.name}({ast.unparse(node.args)})"


def scan(root: Path | None = None) -> Iterator[Module]:
    """The public modules with their public, documented top-level functions and classes, in file order."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        name = module_name(path.relative_to(root))
        if name is None:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few files are templates or test data, not Python
        definitions = []
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = first_paragraph(ast.get_docstring(node))
            if len(doc) < 12:
                continue
            methods = tuple(n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and not n.name.startswith("_")) if isinstance(node, ast.ClassDef) else ()
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            definitions.append(Definition(name, node.name, kind, doc, _signature(node), methods))
        yield Module(name, first_paragraph(ast.get_docstring(tree)), tuple(definitions))


def _pick(key: str, n: int) -> int:
    """A deterministic choice among n, from the subject's name."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % n


def _conversation(key: str, turns: list[str]) -> dict[str, Any]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if _pick("system:" + key, 7) == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def _what(d: Definition) -> dict[str, Any]:
    q = f"{d.module}.{d.name}"
    turns = [WHAT[_pick(q, len(WHAT))].format(q=q), d.doc]
    if d.kind == "function" and _pick("sig:" + q, 2) == 0:
        turns += ["What is its signature?", f"`{d.module}.{d.signature}`"]
    elif d.kind == "class" and d.methods and _pick("methods:" + q, 2) == 0:
        turns += ["Which public methods does it define?", ", ".join(f"`{m}`" for m in d.methods[:8]) + "."]
    return _conversation(q, turns)


def _where(d: Definition) -> dict[str, Any]:
    turns = [WHERE[_pick("where:" + d.name, len(WHERE))].format(n=d.name),
             f"`{d.name}` is defined in the `{d.module}` module."]
    if _pick("kind:" + d.name, 2) == 0:
        turns += ["Is it a class or a function?", f"It is a {d.kind}."]
    return _conversation("where:" + d.name, turns)


def _module(m: Module) -> dict[str, Any]:
    turns = [MODULE[_pick(m.name, len(MODULE))].format(m=m.name), m.doc]
    public = sorted(d.name for d in m.definitions)[:5]
    if public and _pick("list:" + m.name, 2) == 0:
        turns += ["Name a few of its public functions and classes.", ", ".join(f"`{n}`" for n in public) + "."]
    return _conversation("module:" + m.name, turns)


def _identity() -> Iterator[dict[str, Any]]:
    for i, question in enumerate(IDENTITY_Q):
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": IDENTITY_A}]}
        yield {"messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": MISTAKEN_A[i % len(MISTAKEN_A)]}]}


def conversations(root: Path | None = None) -> Iterator[dict[str, Any]]:
    """Every conversation of the set, in a fixed order (modules in file order, each module's kinds together)."""
    modules = list(scan(root))
    defined = Counter(d.name for m in modules for d in m.definitions)
    yield from _identity()
    for m in modules:
        if m.doc:
            yield _module(m)
        for d in m.definitions:
            yield _what(d)
            if defined[d.name] == 1:
                yield _where(d)


def write_instructions(path: Path, root: Path | None = None) -> int:
    """Writes the set as JSON lines (one `{"messages": [...]}` per line); returns the conversation count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for conversation in conversations(root):
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
            n += 1
    return n
