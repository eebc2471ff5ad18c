"""Hugging Face folders from a run, and their model card.

Two ways in, one writer: at the end of training the workers gather the live weights
(``checkpoint.export``); afterwards ``simpo-ray export RUN_DIR`` consolidates any whole
checkpoint of the run offline from its DeepSpeed shards (no Ray, no process group),
so a mid-run checkpoint becomes a folder that transformers and vLLM load. Both write
with ``write_folder`` and describe the run with ``model_card``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

PLAN_FILE = "plan.json"  # the run's RunPlan, written by train.fit (its data stats feed the card)
CHANGES_FILE = "config_changes.jsonl"  # resumes under a changed config (--allow-config-change)
# Report keys that describe one report, not the model: left out of the card.
_NOT_MODEL_METRICS = ("rank_micro_batches", "total_steps", "epoch")


class ExportError(Exception):
    """A run folder or checkpoint that cannot be exported; the message says why."""


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("simpo-ray", "torch", "transformers", "deepspeed", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def card_metrics(report: dict) -> dict:
    """The part of a report worth keeping as the model's final metrics (train, eval/,
    alarm/, the margin in effect), without the per-report bookkeeping and data counts."""
    return {k: v for k, v in report.items()
            if k not in _NOT_MODEL_METRICS and not k.startswith(("data/", "sys/"))}


def config_changes(run_dir) -> list:
    """Every "field: old -> new" a resume accepted (``train.check_run_identity``)."""
    path = Path(run_dir) / CHANGES_FILE
    if not path.is_file():
        return []
    return [c for line in path.read_text().splitlines() if line.strip() for c in json.loads(line)["changes"]]


def model_card(cfg, stats: dict, metrics: dict, step: int, source: str, changes: list = ()) -> str:
    """``cfg``: the run's RunConfig; ``stats``: the data statistics (RunPlan.stats);
    ``metrics``: the last train and held-out values (TrainState.metrics); ``source``:
    which weights these are (end of training, or the checkpoint exported); ``changes``:
    config changes a resume accepted (``config_changes``)."""
    import yaml

    from simpo_ray.objective import LOSSES

    s = cfg.simpo
    objective = f"loss {s.loss}, beta {s.beta}"
    if LOSSES[s.loss].target_margin:
        objective += f", gamma {s.resolved_gamma:g} (gamma/beta {s.resolved_gamma_beta_ratio:g})"
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    lines = [
        "# Model trained with simpo-ray", "",
        f"- objective: {objective}",
        f"- base model: {cfg.model.name_or_path} (dtype {cfg.model.dtype}, "
        f"trust_remote_code {cfg.model.trust_remote_code})",
        f"- data fingerprint: {stats.get('fingerprint', 'unknown')} ({stats.get('train_pairs', '?')} train pairs, "
        f"{stats.get('eval_pairs', '?')} eval pairs)",
        f"- steps: {step} ({source})",
        f"- libraries: {versions}",
        *([f"- resumed under a changed config: {'; '.join(changes)}"] if changes else []),
        "", "## Final metrics", "",
        "Training values averaged since the previous report; `eval/` values from the last held-out pass.",
        "", "```json", json.dumps(card_metrics(metrics), indent=1, sort_keys=True), "```",
        "", "## Resolved config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def write_folder(model, state_dict: dict, tokenizer_path: str, dest, card: str) -> str:
    """Write ``model``'s config with ``state_dict`` as safetensors, the tokenizer and the
    card to ``dest``. Written to a temp folder beside it and moved into place, so a
    half-written export never looks complete."""
    from transformers import AutoTokenizer

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest.parent))
    try:
        model.config.use_cache = True  # training turned it off; generation wants it
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def find_checkpoint(run_dir: Path, name: Optional[str], world_size: int) -> tuple[Path, list]:
    """The named checkpoint (it must be whole), else the newest whole one; returns it and
    the (name, reason) of the newer damaged ones skipped."""
    from simpo_ray.checkpoint import verify

    found = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), reverse=True)
    if name is not None:
        found = [p for p in found if p.name == name]
        if not found:
            raise ExportError(f"{run_dir} has no checkpoint named {name}")
    if not found:
        raise ExportError(f"{run_dir} has no checkpoint_* folder (checkpoints are written every "
                          "train.checkpoint_every steps)")
    skipped = []
    for ckpt in found:
        problems = [verify(str(ckpt), r, world_size) for r in range(world_size)]
        problem = next((p for p in problems if p), None)
        if problem is None:
            return ckpt, skipped
        if name is not None:
            raise ExportError(f"checkpoint {ckpt} is damaged: {problem}")
        skipped.append((ckpt.name, problem))
    raise ExportError(f"no whole checkpoint in {run_dir}: " + "; ".join(f"{n}: {p}" for n, p in skipped))


def consolidated_state_dict(ckpt: Path, stage: int, dtype) -> dict:
    """Full weights from one checkpoint's DeepSpeed files, cast to ``dtype``, keyed as
    the Hugging Face model names them. ZeRO 1-3: the fp32 master weights merged from
    every rank's partition; stage 0: the saved module."""
    import torch

    from simpo_ray.checkpoint import TAG

    if stage == 0:
        files = sorted((ckpt / TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ckpt / TAG}: no mp_rank_*_model_states.pt")
        raw = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG, lazy_mode=True)
    out = {}
    for key in list(raw):
        tensor = raw.pop(key)  # one tensor materialized at a time
        tensor = tensor.contiguous() if hasattr(tensor, "contiguous") else tensor
        # engine.module is PolicyLogps; the Hugging Face model is its ``lm``
        out[key[len("lm."):] if key.startswith("lm.") else key] = tensor.to(dtype).clone()
    return out


def export_run(run_dir, checkpoint: Optional[str] = None, out: Optional[str] = None) -> dict:
    """``simpo-ray export``: a Hugging Face folder (same layout and card as the end-of-run
    export) from a checkpoint of ``run_dir``. Default destination: RUN_DIR/export/<checkpoint>."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_ray.config import RunConfig
    from simpo_ray.models import resolve_model_path, torch_dtype
    from simpo_ray.runplan import TrainState

    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    ckpt, skipped = find_checkpoint(run_dir, checkpoint, cfg.train.num_workers)
    for name, problem in skipped:
        print(f"[simpo-ray] WARNING: {name} is damaged ({problem}); exporting an older one", flush=True)
    state = TrainState.from_dict(json.loads((ckpt / "trainer_state.json").read_text()))
    plan_file = run_dir / PLAN_FILE
    stats = json.loads(plan_file.read_text()).get("stats", {}) if plan_file.is_file() else {}
    model_path = resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))
    dtype = torch_dtype(cfg.model.dtype)
    weights = consolidated_state_dict(ckpt, cfg.deepspeed.stage, dtype)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):  # only the config and the key set are needed: no second copy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    for key in _tied_keys(model):
        weights.pop(key, None)  # saved once, under the embeddings (as the live export does)
    expected = set(model.state_dict()) - _tied_keys(model)
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ExportError(f"{ckpt} does not match {model_path}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    dest = Path(out) if out else run_dir / "export" / ckpt.name
    card = model_card(cfg, stats, state.metrics, state.step, f"exported from {ckpt.name}", config_changes(run_dir))
    write_folder(model, weights, model_path, dest, card)
    return {"checkpoint": str(ckpt), "step": state.step, "out": str(dest), "skipped": skipped}


def _tied_keys(model) -> set:
    """The output embedding's name when the model ties it to the input embeddings."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}
