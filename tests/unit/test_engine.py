import pytest

from simpo_ray.config import RunConfig
from simpo_ray.engine import deepspeed_config, lr_lambda


def test_deepspeed_config_batch_arithmetic_and_stage():
    cfg = RunConfig.from_dict({"train": {"num_workers": 4, "micro_batch_size": 2, "total_batch_size": 128},
                               "model": {"dtype": "bfloat16"},
                               "deepspeed": {"overrides": {"zero_optimization": {"overlap_comm": True}}}})
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 16
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4 == 128
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["bf16"]["enabled"] is True


def test_warmup_then_cosine_to_zero():
    f = lr_lambda("cosine", warmup_steps=10, total_steps=100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    vals = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
