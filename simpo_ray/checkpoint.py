"""Save, resume and export.

Save: every rank writes its own DeepSpeed shard into a private temp folder and hands it
to ``ray.train.report``; Ray merges the ranks' folders into one checkpoint in storage.
Resume: ``ray.train.get_checkpoint()`` gives the latest; DeepSpeed restores weights,
optimizer and scheduler, and the client state restores the step and data position.
Export: the full weights are gathered (collective) and rank 0 writes a Hugging Face
folder (safetensors, tokenizer, model card) to the run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

TAG = "deepspeed"
STATE_FILE = "trainer_state.json"


def save(engine, state: dict) -> tuple:
    """Write this rank's shard, its RNG state and a manifest (size + sha256 of every
    file it wrote); returns (ray Checkpoint, temp dir to delete after report)."""
    import torch
    from ray.train import Checkpoint

    rank = engine.global_rank
    tmp = tempfile.mkdtemp(prefix="simpo-ckpt-")
    engine.save_checkpoint(tmp, tag=TAG, client_state={"simpo": state})
    if rank == 0:
        Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    Path(tmp, "rng").mkdir()
    torch.save(rng, Path(tmp, "rng", f"rank{rank}.pt"))
    files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
    manifest = {f: {"size": os.path.getsize(Path(tmp, f)), "sha256": _sha256(Path(tmp, f))} for f in files}
    Path(tmp, "manifest").mkdir()
    Path(tmp, "manifest", f"rank{rank}.json").write_text(json.dumps(manifest, indent=0))
    return Checkpoint.from_directory(tmp), tmp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: str, rank: int, world_size: int) -> str | None:
    """None if the checkpoint is whole, else the reason. Every rank checks that all
    ranks' manifests are there and sizes match, and hashes its own files."""
    root = Path(directory)
    manifests = sorted((root / "manifest").glob("rank*.json"))
    if len(manifests) != world_size:
        return f"{len(manifests)} rank manifests, expected {world_size}"
    for m in manifests:
        try:
            entries = json.loads(m.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable {m.name}: {e}"
        own = m.name == f"rank{rank}.json"
        for name, meta in entries.items():
            p = root / name
            if not p.is_file() or p.stat().st_size != meta["size"]:
                return f"{name}: missing or wrong size"
            if own and _sha256(p) != meta["sha256"]:
                return f"{name}: sha256 mismatch"
    return None


def _candidates(latest):
    """The latest checkpoint, then older siblings in the same run folder, newest first."""
    from ray.train import Checkpoint

    yield latest
    parent, name = os.path.split(latest.path.rstrip("/"))
    try:
        from pyarrow.fs import FileSelector

        infos = latest.filesystem.get_file_info(FileSelector(parent))
    except Exception:  # noqa: BLE001 - listing is best effort; the latest was tried
        return
    older = sorted((i.path for i in infos if os.path.basename(i.path).startswith("checkpoint_")
                    and os.path.basename(i.path) < name), reverse=True)
    for path in older:
        yield Checkpoint(path, filesystem=latest.filesystem)


def restore(engine) -> dict | None:
    """Load the newest whole checkpoint into the engine; returns its saved state or None
    (after a fallback to an older one, with its ``lineage`` counted up).

    A checkpoint that fails verification on any rank is skipped with a warning naming
    it, and the next older one is tried. Collective: every rank must call it.
    """
    import ray.train
    import torch
    import torch.distributed as dist

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    rank, world = engine.global_rank, dist.get_world_size()
    for ckpt in _candidates(latest):
        with ckpt.as_directory() as d:
            problem = verify(d, rank, world)
            bad = torch.tensor([0 if problem is None else 1])
            dist.all_reduce(bad)  # all ranks must agree on the checkpoint they load
            if int(bad):
                if problem or rank == 0:
                    print(f"[simpo-ray] WARNING: checkpoint {ckpt.path} is damaged "
                          f"({problem or 'found by another rank'}); trying an older one", flush=True)
                continue
            path, client = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"checkpoint {ckpt.path} holds no DeepSpeed state under '{TAG}'")
            rng = torch.load(Path(d, "rng", f"rank{rank}.pt"), weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            saved = client["simpo"]
            if ckpt is not latest:  # a new lineage: its checkpoints get names of their own
                saved = dict(saved, lineage=saved.get("lineage", 0) + 1)
                if rank == 0:
                    print(f"[simpo-ray] resumed from {ckpt.path} instead of the damaged latest", flush=True)
            return saved
    raise RuntimeError(f"no whole checkpoint found at or before {latest.path}; "
                       "delete the run folder to start over")


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


def export(engine, model_path: str, dest: str, card: str) -> str | None:
    """Gather the live weights (collective: every rank calls) and write a Hugging Face
    folder at ``dest`` on rank 0 (``export.write_folder``, the same writer as
    ``simpo-ray export``)."""
    from simpo_ray.export import write_folder

    state = gather_state_dict(engine)
    if engine.global_rank != 0:
        return None
    return write_folder(engine.module.lm, state, model_path, dest, card)
