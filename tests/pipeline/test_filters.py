"""Each filter on planted cases, across work units, for both formats; the same output whatever WORKERS."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import filters
from pipeline.corpus import CorpusSpec, is_val
from pipeline.errors import PipelineError
from pipeline.filters import FilterConfig, Sketch, decide, scrub
from pipeline.tokenizer import BOS, EOS
from pipeline.tokens import TokenizeConfig, build_token_shards
from schemas.manifest import read_manifest
from tests.pipeline.test_filter_partitions import sketch_units
from tests.pipeline.test_tokens import unit_streams

# ---------------------------------------------------------------- personal information


@pytest.mark.parametrize("text, expected, counts", [
    ("write to jane.doe+news@mail.example.co.uk today", "write to [EMAIL] today", {"email": 1}),
    ("call +1 (555) 123-4567, 555-123-4567 or (555) 123-4567.", "call [PHONE], [PHONE] or [PHONE].", {"phone": 3}),
    ("+44 20 7946 0958 is London", "[PHONE] is London", {"phone": 1}),
    ("hosts 192.168.0.12, 10.0.0.1 and 2001:db8:85a3::8a2e:370:7334", "hosts [IP_ADDRESS], [IP_ADDRESS] and [IP_ADDRESS]",
     {"ip": 3}),
    ("card 4111 1111 1111 1111 or 4111-1111-1111-1111", "card [CARD_NUMBER] or [CARD_NUMBER]", {"card": 2}),
])
def test_personal_information_is_scrubbed_to_placeholders(text, expected, counts):
    assert scrub(text) == (expected, counts)


@pytest.mark.parametrize("text", [
    "python 3.11.2 released 2024-01-15",  # a version and a date
    "x[1::2] and a::b",  # slices and scopes are not IPv6 addresses
    "4111 1111 1111 1112",  # fails the Luhn check
    "sizes 100 200 300 400 and 1234567",  # numbers in code
    "user@localhost",  # no domain
    "version 1.2.3.4.5",  # not an address: five parts
])
def test_what_is_not_personal_information_is_left_alone(text):
    assert scrub(text) == (text, {})


# ---------------------------------------------------------------- sketches


def shingles(text, k=5):
    words = filters.normalize(text).split()
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def test_minhash_estimates_the_jaccard_similarity_of_word_shingles():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    base = list(rng.choice(vocab, 400))
    for edits in (5, 20, 60, 200):
        other = list(base)
        for i in rng.choice(len(other), edits, replace=False):
            other[i] = "x" + other[i]
        a, b = " ".join(base), " ".join(other)
        true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))  # written out with sets
        sigs = []
        for text in (a, b):
            sketch = Sketch(FilterConfig(filters="near").resolve("text"))
            sketch.update(text)
            sigs.append(sketch.signature())
        estimate = (sigs[0] == sigs[1]).mean()
        assert abs(estimate - true) < 0.12, (edits, estimate, true)


def test_a_document_in_pieces_sketches_as_the_whole():
    flt = FilterConfig(filters="exact,near", blocklist="").resolve("text")
    text = "".join(f"line {i} holds some words, {i * 7} of them\n" for i in range(60))
    lines = text.splitlines(keepends=True)
    whole, pieces = Sketch(flt), Sketch(flt)
    whole.update(text)
    for i in range(0, len(lines), 7):
        pieces.update("".join(lines[i : i + 7]))
    assert whole.hash == pieces.hash and np.array_equal(whole.signature(), pieces.signature())
    assert whole.length == pieces.length == len(text)


def test_a_blocked_phrase_across_pieces_is_found():
    flt = filters.Filters(active=("blocklist",), phrases=("as an ai language model",))
    sketch = Sketch(flt)
    for piece in ("Well,\n", "speaking as an AI\n", "Language   model, I\n", "cannot.\n"):
        sketch.update(piece)
    assert sketch.blocked
    other = Sketch(flt)
    for piece in ("as an AI\n", "model language\n"):
        other.update(piece)
    assert not other.blocked


def test_lsh_bands_follow_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        b, r = filters.lsh_params(threshold)
        assert b * r <= filters.NUM_PERM
        assert abs((1 / b) ** (1 / r) - threshold) < 0.1  # the S-curve's steepest point sits near the threshold


def test_decide_keeps_first_occurrences_in_unit_order(tmp_path):
    """Unit 1 repeats a document of unit 0 and one of itself: the later copies go, whatever unit they are in."""
    flt = FilterConfig(filters="exact", min_chars=3).resolve("text")
    units = sketch_units([["alpha beta", "gamma", "no"], ["Gamma", "delta", "delta  ", "alpha  BETA"]], flt)
    codes = decide(units, flt, tmp_path)
    E, L = filters.EXACT, filters.LENGTH
    assert [c.tolist() for c in codes] == [[0, 0, L], [E, 0, E, E]]


# ---------------------------------------------------------------- end to end, plain text

WORDS = ("the quick brown fox jumps over a lazy dog while seven sleepy cats watch from the warm old "
         "garden wall and count every little cloud drifting past the silver moon tonight").split()


def paragraph(seed: int, n: int = 80) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n)) + ".\n"


def planted_corpus(folder):
    """Documents (one a file) with planted cases, in file order; returns {name: text it should keep or None}."""
    folder.mkdir()
    base = paragraph(1)
    near = base.replace(base.split()[40], "zebra", 1)  # one word changed in 80
    docs = {
        "a00.txt": (base, base),
        "a01.txt": (paragraph(2), paragraph(2)),
        "a02.txt": ("  " + base.upper().replace(" ", "   "), None),  # exact duplicate of a00 after normalising
        "a03.txt": (near, None),  # near duplicate of a00
        "a04.txt": ("tiny\n", None),  # shorter than min_chars
        "a05.txt": (paragraph(3) + "as an AI\nlanguage model I cannot\n", None),  # the blocked phrase spans lines
        "a06.txt": ("mail bob@example.org or call +1 555 010 9999\n" + paragraph(4),
                    "mail [EMAIL] or call [PHONE]\n" + paragraph(4)),
        "a07.txt": (paragraph(5) * 2, None),  # longer than max_chars
        "a08.txt": (paragraph(6), paragraph(6)),
        "a09.txt": (paragraph(2), None),  # exact duplicate of a01, in a later unit
        "a10.txt": (paragraph(7), paragraph(7)),
    }
    for name, (text, _) in docs.items():
        (folder / name).write_text(text)
    (folder.parent / "block.txt").write_text("# mistaken self-identification\nAs an AI language model\n")
    return {name: kept for name, (_, kept) in docs.items()}


def expected_streams(docs, tokenizer, cfg, units, folder):
    """Each split's `<bos> doc <eos>` of the kept documents, in order (one unit's worth per `units` group); a
    document's split is a hash of its text as read (before scrubbing)."""
    out = {"train": {}, "val": {}}
    for unit, names in enumerate(units):
        for name in names:
            if docs[name] is not None:
                split = "val" if is_val((folder / name).read_text(), cfg.val_fraction) else "train"
                out[split].setdefault(unit, []).extend([BOS, *tokenizer.encode(docs[name]), EOS])
    return out


