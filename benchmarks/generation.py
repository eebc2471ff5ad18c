"""Generated tokens/s: the generator actor pool against one plain vLLM engine, same prompts.

Baseline (plain): one ``vllm.LLM`` in a process of its own (not Ray), every request
(prompt x sample, each with its per-sample seed) in one ``generate`` call, with as many
threads as the machine has cores (also shown: with 1 thread, one actor's share).
Pool: ``simpo_ray.generators`` generator actors (1 CPU each) in a private local Ray
cluster, the prompts cut into batches of ``--batch-size`` and spread over the actors by
``ray.util.ActorPool``, exactly as ``simpo-ray generate`` runs them (scoring left out).

Both use the tiny model of examples/onpolicy_tiny_cpu.yaml (hidden 64, 2 heads), float32,
eager mode, a 64 MiB KV cache, the same sampling settings and seeds; the check column says
whether the pool produced exactly the plain engine's token ids. Engine start-up is not
timed (reported separately). Each measurement is the fastest of --repeats runs (load from
other processes only ever adds), the configurations interleaved run by run.

    python benchmarks/generation.py               # the table in benchmarks/README.md
    python benchmarks/generation.py --smoke       # a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cfg(args, generators: int):
    from simpo_ray.config import RunConfig

    return RunConfig.from_yaml(os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml"), [
        f"generate.num_samples={args.samples}", f"generate.max_tokens={args.max_tokens}",
        f"generate.num_generators={generators}", f"generate.batch_size={args.batch_size}"])


def _prompts(args):
    from transformers import AutoTokenizer

    from simpo_ray.models import resolve_model_path
    from simpo_ray.prompts import encode_prompt

    cfg = _cfg(args, 1)
    path = resolve_model_path("tiny", dataclasses.asdict(cfg.model.tiny))
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(x) for x in open(os.path.join(REPO, "examples", "data", "preferences.jsonl"))]
    out = [{"prompt_id": f"p{i:04d}", "prompt_ids": encode_prompt(tok, [{"role": "user", "content": r["prompt"]}], 128)}
           for i, r in enumerate(rows[:args.prompts])]
    return cfg, path, out


def plain_worker(spec_file: str) -> None:
    """The baseline, in its own process: one engine, one generate call per repeat."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.load(open(spec_file))
    import torch

    torch.set_num_threads(spec["threads"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from simpo_ray.generators import GeneratorSettings
    from simpo_ray.prompts import sample_seed

    s = GeneratorSettings.from_dict(spec["settings"])
    t = time.perf_counter()
    # the same engine arguments as the actors' (simpo_ray.generators.VLLMBackend on CPU)
    llm = LLM(model=spec["path"], dtype=s.dtype, seed=s.seed, enforce_eager=True,
              enable_chunked_prefill=False, **s.engine_kwargs)
    startup = time.perf_counter() - t
    reqs, params, keys = [], [], []
    for p in spec["prompts"]:
        for j in range(s.num_samples):
            seed = sample_seed(s.seed, 0, p["prompt_id"], j)
            reqs.append(TokensPrompt(prompt_token_ids=p["prompt_ids"]))
            params.append(SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                         max_tokens=s.max_tokens, seed=seed))
            keys.append(f"{p['prompt_id']}:{j}")
    llm.generate(reqs[:8], params[:8], use_tqdm=False)  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    ids = {k: list(o.outputs[0].token_ids) for k, o in zip(keys, outs)}
    json.dump({"startup": startup, "times": times, "ids": ids}, open(spec["out"], "w"))


def run_plain(args, path, prompts, settings, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec = os.path.join(d, "spec.json")
        json.dump({"path": path, "prompts": prompts, "settings": settings, "repeats": 1, "threads": threads,
                   "out": os.path.join(d, "out.json")}, open(spec, "w"))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        r = subprocess.run([sys.executable, __file__, "--plain-worker", spec], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            raise RuntimeError(f"plain vLLM run failed:\n{r.stderr[-3000:]}")
        return json.load(open(os.path.join(d, "out.json")))


def run_pool(actors, batches) -> tuple[float, dict]:
    from ray.util.actor_pool import ActorPool

    pool = ActorPool(actors)
    t = time.perf_counter()
    results = list(pool.map_unordered(lambda a, v: a.generate.remote(v[0], v[1], 0), list(enumerate(batches))))
    elapsed = time.perf_counter() - t
    ids = {f"{r['prompt_id']}:{s['sample']}": s["token_ids"] for res in results for r in res["results"]
           for s in r["samples"]}
    return elapsed, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per request to one actor")
    ap.add_argument("--generators", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    if args.smoke:
        args.prompts, args.max_tokens, args.repeats, args.generators = 16, 16, 1, [1]

    import ray

    from simpo_ray.generators import GeneratorSettings, start_generators, stop_actors

    os.environ.setdefault("SIMPO_RAY_CACHE", tempfile.mkdtemp(prefix="simpo-ray-bench-"))
    cfg, path, prompts = _prompts(args)
    settings = GeneratorSettings.from_config(cfg).to_dict()
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    ray.init(address="local", num_cpus=max(4, max(args.generators) + 1), include_dashboard=False)
    pools = {}
    for k in args.generators:
        t = time.perf_counter()
        actors = start_generators(_cfg(args, k), path)
        ray.get([a.generate.remote(-1, prompts[:2], 0) for a in actors])  # warm-up
        pools[k] = (actors, time.perf_counter() - t)
    cores = os.cpu_count() or 1
    plain = sorted({1, cores})  # threads: one actor's share, and the whole machine (the baseline)
    best = {**{("plain", t): float("inf") for t in plain}, **{k: float("inf") for k in args.generators}}
    plain_ids, pool_ids, plain_startup = {}, {}, {}
    try:
        for _ in range(args.repeats):  # interleaved: drifting load hits every configuration alike
            for k, (actors, _) in pools.items():
                secs, pool_ids[k] = run_pool(actors, batches)
                best[k] = min(best[k], secs)
            for t in plain:
                out = run_plain(args, path, prompts, settings, t)
                best["plain", t] = min(best["plain", t], min(out["times"]))
                plain_ids[t], plain_startup[t] = out["ids"], out["startup"]
    finally:
        for actors, _ in pools.values():
            stop_actors(actors)
        ray.shutdown()
    ref = plain_ids[cores]
    tokens = sum(len(v) for v in ref.values())
    base = best["plain", cores]
    print(f"{len(prompts)} prompts x {args.samples} samples, max_tokens {args.max_tokens}, "
          f"batch {args.batch_size} prompts per request; {tokens} tokens; best of {args.repeats}; {cores} cores\n")
    print("| engine | generators | threads each | s | tokens/s | ratio vs plain | start-up s | same token ids |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for t in reversed(plain):
        print(f"| plain vLLM (one process, one call) | - | {t} | {best['plain', t]:.2f} | "
              f"{tokens / best['plain', t]:.0f} | {base / best['plain', t]:.2f} | {plain_startup[t]:.1f} | "
              f"{'-' if t == cores else ('yes' if plain_ids[t] == ref else 'NO')} |")
    for k, (_, startup) in pools.items():
        n = sum(len(v) for v in pool_ids[k].values())
        print(f"| actor pool | {k} | 1 | {best[k]:.2f} | {n / best[k]:.0f} | {base / best[k]:.2f} "
              f"| {startup:.1f} | {'yes' if pool_ids[k] == ref else 'NO'} |")


if __name__ == "__main__":
    main()
