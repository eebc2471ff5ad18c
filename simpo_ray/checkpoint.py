"""Save, resume and export.

Save: every rank writes its own DeepSpeed shard into a private temp folder and hands it
to ``ray.train.report``; Ray merges the ranks' folders into one checkpoint in storage.
Resume: ``ray.train.get_checkpoint()`` gives the latest; DeepSpeed restores weights,
optimizer and scheduler, and the client state restores the step and data position.
A checkpoint saved by another number of workers is converted first (DeepSpeed's
universal checkpoint, ``ds_to_universal``), on every node, and loaded as such.
Export: the full weights are gathered (collective) and rank 0 writes a Hugging Face
folder (safetensors, tokenizer, model card) to the run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"
STATE_FILE = "trainer_state.json"


def save(engine, state: dict) -> tuple:
    """Write this rank's shard, its RNG state and a manifest (size + sha256 of every
    file it wrote); returns (ray Checkpoint, temp dir to delete after report)."""
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    rank = engine.global_rank
    state = dict(state, world_size=dist.get_world_size())  # a resume on another count converts
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


def saved_world_size(directory: str) -> int:
    """The number of workers that saved the checkpoint (its state file; for one saved
    before that was recorded, or a damaged one, its rank manifests)."""
    try:
        return int(json.loads(Path(directory, STATE_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(list(Path(directory, "manifest").glob("rank*.json")))


def verify(directory: str, rank: int, world_size: int, saved_world: int | None = None) -> str | None:
    """None if the checkpoint is whole, else the reason. Every rank checks that all
    ``saved_world`` ranks' manifests are there and sizes match, and hashes the files
    of the manifests it owns (its own; every ``world_size``-th when the count changed)."""
    root = Path(directory)
    saved_world = world_size if saved_world is None else saved_world
    manifests = sorted((root / "manifest").glob("rank*.json"))
    if len(manifests) != saved_world:
        return f"{len(manifests)} rank manifests, expected {saved_world}"
    for m in manifests:
        try:
            entries = json.loads(m.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable {m.name}: {e}"
        owner = m.stem[len("rank"):]
        own = owner.isdigit() and int(owner) % world_size == rank
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


def restore(build):
    """Build the engine (``build(universal)``) and load the newest whole checkpoint into
    it; returns (engine, its saved state or None). After a fallback to an older
    checkpoint the state's ``lineage`` is counted up.

    A checkpoint that fails verification on any rank is skipped with a warning naming
    it, and the next older one is tried. One saved by another number of workers is
    converted to a DeepSpeed universal checkpoint and loaded as one; the data position
    is global (``budget``), so training continues with the next pair. Collective:
    every rank must call it.
    """
    import ray.train
    import torch
    import torch.distributed as dist

    from simpo_ray.metrics import agree

    latest = ray.train.get_checkpoint()
    if latest is None:
        return build(False), None
    rank, world = dist.get_rank(), dist.get_world_size()
    for ckpt in _candidates(latest):
        with ckpt.as_directory() as d:
            saved_world = saved_world_size(d)
            problem = verify(d, rank, world, saved_world)
            if not agree(problem is None):  # all ranks must agree on the checkpoint they load
                if problem or rank == 0:
                    print(f"[simpo-ray] WARNING: checkpoint {ckpt.path} is damaged "
                          f"({problem or 'found by another rank'}); trying an older one", flush=True)
                continue
            changed = saved_world != world
            engine = build(changed)
            load_dir, tag = (universal_copy(d, ckpt.path), UNIVERSAL_TAG) if changed else (d, TAG)
            path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if changed:
                dist.barrier()  # every rank of the node has read the converted copy
                if ray.train.get_context().get_local_rank() == 0:
                    shutil.rmtree(load_dir, ignore_errors=True)
            if path is None:
                raise RuntimeError(f"checkpoint {ckpt.path} holds no DeepSpeed state under '{TAG}'")
            rng_file = Path(d, "rng", f"rank{rank}.pt")  # a rank the old run did not have keeps the seed
            if rng_file.exists():
                rng = torch.load(rng_file, weights_only=True)
                torch.set_rng_state(rng["torch"])
                if "cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["cuda"])
            saved = dict(client["simpo"])
            if "world_size" not in saved:  # saved before positions were global: micro was per rank
                saved.update(world_size=saved_world, micro=saved.get("micro", 0) * saved_world)
            if ckpt is not latest:  # a new lineage: its checkpoints get names of their own
                saved["lineage"] = saved.get("lineage", 0) + 1
                if rank == 0:
                    print(f"[simpo-ray] resumed from {ckpt.path} instead of the damaged latest", flush=True)
            if changed and rank == 0:
                print(f"[simpo-ray] resumed on {world} workers from a checkpoint of {saved_world} "
                      "(converted to a DeepSpeed universal checkpoint)", flush=True)
            return engine, saved
    raise RuntimeError(f"no whole checkpoint found at or before {latest.path}; "
                       "delete the run folder to start over")


def universal_copy(directory: str, name: str) -> str:
    """The checkpoint at ``directory`` converted to a DeepSpeed universal checkpoint
    (``UNIVERSAL_TAG`` under the returned folder), made once per node by its local rank
    0 with DeepSpeed's own converter (``python -m deepspeed.checkpoint.ds_to_universal``)
    in the node's temp folder. Collective: every rank calls it; a failure stops all."""
    import ray.train

    from simpo_ray.metrics import agree

    out = Path(tempfile.gettempdir(), "simpo-universal-" + hashlib.sha256(name.encode()).hexdigest()[:16])
    error = None
    if ray.train.get_context().get_local_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(directory, TAG)),
             "--output_folder", str(out / UNIVERSAL_TAG), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        if done.returncode:
            error = f"exit {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
    if not agree(error is None):  # also the barrier: the other ranks wait for the copy here
        raise RuntimeError(f"converting {name} for a resume on another number of workers failed"
                           + (f" ({error})" if error else " on another node"))
    return str(out)


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
