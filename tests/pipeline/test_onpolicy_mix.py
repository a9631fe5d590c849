"""The on-policy mix (pipeline/reader.py `Mix`): every optimizer step holds exactly λ of its windows from the
rollout caches, rollout rows train on their generated positions only, the order is deterministic for a seed,
resumes exactly from a cursor, and N ranks × micro-batches see what one process sees; λ = 1 reads no fixed
cache. `make_rollout_cache` builds a rollout cache the way the pipeline does (token shards with
`behaviour_logprob` and `rollouts` metadata, then the teacher pass), from the test corpus's token shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.capture import CaptureConfig, capture
from pipeline.checkpoint import load_model, model_fingerprint
from pipeline.errors import PipelineError
from pipeline.reader import ONPOLICY, Cursor, Mix, ReaderConfig, ShardStream
from pipeline.runtime import Runtime
from pipeline.topk import TopKConfig
from pipeline.train import TrainConfig, micro_counts, onpolicy_windows
from schemas.common import META_KEY, from_json, with_meta
from schemas.logits import decode
from schemas.manifest import TokensStats, read_manifest, shard_record, write_manifest
from schemas.tokens import BEHAVIOUR, TokensMeta, document_ids, token_schema

GENERATED_FROM = 6  # in the test's rollout windows, positions ≥ this are the "generated reply"


def make_rollout_cache(work: Path, sampler: Path, out: Path, model_round: int = 0,
                       capture_cfg: CaptureConfig | None = None, seed: int = 0, per_window: int = 1) -> Path:
    """`out`/tokens: rollout shards of `sampler` made from the work's train token shards: each window's
    positions from GENERATED_FROM on are replaced by the sampler's own continuation, drawn token by token at
    temperature 1 (`<bos>` and `<pad>` excluded, the distribution renormalised: the one sampled), with
    loss_mask 1 and behaviour_logprob its log-prob of each drawn token there, and `rollouts` naming the
    sampler (chat format); `out`/logits: the teacher's pass over them (train split only), as
    `make teacher-logits TOKENS=` runs it. `per_window`: samples drawn from each window's prefix (rollouts per
    prompt), window index = source window × per_window + sample."""
    from pipeline.tokenizer import BOS, PAD

    source = work / "tokens" / "train"
    manifest = read_manifest(source, "tokens")
    model = load_model(sampler).eval()
    info = {"model": str(sampler), "model_fingerprint": model_fingerprint(sampler), "model_round": model_round,
            "round": model_round + 1, "temperature": 1.0, "top_p": 1.0, "seed": seed, "rollouts_per_prompt": per_window,
            "max_new_tokens": manifest.meta.seq_len - GENERATED_FROM, "engine": "test"}
    folder = out / "tokens" / "train"
    folder.mkdir(parents=True)
    records = []
    g = torch.Generator().manual_seed(seed)
    for shard in manifest.shards:
        table = pq.read_table(source / shard.file)
        if per_window > 1:
            windows = table.column("window").to_numpy()
            table = table.take(np.repeat(np.arange(table.num_rows), per_window))
            table = table.set_column(0, "window", pa.array(np.repeat(windows * per_window, per_window)
                                                            + np.tile(np.arange(per_window), len(windows))))
        raw = json.loads(table.schema.metadata[META_KEY])
        meta = dataclasses.replace(from_json(TokensMeta, raw, shard.file), format="chat", rollouts=info)
        ids = torch.as_tensor(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64))
        t_len = ids.shape[1] - 1
        behaviour = torch.zeros(ids.shape[0], t_len)
        with torch.no_grad():
            for t in range(GENERATED_FROM, t_len):
                x = ids[:, : t + 1]
                logits = model(x, document_ids(x))[:, t].float()
                logits[:, [BOS, PAD]] = float("-inf")
                lp = torch.log_softmax(logits, -1)
                y = torch.multinomial(lp.exp(), 1, generator=g).squeeze(1)
                ids[:, t + 1] = y
                behaviour[:, t] = lp.gather(1, y[:, None]).squeeze(1)
        mask = np.zeros((len(ids), t_len), dtype=np.uint8)
        mask[:, GENERATED_FROM:] = 1
        schema = with_meta(token_schema(meta.seq_len, chat=True, behaviour=True), meta)
        new = (table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                                _lists(ids.numpy().astype(np.int32)))
               .append_column("loss_mask", _lists(mask)).append_column(BEHAVIOUR, _lists(behaviour.numpy().astype(np.float16)))
               .select(schema.names).cast(schema))
        pq.write_table(new, folder / shard.file)
        records.append(shard_record(folder / shard.file, len(ids), t_len, max_id=int(ids.max())))
    shared = dataclasses.replace(manifest.meta, format="chat", rollouts=info)
    write_manifest(folder, shared, records, TokensStats(max_id=max(r.max_id for r in records)))
    cache = out / "logits"
    capture(work / "teacher", out / "tokens", cache, capture_cfg or CaptureConfig(TopKConfig(topk=8, samples=4)))
    return cache


def _lists(values: np.ndarray):
    from schemas.common import fixed_lists

    return fixed_lists(values, values.shape[1])


@pytest.fixture(scope="module")
def caches(work, tmp_path_factory):
    from pipeline.checkpoint import save_model
    from pipeline.model import Gemma2, preset

    root = tmp_path_factory.mktemp("mix")
    sampler = root / "sampler"
    model = Gemma2(preset("debug", vocab_size=400))
    model.init_weights(1)
    save_model(model, sampler, tokenizer=work / "teacher" / "tokenizer.model")
    fixed = root / "fixed"
    capture(work / "teacher", work / "tokens", fixed, CaptureConfig(TopKConfig(topk=8, samples=4)))
    return fixed, make_rollout_cache(work, sampler, root / "r1"), sampler


COLUMNS = ("window", "input_ids", "label_mask")


def steps(stream: ShardStream, n: int, accum: int) -> list[list[dict[str, np.ndarray]]]:
    return [[stream.next_batch() for _ in range(accum)] for _ in range(n)]


def mixed(fixed, rollouts, batch, accum, windows, world=1, rank=0, seed=0, cursor=Cursor(), prefetch=0,
          columns=COLUMNS, rollout_columns=COLUMNS):
    mix = Mix((rollouts / "train",), rollout_columns, micro_counts(windows, accum))
    return ShardStream(fixed / "train" if fixed else None, columns, ReaderConfig(batch, 16 * 64, seed, prefetch=prefetch),
                       Runtime(rank=rank, world=world), cursor, mix=mix)


def test_every_step_holds_exactly_lambda_of_its_windows_and_rollouts_train_on_generated_tokens(caches):
    fixed, rollouts, _ = caches
    rollout_windows = set(decode(pq.read_table(next((rollouts / "train").glob("*.parquet"))), ("window",))["window"])
    masks = {}
    for f in (rollouts / "train").glob("*.parquet"):
        d = decode(pq.read_table(f), ("window", "loss_mask", "label_mask"))
        masks.update({w: m for w, m in zip(d["window"], d["label_mask"])})
    for lam, accum in ((0.25, 2), (0.375, 2), (0.5, 3), (0.75, 1)):  # 0.375: 9 windows, micro-batches of 4 and 5
        windows = onpolicy_windows(TrainConfig(onpolicy_fraction=lam), 12 * accum)
        with mixed(fixed, rollouts, 12, accum, windows) as stream:
            for step in steps(stream, 6, accum):
                on = np.concatenate([b[ONPOLICY] for b in step])
                assert on.sum() == lam * 12 * accum  # exact per step, not on average
                for b in step:
                    for w, m in zip(b["window"][b[ONPOLICY]], b["label_mask"][b[ONPOLICY]]):
                        assert np.array_equal(m, masks[w]) and not m[:GENERATED_FROM].any()
                    assert b["label_mask"][~b[ONPOLICY]][:, :GENERATED_FROM].any()  # fixed rows: every position
        assert any(masks[w].any() for w in rollout_windows)


def test_the_mix_is_deterministic_resumable_and_the_same_on_two_ranks(caches):
    fixed, rollouts, _ = caches

    def flat(step):
        return [(bool(o), int(w)) for b in step for o, w in zip(b[ONPOLICY], b["window"])]

    with mixed(fixed, rollouts, 8, 2, 6) as a, mixed(fixed, rollouts, 8, 2, 6) as b:
        sa, sb = steps(a, 30, 2), steps(b, 30, 2)  # past an epoch of the rollouts (≈ 70 windows): wraps around
    assert [flat(s) for s in sa] == [flat(s) for s in sb]
    with mixed(fixed, rollouts, 8, 2, 6, seed=1) as c:
        assert [flat(s) for s in steps(c, 5, 2)] != [flat(s) for s in sa[:5]]
    # resumed from the cursor after step 11 (what a checkpoint saves), with the prefetch thread on
    with mixed(fixed, rollouts, 8, 2, 6) as d:
        steps(d, 11, 2)
        cursor = d.cursor
    assert cursor.micro == 0 and (cursor.onpolicy_epoch, cursor.onpolicy_offset) != (0, 0)
    with mixed(fixed, rollouts, 8, 2, 6, cursor=Cursor(**dataclasses.asdict(cursor)), prefetch=4) as e:
        assert [flat(s) for s in steps(e, 19, 2)] == [flat(s) for s in sa[11:]]
    # two ranks of 4 rows: rank 0's rows then rank 1's are one process's 8, micro-batch by micro-batch
    ranks = [mixed(fixed, rollouts, 4, 2, 6, world=2, rank=r) for r in range(2)]
    two = [[{k: np.concatenate([r0[k], r1[k]]) for k in r0} for r0, r1 in zip(*(steps(s, 1, 2)[0] for s in ranks))]
           for _ in range(8)]
    assert [flat(s) for s in two] == [flat(s) for s in sa[:8]]
    # another split of the same global step (16 windows, 6 from rollouts): one micro-batch of 16
    with mixed(fixed, rollouts, 16, 1, 6) as f:
        assert [sorted(flat(s)) for s in steps(f, 8, 1)] == [sorted(flat(s)) for s in sa[:8]]


def test_rollouts_only_read_no_fixed_cache_and_columns_missing_on_one_side_are_zeros(caches):
    fixed, rollouts, _ = caches
    with mixed(None, rollouts, 4, 1, 4) as only:
        for _ in range(5):
            b = only.next_batch()
            assert b[ONPOLICY].all() and BEHAVIOUR not in b
    kd = ("input_ids", "label_mask", "topk_ids", "topk_logprobs", "tail_mass")
    rkl = ("input_ids", "label_mask", "label_logprob", BEHAVIOUR)
    with mixed(fixed, rollouts, 6, 1, 3, columns=kd, rollout_columns=rkl) as stream:
        for _ in range(4):
            b = stream.next_batch()
            on = b[ONPOLICY]
            assert set(b) == set(kd) | set(rkl) | {ONPOLICY} and on.sum() == 3
            assert not b["topk_ids"][on].any() and not b[BEHAVIOUR][~on].any() and not b["label_logprob"][~on].any()
            trained = b["label_mask"][on]
            assert (b[BEHAVIOUR][on][trained] < 0).all() and (b["label_logprob"][on][trained] < 0).all()
            assert (b["topk_logprobs"][~on].sum(-1) != 0).any()


def test_fractions_that_are_not_whole_windows_are_refused():
    assert onpolicy_windows(TrainConfig(onpolicy_fraction=0.25), 16) == 4
    assert micro_counts(6, 4) == (1, 2, 1, 2) and sum(micro_counts(7, 3)) == 7
    with pytest.raises(PipelineError, match="0.3 of the 16 windows .* use 0.25 or 0.3125"):
        onpolicy_windows(TrainConfig(onpolicy_fraction=0.3), 16)
    with pytest.raises(PipelineError, match="must be in"):
        onpolicy_windows(TrainConfig(onpolicy_fraction=0.0), 16)
