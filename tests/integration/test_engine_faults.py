"""DeepSpeed ZeRO-3 in one process (world size 1, gloo): a non-finite gradient norm
leaves every parameter unchanged and is counted as a skipped step. No Ray: not marked slow."""

import socket

import torch

from simpo_ray.checkpoint import gather_state_dict
from simpo_ray.collate import collate_pairs
from simpo_ray.config import RunConfig


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with poisoned grads."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nan_gradients_skip_the_step_and_keep_parameters(tiny_path, monkeypatch):
    from simpo_ray.engine import build_engine

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    cfg = RunConfig.from_dict({"model": {"dtype": "float32"}, "optim": {"lr": 1e-2},
                               "train": {"num_workers": 1, "total_batch_size": 2, "micro_batch_size": 2}})
    engine, _ = build_engine(cfg, str(tiny_path), total_steps=10)
    try:
        _check_skip(engine)
    finally:
        # Leave this process as we found it: no process group, and no live ZeRO-3
        # config that would make every later from_pretrained here use zero.Init.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del engine
        unset_hf_deepspeed_config()
        torch.distributed.destroy_process_group()


def _check_skip(engine):
    b = collate_pairs([[1, 3, 40], [1, 3, 41]], [[50, 2], [51, 2]], [[60, 2], [61, 62, 2]], 0, 8)

    def step(poison):
        sums, counts = engine(b["input_ids"], b["attention_mask"], b["labels"])
        loss = -(sums / counts).mean()
        engine.backward(_NanGrad.apply(loss) if poison else loss)
        engine.step()

    step(poison=False)  # a normal step moves the weights
    before = gather_state_dict(engine)
    step(poison=True)
    after = gather_state_dict(engine)
    assert engine.skipped_steps == 1
    assert not torch.isfinite(torch.tensor(float(engine.get_global_grad_norm())))
    for k in before:
        assert torch.equal(before[k], after[k]), k
    step(poison=False)  # and training goes on
    assert any(not torch.equal(after[k], v) for k, v in gather_state_dict(engine).items())
