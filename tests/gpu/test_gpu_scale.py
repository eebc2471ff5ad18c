"""simpo-ray scale on GPUs: the 0.5B and 1B presets in bf16 (ZeRO-3, NCCL), a few steps each.
Skipped without CUDA. For the full GPU ladder (0.5b,1b,3b,8b) run the same command by hand:

    simpo-ray scale examples/tiny_cpu.yaml train.use_gpu=true train.num_workers=N model.dtype=bfloat16 \\
        model.gradient_checkpointing=true --sizes 0.5b,1b,3b,8b --steps 6 --out runs/scale-gpu
"""

import csv
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_ladder_two_presets(ray_local, tmp_path):
    from simpo_ray.cli import main
    from tests.conftest import REPO

    workers = min(torch.cuda.device_count(), 2)
    rc = main(["scale", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "train.use_gpu=true",
               f"train.num_workers={workers}", "train.total_batch_size=16", "train.micro_batch_size=4",
               "model.dtype=bfloat16", "model.gradient_checkpointing=true", f"output.root={tmp_path / 'runs'}",
               "--sizes", "0.5b,1b", "--steps", "3", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "scale.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["size"] for r in rows] == ["0.5b", "1b"]
    for r in rows:
        assert 0 < float(r["mfu"]) < 1 and float(r["peak_gpu_gib"]) > 0.5
    assert float(rows[1]["peak_gpu_gib"]) > float(rows[0]["peak_gpu_gib"])
