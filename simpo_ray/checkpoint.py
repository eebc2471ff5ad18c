"""Save, resume and export.

Save: every rank writes its own DeepSpeed shard into a private temp folder and hands it
to ``ray.train.report``; Ray merges the ranks' folders into one checkpoint in storage.
Resume: ``ray.train.get_checkpoint()`` gives the latest; DeepSpeed restores weights,
optimizer and scheduler, and the client state restores the step and data position.
Export: the full weights are gathered (collective) and rank 0 writes a Hugging Face
folder (safetensors, tokenizer, model card) to the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TAG = "deepspeed"
STATE_FILE = "trainer_state.json"


def save(engine, state: dict) -> tuple:
    """Write this rank's shard; returns (ray Checkpoint, temp dir to delete after report)."""
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="simpo-ckpt-")
    engine.save_checkpoint(tmp, tag=TAG, client_state={"simpo": state})
    if engine.global_rank == 0:
        Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
    return Checkpoint.from_directory(tmp), tmp


def restore(engine) -> dict | None:
    """Load the latest Ray checkpoint into the engine; returns its saved state or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        path, client = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {ckpt.path} holds no DeepSpeed state under '{TAG}'")
    return client["simpo"]


def gather_state_dict(engine) -> dict | None:
    """Full weights on rank 0 (None elsewhere). Collective under ZeRO-3: all ranks call."""
    import deepspeed

    module = engine.module.lm
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
            if engine.global_rank == 0 else None
    out = {}
    keys = set(module.state_dict().keys())
    for name, p in module.named_parameters():
        # One parameter at a time: rank 0 never holds more than the final dict.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if engine.global_rank == 0:
                out[name] = p.detach().cpu().clone()
    if engine.global_rank == 0:
        for name, b in module.named_buffers():
            if name in keys:
                out[name] = b.detach().cpu().clone()
        return out
    return None


def model_card(cfg_dict: dict, stats: dict, metrics: dict) -> str:
    import yaml

    lines = [
        "# SimPO model trained with simpo-ray", "",
        f"- loss: {cfg_dict['simpo']['loss']}, beta {cfg_dict['simpo']['beta']}, "
        f"gamma {stats.get('gamma')}, gamma_beta_ratio {stats.get('gamma_beta_ratio')}",
        f"- base model: {cfg_dict['model']['name_or_path']}",
        f"- trust_remote_code: {cfg_dict['model']['trust_remote_code']}",
        f"- data fingerprint: {stats.get('fingerprint')} ({stats.get('train_pairs')} train pairs, "
        f"{stats.get('eval_pairs')} eval pairs)",
        f"- steps: {metrics.get('step')}",
        "", "## Final metrics", "", "```json", json.dumps(metrics, indent=1, sort_keys=True), "```",
        "", "## Resolved config", "", "```yaml", yaml.safe_dump(cfg_dict, sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def export(engine, model_path: str, dest: str, card: str) -> str | None:
    """Gather and write a Hugging Face folder at ``dest`` (rank 0). Written to a temp
    folder first and moved into place, so a half-written export never looks complete."""
    from transformers import AutoTokenizer

    state = gather_state_dict(engine)
    if engine.global_rank != 0:
        return None
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest.parent))
    module = engine.module.lm
    module.config.use_cache = True  # training turned it off; generation wants it
    module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return str(dest)