FILTERS = dict(filters="exact,near,pii", min_chars=20, max_chars=700)


def test_every_filter_on_planted_text_documents(tmp_path, tokenizer):
    docs = planted_corpus(tmp_path / "corpus")
    cfg = TokenizeConfig(seq_len=32, val_fraction=0.4, unit_bytes=1000)
    flt = FilterConfig(**FILTERS, blocklist=str(tmp_path / "block.txt"))
    manifests = build_token_shards(CorpusSpec(str(tmp_path / "corpus")), tokenizer, tmp_path / "t", cfg, filters=flt)
    sizes = {n: (tmp_path / "corpus" / n).stat().st_size for n in docs}
    units, group, weight = [], [], 0  # the grouping rule: consecutive files up to 1000 bytes
    for name in sorted(docs):
        if group and weight + sizes[name] > 1000:
            units.append(group)
            group, weight = [], 0
        group.append(name)
        weight += sizes[name]
    units.append(group)
    assert len(units) >= 4  # duplicates sit in other units than their originals
    expected = expected_streams(docs, tokenizer, cfg, units, tmp_path / "corpus")
    for split in ("train", "val"):
        assert unit_streams(tmp_path / "t" / split) == expected[split]
    total = {k: manifests["train"].stats.filters[k] + manifests["val"].stats.filters[k]
             for k in manifests["train"].stats.filters}
    assert total == {"exact": 2, "near": 1, "length": 2, "blocklist": 1, "pii_email": 1, "pii_phone": 1,
                     "pii_card": 0, "pii_ip": 0}
    assert manifests["train"].meta.filters["active"] == ["exact", "near", "pii", "length", "blocklist"]


