"""On-policy SimPO in rounds: generate -> score -> pair -> train -> export -> next round.

Round k (1-based) samples from the current policy (``model.name_or_path`` for round
1, round k-1's export after that), scores and pairs the samples
(``simpo_ray.generate``), then trains SimPO from that same policy on the new pairs
with ``simpo_ray.train.train`` and exports. Folders, under ``output.root/output.name``:

    iterate_settings.json       the settings the rounds were made with (a rerun with others is refused)
    iterate.json                the summary of the rounds done
    round_001/generated/        samples/, pairs/ (the round's training data), generation.json
    round_001/                  the round's training run: config.yaml, metrics.jsonl,
                                checkpoint_*/, model/ (the export), summary.json
    round_001/round.json        written last: the round is done

A rerun skips the done rounds and resumes the first unfinished one (its finished
generation parts, then its training checkpoints). Generators and scorers are stopped
before training starts (vLLM pins threads and holds memory) unless
``generate.keep_generators``: then the same actors get each export's weights in place.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from simpo_ray.config import RunConfig, check_rerun
from simpo_ray.generate import GENERATE_FREE, run_generation
from simpo_ray.generators import start_generators, stop_actors
from simpo_ray.tracking import RunInfo

DONE = "round.json"
SETTINGS = "iterate_settings.json"


def round_dir(cfg: RunConfig, k: int) -> Path:
    return cfg.output.run_dir / f"round_{k:03d}"


def round_config(cfg: RunConfig, k: int, policy: str, pairs_dir: Path) -> RunConfig:
    """Round k's training config: the user's, trained from ``policy`` on the round's pairs,
    its run folder ``round_NNN`` inside the iterate folder, always exported."""
    d = cfg.to_dict()
    d["model"]["name_or_path"] = str(policy)
    d["data"]["train_files"] = str(pairs_dir)
    d["output"].update(root=str(cfg.output.run_dir), name=round_dir(cfg, k).name, export=True)
    if cfg.output.storage:  # every iterate run keeps its own round_NNN names in the store
        d["output"]["storage"] = cfg.output.storage.rstrip("/") + "/" + cfg.output.name
    return RunConfig.from_dict(d)


def settings(cfg: RunConfig) -> dict:
    """What the rounds of a folder are made from: the starting policy, the prompts and
    the generate settings (``generate.GENERATE_FREE`` may change between reruns)."""
    return {"policy": cfg.model.name_or_path, "prompts": cfg.generate.prompt_files or cfg.data.train_files,
            "generate": dataclasses.asdict(cfg.generate)}


def check_settings(cfg: RunConfig) -> None:
    """Rounds already in the folder were made with these settings, or a ConfigError
    (before Ray starts). The record is ``iterate_settings.json``."""
    check_rerun(cfg.output.run_dir / SETTINGS, settings(cfg), "rounds", GENERATE_FREE)


def _init_ray(cfg: RunConfig) -> None:
    """Ray up. A local cluster also counts the CPUs that kept generators hold while
    the workers train, so Ray Data still gets its share (else it starves: a hang)."""
    from simpo_ray.train import init_ray

    g = cfg.generate
    init_ray(cfg, extra_cpus=g.num_generators * g.cpus_per_generator if g.keep_generators else 0)


def generate_pairs(cfg: RunConfig) -> dict:
    """``simpo-ray generate``: one pass from ``model.name_or_path`` into
    ``generate.output`` (default ``<run folder>/generated``). Returns the totals."""
    cfg.validate()
    _init_ray(cfg)
    out = Path(cfg.generate.output) if cfg.generate.output else cfg.output.run_dir / "generated"
    return run_generation(cfg, cfg.model.name_or_path, out.expanduser().resolve())


def iterate(cfg: RunConfig, rounds: int | None = None) -> dict:
    """Run (or resume) ``rounds`` (default ``generate.rounds``) on-policy rounds.

    Returns {"finished", "rounds": [per-round summary], "policy": the latest export}.
    ``finished`` is false when a round's training stopped early (SIGTERM, stop_after):
    rerun to continue.
    """
    import ray

    from simpo_ray.models import resolve_model_path
    from simpo_ray.train import train

    cfg.validate()
    n_rounds = rounds or cfg.generate.rounds
    check_settings(cfg)
    _init_ray(cfg)
    policy, done, generators = cfg.model.name_or_path, [], None
    finished = True
    try:
        for k in range(1, n_rounds + 1):
            rd = round_dir(cfg, k)
            if (rd / DONE).exists():
                info = json.loads((rd / DONE).read_text())
                print(f"[simpo-ray] round {k}: done before, policy {info['export_dir']}", flush=True)
                policy = info["export_dir"]
                done.append(info)
                continue
            started = time.time()
            gen_dir = rd / "generated"
            stats_file = gen_dir / "generation.json"
            if stats_file.exists():  # written once every part is done
                gen = json.loads(stats_file.read_text())
            else:
                if cfg.generate.keep_generators and generators is None:
                    generators = start_generators(cfg, resolve_model_path(policy, dataclasses.asdict(cfg.model.tiny)))
                gen = run_generation(cfg, policy, gen_dir, round_index=k, generators=generators)
            print(f"[simpo-ray] round {k}: {gen['pairs']} pairs from {gen['prompts']} prompts "
                  f"(dropped {gen['dropped'] or 'none'})", flush=True)
            _, summary = train(round_config(cfg, k, policy, gen_dir / "pairs"),
                               tracking=RunInfo(rd.name, group=cfg.output.name, tags={"round": k}))
            if not summary["finished"]:
                finished = False
                print(f"[simpo-ray] round {k}: training stopped early; rerun to continue", flush=True)
                break
            policy = summary["export_dir"]
            info = {"round": k, "policy_in": str(gen["policy"]), "export_dir": policy, "run_dir": summary["run_dir"],
                    "pairs": gen["pairs"], "dropped": gen["dropped"], "generation": str(stats_file),
                    "final_metrics": summary["final_metrics"], "wall_s": round(time.time() - started, 1)}
            if generators:  # the next round samples from the new weights, in place
                secs = ray.get([a.load.remote(policy) for a in generators])
                info["weights_update_s"] = max(secs)
            (rd / DONE).write_text(json.dumps(info, indent=1, default=str))
            done.append(info)
    finally:
        if generators:
            stop_actors(generators)
    record = {"finished": finished and len(done) == n_rounds, "rounds": done, "policy": policy}
    (cfg.output.run_dir / "iterate.json").write_text(json.dumps(record, indent=1, default=str))
    return record
