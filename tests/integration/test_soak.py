"""A short soak: 40 steps of the tiny model with a checkpoint every 10, four epochs of
a small file, every report carrying ``sys/rss_mb`` (the largest worker's RSS).

Warm-up is the first epoch (10 steps): the allocator's pools, the first
forward/backward buffers, the first checkpoint and the first epoch's data iterator all
land there. After it, the median RSS of steps 31-40 must stay within 5% of the median
of steps 11-20; epoch boundaries and checkpoints fall between the windows. A 60-step
version of this test saw +0.5% (benchmarks/README.md, Soak), and a copy of the worker
that kept 1 MiB per step alive (what a held batch or graph would do) failed it at
+5.8%. The long version is ``python benchmarks/soak.py`` (300 steps)."""

import json

import pytest

from tests.integration.conftest import BUNDLED, fit, load_script

pytestmark = pytest.mark.slow


def test_worker_memory_stays_flat_after_warm_up(ray_local, tmp_path):
    data = tmp_path / "pairs.jsonl"
    with open(BUNDLED) as f:
        data.write_text("".join(f.readlines()[:40]))  # 40 pairs: 10 steps of 4 per epoch
    _, _, summary, every = fit(tmp_path, **{
        "data.train_files": str(data), "data.eval_fraction": 0.0, "train.total_batch_size": 4,
        "train.micro_batch_size": 2, "train.epochs": 10, "train.max_steps": 40, "train.log_every": 1,
        "train.checkpoint_every": 10, "train.eval_every": 1000, "output.name": "soak", "output.export": "false"})
    lines = [m for m in every if "loss" in m]
    assert summary["finished"] and [m["step"] for m in lines] == list(range(1, 41))
    assert lines[-1]["epoch"] >= 3  # the windows are separated by epoch boundaries
    assert sum(bool(m.get("checkpoint")) for m in lines) == 4
    assert all(m["sys/rss_mb"] > 50 for m in lines)  # a real process's RSS, every report
    res = load_script("benchmarks/soak.py", "soak").rss_growth(lines, warmup=10, window=10)
    print(json.dumps(res))
    assert res["growth"] < 0.05, res
