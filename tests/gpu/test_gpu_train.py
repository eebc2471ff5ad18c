"""GPU path: bf16, NCCL, ZeRO-3 and (when installed) flash-attention 2. Skipped without CUDA.

Run on a GPU machine with: make test TORCH_SPEC=torch EXTRAS=dev,gpu ARGS="tests/gpu"
"""

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(ray_local, root, attn, *extra):
    from simpo_ray.config import RunConfig
    from simpo_ray.train import train
    from tests.conftest import REPO

    n = torch.cuda.device_count()
    workers = 2 if n >= 2 else 1
    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"), [
        f"output.root={root}", f"output.name=gpu-{attn}", "train.use_gpu=true",
        f"train.num_workers={workers}", "train.total_batch_size=16", "train.micro_batch_size=4",
        "model.dtype=bfloat16", f"model.attn_implementation={attn}", "train.max_steps=6",
        "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3", *extra])
    _, summary = train(cfg)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if '"loss"' in line]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert all(len(set(m["ranks_micro_batches"])) == 1 for m in lines)
    return summary


def test_bf16_nccl_zero3_sdpa(ray_local, tmp_path):
    _run(ray_local, tmp_path, "sdpa")


def test_bf16_flash_attention_2(ray_local, tmp_path):
    pytest.importorskip("flash_attn")
    _run(ray_local, tmp_path, "flash_attention_2")


def test_bf16_flash_attention_2_packed(ray_local, tmp_path):
    """The recipes' setting: packed pairs in one row through flash-attn varlen."""
    pytest.importorskip("flash_attn")
    _run(ray_local, tmp_path, "flash_attention_2", "data.packing=true", "output.name=gpu-flash-packed")


def test_bf16_sdpa_packed_token_budget(ray_local, tmp_path):
    """Packed rows with a block-diagonal mask under SDPA on CUDA, micro-batches cut by tokens."""
    _run(ray_local, tmp_path, "sdpa", "data.packing=true", "data.token_budget=2048", "output.name=gpu-sdpa-budget")
