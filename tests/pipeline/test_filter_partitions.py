"""The duplicate filters decided in hash partitions: the same decisions as one process deciding everything in
unit order (an independent reference below, written with dicts), whatever the partition count and the
process count; the records a partition holds bounded by --filter-memory-mb; no memory map held open."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline import filters
from pipeline.corpus import CorpusSpec
from pipeline.errors import PipelineError
from pipeline.filters import EXACT, KEEP, NEAR, FilterConfig, Layout, Sketch, Sketches, decide
from pipeline.tokens import TokenizeConfig, build_token_shards

VOCAB = [f"w{i}" for i in range(400)]


def chain_corpus(seed: int = 0) -> list[list[str]]:
    """Units of documents: unique ones, exact copies (case and spacing changed) of earlier ones in later units,
    and chains of near duplicates — each link one word away from the one before (Jaccard ≈ 0.88 on 80 words),
    so a link two or more words from the chain's head is below 0.8 from it — spread over the units."""
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    chains: list[list[str]] = []
    for _ in range(260):
        r = rng.random()
        if chains and r < 0.45:  # extend a chain by one edit
            chain = chains[rng.integers(len(chains))]
            words = chain[-1].split()
            k = rng.integers(len(words))
            words[k] = "x" + words[k]
            chain.append(" ".join(words))
            docs.append(chain[-1])
        elif docs and r < 0.6:  # an exact copy, as the normaliser sees it
            docs.append("  " + docs[rng.integers(len(docs))].upper().replace(" ", " \n "))
        elif r < 0.65:
            docs.append("short")  # under min_chars
        else:
            chains.append([" ".join(rng.choice(VOCAB, 80))])
            docs.append(chains[-1][0])
    sizes = rng.integers(5, 40, 20)
    cuts = np.minimum(np.cumsum(sizes), len(docs))
    return [docs[a:b] for a, b in zip(np.r_[0, cuts[:-1]], cuts) if b > a]


def sketch_units(units: list[list[str]], flt: filters.Filters) -> list[dict[str, np.ndarray]]:
    out = []
    for texts in units:
        sketches = Sketches()
        for text in texts:
            sketch = Sketch(flt)
            sketch.update(text)
            sketches.add(sketch)
        out.append(sketches.arrays(flt))
    return out


def reference(units: list[dict[str, np.ndarray]], flt: filters.Filters) -> list[list[int]]:
    """One process, document by document in unit order: length; first exact hash wins among the survivors;
    then among the survivors with words, a document goes when, in one of its bands, the earliest document with
    that band's hash has at least the threshold's share of its signature."""
    docs = [(u, d) for u, unit in enumerate(units) for d in range(len(unit["hash"]))]
    codes = {doc: KEEP for doc in docs}
    for u, d in docs:
        if units[u]["length"][d] < flt.min_chars:
            codes[(u, d)] = filters.LENGTH
    first_hash: dict[int, tuple[int, int]] = {}
    for u, d in docs:
        if codes[(u, d)] == KEEP:
            h = int(units[u]["hash"][d])
            if h in first_hash:
                codes[(u, d)] = EXACT
            else:
                first_hash[h] = (u, d)
    alive = [(u, d) for u, d in docs if codes[(u, d)] == KEEP and units[u]["nonempty"][d]]
    bands = units[0]["bands"].shape[1]
    earliest: list[dict[int, tuple[int, int]]] = [{} for _ in range(bands)]
    for u, d in alive:
        for j in range(bands):
            earliest[j].setdefault(int(units[u]["bands"][d, j]), (u, d))
    for u, d in alive:
        for j in range(bands):
            eu, ed = earliest[j][int(units[u]["bands"][d, j])]
            agree = sum(int(a == b) for a, b in zip(units[u]["sig"][d], units[eu]["sig"][ed]))
            if (eu, ed) != (u, d) and agree / filters.NUM_PERM >= flt.near_threshold:
                codes[(u, d)] = NEAR
    return [[codes[(u, d)] for d in range(len(unit["hash"]))] for u, unit in enumerate(units)]


FLT = FilterConfig(filters="exact,near", min_chars=20).resolve("text")


@pytest.mark.parametrize("memory_mb, partitions", [(64.0, 1), (0.1, 8), (0.02, 32), (0.003, 256)])
def test_partitions_decide_as_one_process_on_chains_of_near_duplicates(tmp_path, memory_mb, partitions):
    units = sketch_units(chain_corpus(), FLT)
    expected = reference(units, FLT)
    flat = [c for unit in expected for c in unit]
    assert flat.count(NEAR) >= 20 and flat.count(EXACT) >= 20  # the corpus exercises both, across units
    codes = decide(units, FLT, tmp_path, memory_mb)
    assert len(list((tmp_path / filters.PARTS).glob("*.npy"))) == partitions
    assert [c.tolist() for c in codes] == expected


