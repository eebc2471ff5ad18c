"""The Ray Data side of data.py on a real local Ray: strict / lenient over the broken-rows
fixture, a rerun rebuilding the same order, streaming_split giving every rank the same
number of batches from an odd row count and a per-epoch order that repeats, and the
stratified split. No Ray Train, no model."""

import json

import pytest

from simpo_ray import data as D
from simpo_ray.data import DataError
from tests.unit.test_data import BROKEN, BROKEN_COUNTS, _cfg

pytestmark = pytest.mark.slow


def test_pipeline_strict_stops_and_lenient_counts_every_reason(ray_local, tmp_path):
    with pytest.raises(DataError) as e:
        D.prepare_datasets(_cfg(tmp_path), "unused")
    msg = str(e.value)
    assert "15 malformed row(s)" in msg and f"{BROKEN}: row 2: invalid UTF-8 at byte" in msg
    assert f"{BROKEN}: row 6: missing field 'prompt'" in msg and "row 18" not in msg
    out = D.prepare_datasets(_cfg(tmp_path, strict=False), "unused")
    assert out["stats"]["dropped"] == BROKEN_COUNTS and out["stats"]["dropped_total"] == sum(BROKEN_COUNTS.values())
    assert out["stats"]["train_pairs"] == 4 and out["eval"] is None
    rows = out["train"].take_all()
    assert sorted(r["row"] for r in rows) == [1, 7, 19, 20] and {r["source"] for r in rows} == {BROKEN}


def _write_pairs(path, n, seed=0):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i}?", "chosen": "yes " * rng.randint(1, 6),
                                "rejected": "no " * rng.randint(1, 30)}) + "\n")


def _consume(iterators, **kw):
    """Iterate streaming_split iterators together (they start epochs in lockstep)."""
    import threading

    out = [None] * len(iterators)

    def run(k, it):
        out[k] = [list(b["row"]) for b in it.iter_batches(batch_size=2, batch_format="numpy",
                                                          drop_last=True, **kw)]

    threads = [threading.Thread(target=run, args=(k, it)) for k, it in enumerate(iterators)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    return out


def test_reproducible_order_per_epoch_and_equal_batches_for_odd_rows(ray_local, tmp_path):
    """A rerun (or a resume) rebuilds the same train order; streaming_split(2, equal=True)
    gives both ranks the same number of batches from 13 rows; each rank's batches are a
    function of the epoch's seed: the same again for the same epoch, new for the next."""
    from simpo_ray.config import DataConfig

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_pairs(a, 7)
    _write_pairs(b, 6, seed=1)
    cfg = _cfg(tmp_path, train_files=[str(a), str(b)], max_length=256, max_prompt_length=64)
    first = D.prepare_datasets(cfg, "unused")["train"]
    again = D.prepare_datasets(cfg, "unused")["train"]
    order = [(r["source"], r["row"]) for r in first.take_all()]
    assert order == [(r["source"], r["row"]) for r in again.take_all()] and len(order) == 13
    assert order != sorted(order)  # shuffled once, with the seed
    dcfg = DataConfig(shuffle_buffer_size=16)
    epoch0 = _consume(first.streaming_split(2, equal=True), **D.shuffle_args(dcfg, 0, 2))
    assert [len(x) for x in epoch0] == [3, 3]  # 13 rows -> 6 per rank -> 3 batches each
    splits = first.streaming_split(2, equal=True)  # a fresh split, as after a restart
    assert _consume(splits, **D.shuffle_args(dcfg, 0, 2)) == epoch0
    epoch1 = _consume(splits, **D.shuffle_args(dcfg, 1, 2))
    assert epoch1 != epoch0
    assert [sorted(sum(x, [])) for x in epoch1] == [sorted(sum(x, [])) for x in epoch0]
    assert D.shuffle_args(DataConfig(shuffle=False), 3, 2) == {}
    # what Ray Train should be given: order preserved, so no locality-driven assignment
    assert D.ingest_config()._resolve_execution_options("train").preserve_order


def test_stratified_split_in_the_pipeline(ray_local, tmp_path):
    p = tmp_path / "d.jsonl"
    _write_pairs(p, 80)
    cfg = _cfg(tmp_path, train_files=str(p), max_length=256, max_prompt_length=64,
               eval_fraction=0.25, eval_stratify=True)
    out = D.prepare_datasets(cfg, "unused")
    assert out["stats"]["split"].startswith("seeded, stratified")
    assert out["stats"]["eval_pairs"] == 20 and out["stats"]["train_pairs"] == 60
    train_rows = {r["row"] for r in out["train"].take_all()}
    assert not train_rows & {r["row"] for r in out["eval"].take_all()}
