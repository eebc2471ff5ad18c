"""simpo-ray scale on CPU: two tiny sizes, a few real ZeRO-3 steps each (the smoke mode CI
runs; the committed ladder is benchmarks/scaling/)."""

import csv
import os

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_scale_two_tiny_sizes(ray_local, tmp_path, capsys):
    from simpo_ray.cli import main

    rc = main(["scale", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "data.max_length=256",
               "data.max_prompt_length=128", "train.total_batch_size=8", "train.micro_batch_size=2",
               f"output.root={tmp_path / 'runs'}",
               "--sizes", "32x1,xs", "--steps", "2", "--out", str(tmp_path), "--peak-tflops", "0.1"])
    assert rc == 0
    with open(tmp_path / "scale.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["size"] for r in rows] == ["32x1", "xs"]
    assert int(rows[0]["params"]) < int(rows[1]["params"])
    for r in rows:
        assert r["workers"] == "2" and int(r["steps_timed"]) == 1
        assert float(r["tokens_per_s_per_worker"]) > 0 and float(r["step_time_s"]) > 0
        assert 0 < float(r["mfu"]) < 1 and float(r["peak_rss_gib"]) > 0.1
        assert float(r["checkpoint_gib"]) > 0
    assert rows[1]["time_slope"] != "" and (tmp_path / "scale.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "given peak 0.1 TFLOP/s per worker" in out