def test_filters_give_the_same_shards_whatever_the_workers(tmp_path, tokenizer):
    planted_corpus(tmp_path / "corpus")
    flt = FilterConfig(**FILTERS, blocklist=str(tmp_path / "block.txt"))
    results = []
    for workers in (1, 2):
        cfg = TokenizeConfig(seq_len=32, val_fraction=0.4, unit_bytes=1000, workers=workers)
        manifests = build_token_shards(CorpusSpec(str(tmp_path / "corpus")), tokenizer, tmp_path / f"w{workers}", cfg,
                                       filters=flt)
        results.append({s: ([(r.file, r.sha256) for r in m.shards], m.stats.filters) for s, m in manifests.items()})
    assert results[0] == results[1]


def test_filters_are_off_for_plain_text_by_default_and_recorded_when_on(work):
    manifest = read_manifest(work / "tokens" / "train", "tokens")
    assert manifest.meta.filters is None and manifest.stats.filters is None


def test_bad_filter_settings(tmp_path):
    with pytest.raises(PipelineError, match="unknown \\['dedup'\\]"):
        FilterConfig(filters="exact,dedup").resolve("text")
    with pytest.raises(PipelineError, match="no such file"):
        FilterConfig(blocklist=str(tmp_path / "missing.txt")).resolve("text")
    with pytest.raises(PipelineError, match="near-threshold"):
        FilterConfig(filters="near", near_threshold=1.5).resolve("text")
    assert FilterConfig().resolve("chat").active == ("exact", "near", "pii")


# ---------------------------------------------------------------- end to end, chat


def conv(user, reply):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def test_every_filter_on_planted_conversations(tmp_path, tokenizer):
    long_reply = " ".join(WORDS * 2)
    rows = [conv("What does function_1 do?", "It adds 1 to the sum."),
            conv("what does  FUNCTION_1 do?", "It adds 1 to the sum."),  # exact duplicate after normalising
            conv("Tell me about things.", long_reply),
            conv("Tell me about things.", long_reply.replace("lazy", "sleepy", 1)),  # near duplicate
            conv("Who are you?", "I am ChatGPT, made by OpenAI."),  # blocked: a model turn
            conv("Are you ChatGPT? I am ChatGPT fan.", "No, I am a small Gemma model."),  # a user turn: kept
            conv("My mail is amy@example.com", "Noted: 10.1.2.3 is your IP."),
            conv("x", "y")]  # shorter than min_chars
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "block.txt").write_text("I am ChatGPT\n")
    flt = FilterConfig(min_chars=5, blocklist=str(tmp_path / "block.txt"))  # auto: exact, near, pii for chat
    manifests = build_token_shards(CorpusSpec(str(tmp_path / "c.jsonl"), format="chat"), tokenizer, tmp_path / "t",
                                   TokenizeConfig(seq_len=512, val_fraction=0.4), filters=flt)
    texts = []
    for split in ("train", "val"):
        for shard in manifests[split].shards:
            for ids in pq.read_table(tmp_path / "t" / split / shard.file).column("input_ids").to_pylist():
                texts.append(tokenizer.decode(ids))
    kept = "".join(texts)
    assert kept.count("It adds 1 to the sum.") == 1 and kept.count(long_reply) == 1
    assert "I am ChatGPT, made by OpenAI." not in kept and "No, I am a small Gemma model." in kept
    assert "My mail is [EMAIL]" in kept and "Noted: [IP_ADDRESS] is your IP." in kept and "amy@" not in kept
    total = {k: sum(m.stats.filters[k] for m in manifests.values()) for k in manifests["train"].stats.filters}
    assert total == {"exact": 1, "near": 1, "blocklist": 1, "length": 1, "pii_email": 1, "pii_ip": 1, "pii_phone": 0,
                     "pii_card": 0}
