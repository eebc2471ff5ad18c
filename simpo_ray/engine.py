"""The DeepSpeed engine: its JSON config, the lr schedule, threads, ``deepspeed.initialize``.

Heavy imports live inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import math
import os


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed JSON for this run. Batch sizes are explicit (never "auto") so
    DeepSpeed checks that total = micro x accumulation x world size."""
    t, ds = cfg.train, cfg.deepspeed
    zero = {"stage": ds.stage}
    if ds.stage == 3:
        zero.update({
            # Export gathers full 16-bit weights on rank 0 (save_16bit_model / consolidated dict).
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": 10_000,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
    conf = {
        "train_batch_size": t.total_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        # Our client torch AdamW needs no JIT build; DeepSpeed calls it "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        o = cfg.optim
        conf["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
            "weight_decay": o.weight_decay}}
    return _merge(conf, ds.overrides)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the peak lr: linear warmup, then cosine/linear decay to 0 or constant."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        progress = min(progress, 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def build_engine(cfg, model_path: str, total_steps: int, universal: bool = False, segments: bool = False):
    """Load the model partitioned at load (ZeRO-3 via HfDeepSpeedConfig) and wrap it.
    ``universal``: the checkpoint to load is a DeepSpeed universal one (a resume on
    another number of workers, ``checkpoint.restore``).

    Returns (engine, ds_config); ``engine.module`` is a ``PolicyLogps`` whose ``.lm`` is
    the Hugging Face model. Every rank must call this (it is collective).
    """
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from simpo_ray.compat import skip_cpu_shm_build
    from simpo_ray.models import torch_dtype
    from simpo_ray.policy import PolicyLogps

    if not cfg.train.use_gpu:
        skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    ds_config = deepspeed_config(cfg)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    # Keep this object alive across from_pretrained: while it exists, transformers
    # loads under zero.Init, so a 70B model never materializes on one rank.
    hf_ds = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True)
    model.config.use_cache = False
    if segments:  # packed batches attend per segment (RunPlan.segment_attention)
        from simpo_ray.attention import use_segment_attention

        use_segment_attention(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyLogps(model, chunk_size=cfg.model.logps_chunk_size)

    o = cfg.optim
    optimizer = None
    if not cfg.deepspeed.offload_optimizer:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    warmup = int(round(o.warmup_ratio * total_steps))
    sched_fn = lr_lambda(o.schedule, warmup, total_steps)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=None if optimizer is not None else model.parameters())
    engine._simpo_hf_ds = hf_ds  # keep alive for the engine's lifetime
    return engine, ds_config


def configure_threads(cpus: float) -> None:
    """One intra-op thread pool per worker sized to its CPU share (no oversubscription)."""
    import torch

    n = max(1, int(cpus))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