def test_a_chain_goes_after_its_head_whatever_the_partitions(tmp_path):
    """A chain of six links, each one word from the one before, over three units: every link after the head
    goes, the last too though it is far from the only document kept (the rule compares a document with the
    earliest document of a bucket it shares, kept or not) — decided alike by one partition or eight."""
    rng = np.random.default_rng(3)
    words = list(rng.choice(VOCAB, 80))
    chain = [" ".join(words)]
    for k in (20, 40, 60, 70, 10):
        words[k] = "y" + words[k]
        chain.append(" ".join(words))
    units = sketch_units([chain[:2], chain[2:4], chain[4:]], FLT)
    assert (units[2]["sig"][1] == units[0]["sig"][0]).mean() < FLT.near_threshold  # the last link vs the head
    expected = [[KEEP, NEAR], [NEAR, NEAR], [NEAR, NEAR]]
    assert reference(units, FLT) == expected
    assert [c.tolist() for c in decide(units, FLT, tmp_path / "one", 64.0)] == expected
    assert [c.tolist() for c in decide(units, FLT, tmp_path / "many", 0.002)] == expected
    assert len(list((tmp_path / "many" / filters.PARTS).glob("*.npy"))) >= 8


def test_a_partition_holds_at_most_its_budget_even_when_one_document_repeats_everywhere(tmp_path):
    """800 copies of one document in 20 units: their records share ten keys, so whatever partition holds
    them merges them as it reads the units instead of holding all."""
    text = " ".join(VOCAB[:60])
    units = sketch_units([[text] * 40] * 20 + [[f"{text} {i} and more words here" for i in range(30)]], FLT)
    for i, unit in enumerate(units):
        filters.write_unit(tmp_path, i, unit, FLT)
    records = sum(len(np.load(tmp_path / "sketch" / f"{i:06d}.codes.npy")) for i in range(len(units))) * 10
    layout = Layout.plan(len(units), records, 830, 0.02)
    assert layout.budget < 800  # fewer records than the repeated document has in one slot
    counts = [filters.decide_partition(tmp_path, p, layout, FLT) for p in range(layout.partitions)]
    assert max(c["held"] for c in counts) <= layout.budget
    assert max(c["records"] for c in counts) > layout.budget  # a partition read more than it could hold
    for group in range(layout.groups):
        filters.gather_group(tmp_path, group, layout)
    codes = [np.load(tmp_path / "decisions" / f"{i:06d}.npy").tolist() for i in range(len(units))]
    assert codes[:20] == [[KEEP] + [EXACT] * 39] + [[EXACT] * 40] * 19  # across the merges: the first copy only
    assert codes == reference(units, FLT)


def test_a_budget_below_one_unit_is_refused_by_name(tmp_path):
    units = sketch_units([["same words in every copy of this one"] * 50], FLT)
    with pytest.raises(PipelineError, match=r"filter partition \d+: .* exceed .*--filter-memory-mb"):
        decide(units, FLT, tmp_path, 0.001)
    with pytest.raises(PipelineError, match="--filter-memory-mb 1e-06: too small"):
        FilterConfig(filters="exact", filter_memory_mb=1e-6).resolve("text")


def test_no_memory_map_is_held_while_deciding(tmp_path, monkeypatch):
    units = sketch_units(chain_corpus(1), FLT)
    mapped, read = [], filters._read

    def checked(*args, **kwargs):
        maps = Path("/proc/self/maps").read_text()
        mapped.extend(line for line in maps.splitlines() if str(tmp_path) in line)
        return read(*args, **kwargs)

    monkeypatch.setattr(filters, "_read", checked)
    decide(units, FLT, tmp_path, 0.02)
    assert mapped == []
    assert not [fd for fd in os.listdir("/proc/self/fd")
                if str(tmp_path) in os.path.realpath(f"/proc/self/fd/{fd}")]  # every file closed


def write_corpus(folder: Path) -> None:
    folder.mkdir()
    for u, texts in enumerate(chain_corpus(2)):
        for d, text in enumerate(texts):
            (folder / f"u{u:02d}d{d:02d}.txt").write_text(text + "\n")


def test_one_and_three_workers_write_identical_shards_with_filters(tmp_path, tokenizer):
    """One process and one hash partition against three processes sharing many partitions and groups (a
    budget of 0.003 MiB): the same shards, manifests and decisions (the whole folder, but the partition files)."""
    write_corpus(tmp_path / "corpus")
    spec = CorpusSpec(str(tmp_path / "corpus"))
    results, layouts = {}, {}
    for name, workers, memory_mb in (("one", 1, 1024.0), ("three", 3, 0.003)):
        cfg = TokenizeConfig(seq_len=32, val_fraction=0.3, unit_bytes=3000, workers=workers)
        flt = FilterConfig(filters="exact,near", min_chars=20, filter_memory_mb=memory_mb)
        build_token_shards(spec, tokenizer, tmp_path / name, cfg, filters=flt)
        out = tmp_path / name
        layouts[name] = json.loads((out / "filters" / "layout.json").read_text())
        results[name] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
                         and not {"part", "groups", "layout.json"} & set(p.relative_to(out).parts)}
    assert (layouts["one"]["partitions"], layouts["one"]["groups"]) == (1, 1)
    assert layouts["three"]["partitions"] >= 64 and layouts["three"]["groups"] >= 3
    assert results["one"].keys() == results["three"].keys()
    assert [k for k in results["one"] if results["one"][k] != results["three"][k]] == []
    decisions = [np.load(tmp_path / "one" / "filters" / "decisions" / n) for n in
                 sorted(os.listdir(tmp_path / "one" / "filters" / "decisions"))]
    codes = np.concatenate(decisions)
    assert len(decisions) > 5 and (codes == EXACT).sum() > 10 and (codes == NEAR).sum() > 10
