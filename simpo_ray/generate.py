"""On-policy data: prompts -> N samples per prompt -> reward scores -> best/worst pairs.

    prompts (``simpo_ray.prompts``; Ray Data: read, normalize, render, tokenize)
      -> generator actors (``simpo_ray.generators``: vLLM, or transformers ``generate``)
      -> reward-scorer actors (``simpo_ray.reward``: a sequence-classification model)
      -> ``simpo_ray.pairs`` (pure) -> Parquet parts in the training format

This module is the pipeline between them. Generated token ids go to training as they
are (the data layer reads ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` from the
rows); the text beside them is for people and for the reward model.

Output folder: ``samples/part-NNNNN.parquet`` (every sample with its score),
``pairs/part-NNNNN.parquet`` (the training rows), ``parts/part-NNNNN.json`` (a
part's counts; written last, so it marks the part done: a rerun skips done parts),
``manifest.json`` (the settings and prompts the parts were made with: a rerun with
others is refused by ``config.check_rerun``), ``generation.json`` (totals).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

from simpo_ray.config import check_rerun
from simpo_ray.generators import start_generators, stop_actors
from simpo_ray.prompts import read_prompts
from simpo_ray.reward import start_scorers

# The fields of a settings record that may change between reruns (``generate`` and
# ``iterate`` alike): resources and round counts only, which change nothing in the output.
GENERATE_FREE = tuple(f"generate.{k}" for k in (
    "num_generators", "cpus_per_generator", "keep_generators", "rounds", "output",
    "reward.num_scorers", "reward.cpus_per_scorer"))


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def _write_part(out: Path, index: int, batch: list[dict], gen: dict, scored: dict, *,
                policy: str, round_index: int, min_margin: float) -> dict:
    from simpo_ray.pairs import build_pairs

    prompts = {p["prompt_id"]: p for p in batch}
    candidates = {r["prompt_id"]: r["samples"] for r in gen["results"]}
    scores = scored["scores"]
    rows, counts = build_pairs(prompts, candidates, scores, policy=policy, round_index=round_index,
                               min_margin=min_margin)
    name = f"part-{index:05d}"
    _write_parquet([dict(s, prompt_id=pid, score=scores[pid][s["sample"]], policy=policy, round=round_index)
                    for pid in sorted(candidates) for s in candidates[pid]], out / "samples" / f"{name}.parquet")
    if rows:
        _write_parquet(rows, out / "pairs" / f"{name}.parquet")
    finish = Counter(s["finish_reason"] for v in candidates.values() for s in v)
    counts.update(samples=sum(len(v) for v in candidates.values()), tokens=gen["tokens"],
                  generate_s=gen["seconds"], finish_reasons=dict(finish), reward_truncated=scored["truncated"])
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "parts" / f"{name}.json").write_text(json.dumps(counts))  # last: the part is done
    return counts


def manifest(cfg, policy_path: str, round_index: int, prompts: list[dict]) -> dict:
    """What a folder's parts are made from: the policy, the round, the prompts (a hash
    of their ids and tokens) and the generate settings."""
    ids = hashlib.sha256(json.dumps([[p["prompt_id"], p["prompt_ids"]] for p in prompts]).encode()).hexdigest()
    return {"policy": str(policy_path), "round": round_index, "prompts": ids[:16],
            "generate": dataclasses.asdict(cfg.generate), "trust_remote_code": cfg.model.trust_remote_code}


def check_manifest(out: Path, cfg, policy_path: str, round_index: int, prompts: list[dict]) -> None:
    """Parts written before were made with these settings and prompts, or a ConfigError:
    a rerun must never mix two configurations in one output folder."""
    check_rerun(Path(out) / "manifest.json", manifest(cfg, policy_path, round_index, prompts), "samples",
                GENERATE_FREE)


def run_generation(cfg, policy_path: str, out_dir, round_index: int = 0, generators=None) -> dict:
    """Generate, score and pair every prompt into ``out_dir``; returns the totals
    (also in ``out_dir/generation.json``). ``generators``: actors to use (kept alive
    by the caller); by default they are started here and stopped at the end, as are
    the scorers. Parts already done in ``out_dir`` are skipped."""
    from ray.util.actor_pool import ActorPool

    from simpo_ray.models import resolve_model_path

    g = cfg.generate
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    path = resolve_model_path(policy_path, dataclasses.asdict(cfg.model.tiny))
    prompts, prompt_stats = read_prompts(cfg, path)
    batches = [prompts[i:i + g.batch_size] for i in range(0, len(prompts), g.batch_size)]
    check_manifest(out, cfg, policy_path, round_index, prompts)
    todo = [i for i in range(len(batches)) if not (out / "parts" / f"part-{i:05d}.json").exists()]
    print(f"[simpo-ray] generate: {len(prompts)} prompts x {g.num_samples} samples from {policy_path} "
          f"({g.backend}, {g.num_generators} generator(s)); {len(batches) - len(todo)} of {len(batches)} parts "
          "already done", flush=True)
    own = generators is None and bool(todo)
    gens = (start_generators(cfg, path) if own else generators) if todo else []
    scorers = start_scorers(cfg) if todo else []
    gen_s = time.perf_counter()
    try:
        gen_pool, score_pool = ActorPool(gens), ActorPool(scorers)
        for i in todo:
            gen_pool.submit(lambda a, i: a.generate.remote(i, batches[i], round_index), i)
        pending: dict = {}

        def finish(scored):
            i, gen = scored["index"], pending.pop(scored["index"])
            c = _write_part(out, i, batches[i], gen, scored, policy=str(policy_path),
                            round_index=round_index, min_margin=g.min_score_margin)
            print(f"[simpo-ray] part {i + 1}/{len(batches)}: {c['pairs']} pairs, dropped {c['dropped'] or 'none'}, "
                  f"{c['tokens'] / max(c['generate_s'], 1e-9):.0f} tok/s", flush=True)

        while gen_pool.has_next():  # score each batch as soon as it is generated
            gen = gen_pool.get_next_unordered()
            pending[gen["index"]] = gen
            turns = {p["prompt_id"]: p["prompt"] for p in batches[gen["index"]]}
            items = [{"prompt_id": r["prompt_id"], "prompt": turns[r["prompt_id"]],
                      "samples": [{"sample": x["sample"], "text": x["text"]} for x in r["samples"]]}
                     for r in gen["results"]]
            score_pool.submit(lambda a, v: a.score.remote(v[1], index=v[0]), (gen["index"], items))
            while score_pool.has_next():
                try:
                    finish(score_pool.get_next_unordered(timeout=0))
                except TimeoutError:
                    break
        while score_pool.has_next():
            finish(score_pool.get_next_unordered())
    finally:
        stop_actors(scorers + (gens if own else []))
    wall = time.perf_counter() - gen_s
    totals = _totals(out, len(batches))
    totals.update(prompt_stats, policy=str(policy_path), round=round_index, backend=g.backend,
                  wall_s=round(time.time() - started, 1), pipeline_s=round(wall, 2) if todo else None,
                  pairs_dir=str(out / "pairs"), done=True)
    (out / "generation.json").write_text(json.dumps(totals, indent=1))
    return totals


def _totals(out: Path, n_parts: int) -> dict:
    """The sum of every part's counts."""
    tot: dict = {"parts": n_parts, "prompts": 0, "pairs": 0, "samples": 0, "tokens": 0, "generate_s": 0.0,
                 "empty_samples": 0, "duplicate_samples": 0, "reward_truncated": 0,
                 "dropped": Counter(), "finish_reasons": Counter()}
    for i in range(n_parts):
        c = json.loads((out / "parts" / f"part-{i:05d}.json").read_text())
        for k, v in c.items():
            tot[k] = tot[k] + (Counter(v) if isinstance(tot[k], Counter) else v)
    tot["dropped"], tot["finish_reasons"] = dict(sorted(tot["dropped"].items())), dict(tot["finish_reasons"])
    tot["dropped_total"] = sum(tot["dropped"].values())
    tot["generate_s"] = round(tot["generate_s"], 2)
    return tot
