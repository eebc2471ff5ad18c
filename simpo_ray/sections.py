"""The config sections: one dataclass per concern, each validating itself with a ``ConfigError``
naming the dotted field; ``simpo_ray.config`` assembles them into ``RunConfig`` (and re-exports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from simpo_ray.objective import LOSS_NAMES


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted field path."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"config field '{path}': {reason}")


@dataclass
class TinyModelConfig:
    """A small Llama-style model built from this config with a seed (no download)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    seed: int = 0

    def validate(self, path: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _positive(f"{path}.{name}", getattr(self, name))


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a hub name, or "tiny" for the built-in test model.
    name_or_path: str = "tiny"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # float32 or bfloat16 (fp16 is refused by DeepSpeed on CPU and is not worth it on H100).
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # Score completions chunk by chunk from hidden states (never the full logits);
    # 0 uses the model's own logits (automatic for soft-capped models like Gemma-2).
    logps_chunk_size: int = 1024

    def validate(self, path: str) -> None:
        _choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16"))
        _choice(f"{path}.attn_implementation", self.attn_implementation,
                ("sdpa", "eager", "flash_attention_2"))
        if not self.name_or_path:
            raise ConfigError(f"{path}.name_or_path", "must not be empty")
        if self.logps_chunk_size < 0:
            raise ConfigError(f"{path}.logps_chunk_size", "must be >= 0 (0: plain logits)")
        self.tiny.validate(f"{path}.tiny")


@dataclass
class DataConfig:
    # JSONL / JSON / Parquet / CSV files, globs, folders, datasets.save_to_disk folders,
    # or Hugging Face hub names (hf://owner/name@split); a path or a list of them.
    train_files: Union[str, list] = "examples/data/preferences.jsonl"
    # Held-out pairs: a separate file, or else a seeded fraction of the training rows.
    eval_files: Optional[Union[str, list]] = None
    eval_fraction: float = 0.1
    # Take the same share of eval prompts from every response-length quartile.
    eval_stratify: bool = False
    max_length: int = 2048
    max_prompt_length: int = 1800
    # Other column names: {prompt: question, chosen: good, rejected: bad}.
    column_map: dict = field(default_factory=dict)
    # strict: a malformed row stops the run naming file, row and reason.
    # lenient: such rows are dropped and counted per reason.
    strict: bool = True
    seed: int = 0
    shuffle: bool = True
    # Rows each worker mixes per epoch (a seeded local shuffle on top of one global shuffle).
    shuffle_buffer_size: int = 1024
    # Padding-free batches: several sequences per row, attention kept within each sequence
    # (the default: exact for every objective and head; false: padded rows).
    packing: bool = True
    # Packed batches hold each pair's prompt once (prompt | chosen | rejected, rejected
    # attending to the prompt but not to chosen) and attend per sequence, with no dense
    # mask (simpo_ray.segments, simpo_ray.attention). null: on wherever it is verified
    # exact (SDPA/eager attention, models without attention soft-capping); flash-attn keeps
    # its varlen rows unless true.
    share_prompt: Optional[bool] = None
    # Longest packed row in tokens (null: 2 x max_length, under 3% padding on long-tailed
    # data; see benchmarks/README.md). On GPU with flash-attn the worker packs one row.
    pack_max_tokens: Optional[int] = None
    # Token-budget batching: micro-batches hold as many whole pairs as fit in this many
    # tokens (chosen + rejected, prompts counted twice) instead of a fixed pair count;
    # a step is still train.grad_accum_steps micro-batches, its loss a mean over all its
    # pairs; micro_batch_size is then only the read size (see README, Data).
    # "auto" (the default): micro_batch_size x the data's mean packed pair size (at least
    # its largest pair), so a step keeps train.total_batch_size pairs on average; null:
    # fixed micro_batch_size pairs.
    token_budget: Union[int, str, None] = "auto"
    # BOS auto|always|never; special-token strings in text stay text (simpo_ray.tokens).
    add_bos: str = "auto"
    allow_special_tokens_in_text: bool = False
    # Pair hygiene, up to whitespace, case and invisible characters (NFKC): drop repeated
    # pairs (the first is kept) and pairs whose chosen equals rejected; counted per reason.
    dedup: bool = True
    drop_ties: bool = True

    def validate(self, path: str) -> None:
        _choice(f"{path}.add_bos", self.add_bos, ("auto", "always", "never"))
        if not self.train_files:
            raise ConfigError(f"{path}.train_files", "must name at least one file")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{path}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval_stratify and (self.eval_files or self.eval_fraction == 0):
            raise ConfigError(f"{path}.eval_stratify", "stratifies the eval_fraction split; "
                                                       "set eval_fraction > 0 and no eval_files")
        _positive(f"{path}.max_length", self.max_length)
        _positive(f"{path}.max_prompt_length", self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"{path}.max_prompt_length",
                              f"({self.max_prompt_length}) must be below max_length ({self.max_length}) "
                              "so every completion keeps at least one token")
        for k, v in self.column_map.items():
            if k not in ("prompt", "chosen", "rejected"):
                raise ConfigError(f"{path}.column_map.{k}", "keys are prompt, chosen, rejected")
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{path}.column_map.{k}", f"must be a column name, got {v!r}")
        _positive(f"{path}.shuffle_buffer_size", self.shuffle_buffer_size)
        if self.share_prompt and not self.packing:
            raise ConfigError(f"{path}.share_prompt", "shares the prompt inside packed rows; set data.packing=true")
        if self.pack_max_tokens is not None and self.pack_max_tokens < self.max_length:
            raise ConfigError(f"{path}.pack_max_tokens", f"({self.pack_max_tokens}) must be >= max_length "
                                                         f"({self.max_length}) so every sequence fits a row")
        if isinstance(self.token_budget, str) or isinstance(self.token_budget, bool):
            if self.token_budget != "auto":
                raise ConfigError(f"{path}.token_budget", f"must be a number of tokens, 'auto' or null, "
                                                          f"got {self.token_budget!r}")
        elif self.token_budget is not None and self.token_budget < 2 * self.max_length:
            raise ConfigError(f"{path}.token_budget", f"({self.token_budget}) must be >= 2 x max_length "
                                                      f"({2 * self.max_length}) so every pair fits")

    @property
    def pack_row_tokens(self) -> int:
        """The packed row budget in effect."""
        return self.pack_max_tokens or 2 * self.max_length


@dataclass
class SimPOConfig:
    """The objective. gamma_beta_ratio is the margin knob of the official recipes;
    an absolute gamma may be given instead (never both); both are logged."""

    loss: str = "simpo"
    beta: float = 2.0
    gamma_beta_ratio: Optional[float] = 0.5
    gamma: Optional[float] = None
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    # Weight of an SFT (NLL) term on the chosen response; 0 is the paper's method.
    # (CPO and ORPO in their papers add this term: set it, e.g. 1.0, for those.)
    sft_weight: float = 0.0
    # R-DPO's length penalty alpha (only for loss: rdpo).
    rdpo_alpha: float = 0.0
    # Alarm when the average chosen log-prob (per token) falls this far below its
    # first value: the likelihood collapse users report. null turns it off.
    chosen_logp_alarm: Optional[float] = 1.5

    def validate(self, path: str) -> None:
        _choice(f"{path}.loss", self.loss, LOSS_NAMES)
        _choice(f"{path}.loss_type", self.loss_type, ("sigmoid", "hinge"))
        _positive(f"{path}.beta", self.beta)
        if (self.gamma is None) == (self.gamma_beta_ratio is None):
            raise ConfigError(f"{path}.gamma_beta_ratio",
                              "give exactly one of gamma_beta_ratio or gamma "
                              "(set the other to null)")
        for name in ("gamma", "gamma_beta_ratio"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ConfigError(f"{path}.{name}", f"must be a finite number >= 0, got {v}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{path}.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if not math.isfinite(self.sft_weight) or self.sft_weight < 0:
            raise ConfigError(f"{path}.sft_weight", f"must be >= 0, got {self.sft_weight}")
        if self.chosen_logp_alarm is not None:
            _positive(f"{path}.chosen_logp_alarm", self.chosen_logp_alarm)

    @property
    def resolved_gamma(self) -> float:
        return self.gamma if self.gamma is not None else self.beta * self.gamma_beta_ratio

    @property
    def resolved_gamma_beta_ratio(self) -> float:
        return self.gamma_beta_ratio if self.gamma_beta_ratio is not None else self.gamma / self.beta


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def validate(self, path: str) -> None:
        _positive(f"{path}.lr", self.lr)
        for name in ("adam_beta1", "adam_beta2"):  # torch's AdamW refuses these only inside the worker
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{path}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _positive(f"{path}.adam_eps", self.adam_eps)
        _choice(f"{path}.schedule", self.schedule, ("cosine", "linear", "constant"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{path}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _positive(f"{path}.max_grad_norm", self.max_grad_norm)


@dataclass
class TrainConfig:
    """Scaling and cadence. total_batch_size is held fixed when num_workers changes:
    gradient accumulation = total / (micro * workers)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    total_batch_size: int = 128
    micro_batch_size: int = 2
    epochs: int = 1
    # Stop after this many optimizer steps (None: run the epochs out).
    max_steps: Optional[int] = None
    log_every: int = 1
    eval_every: int = 10
    checkpoint_every: int = 50
    seed: int = 42
    # Worker failures survived by restarting from the last checkpoint.
    max_failures: int = 2
    # Stop (with a checkpoint, schedule unchanged) once this many steps are done; a
    # rerun without it continues. For time-limited jobs.
    stop_after: Optional[int] = None
    # Consecutive non-finite losses / gradient norms tolerated (each one skipped).
    max_bad_steps: int = 5
    # Stop with a checkpoint when an alarm fires (alarm/chosen_logp_collapse,
    # alarm/generation) instead of only warning.
    stop_on_alarm: bool = False

    def validate(self, path: str) -> None:
        for name in ("num_workers", "total_batch_size", "micro_batch_size", "epochs",
                     "log_every", "eval_every", "checkpoint_every", "max_bad_steps"):
            _positive(f"{path}.{name}", getattr(self, name))
        if self.max_steps is not None:
            _positive(f"{path}.max_steps", self.max_steps)
        if self.stop_after is not None:
            _positive(f"{path}.stop_after", self.stop_after)
        _positive(f"{path}.cpus_per_worker", self.cpus_per_worker)
        per_round = self.micro_batch_size * self.num_workers
        if self.total_batch_size % per_round:
            raise ConfigError(
                f"{path}.total_batch_size",
                f"{self.total_batch_size} is not divisible by micro_batch_size x num_workers "
                f"= {self.micro_batch_size} x {self.num_workers} = {per_round}")
        if self.max_failures < 0:
            raise ConfigError(f"{path}.max_failures", "must be >= 0")

    @property
    def grad_accum_steps(self) -> int:
        return self.total_batch_size // (self.micro_batch_size * self.num_workers)


@dataclass
class EvalConfig:
    """Generation probes during training (simpo_ray.probes): greedy replies of the live
    policy to a fixed, seeded set of held-out prompts, their gen/ metrics and the
    alarm/generation they raise."""

    # Steps between probes (also at step 0 and the end). None: with every held-out
    # evaluation (train.eval_every); 0: no probes.
    generate_every: Optional[int] = None
    generate_prompts: int = 32
    generate_max_tokens: int = 128
    # alarm/generation: an unfinished / repeat / empty rate more than this above its
    # step-0 value, or the median reply length changed by more than this factor.
    alarm_rate_rise: float = 0.25
    alarm_length_factor: float = 2.0

    def validate(self, path: str) -> None:
        if self.generate_every is not None and self.generate_every < 0:
            raise ConfigError(f"{path}.generate_every", f"must be >= 0 (0: no probes), got {self.generate_every}")
        _positive(f"{path}.generate_prompts", self.generate_prompts)
        _positive(f"{path}.generate_max_tokens", self.generate_max_tokens)
        if not 0.0 < self.alarm_rate_rise <= 1.0:
            raise ConfigError(f"{path}.alarm_rate_rise", f"must be in (0, 1], got {self.alarm_rate_rise}")
        if not self.alarm_length_factor > 1.0:
            raise ConfigError(f"{path}.alarm_length_factor", f"must be > 1, got {self.alarm_length_factor}")


@dataclass
class DeepSpeedConfig:
    stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # Extra keys merged last into the generated DeepSpeed JSON (expert escape hatch).
    overrides: dict = field(default_factory=dict)

    def validate(self, path: str) -> None:
        _choice(f"{path}.stage", self.stage, (0, 1, 2, 3))
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"{path}.offload_params", "parameter offload needs stage 3")


@dataclass
class RayConfig:
    # None: join $RAY_ADDRESS if set, else start a private local cluster.
    address: Optional[str] = None
    # Logical CPUs declared for a local cluster. Ray Data only gets the CPUs Train does
    # not hold (with none left its read waits forever), so this is more than the workers
    # need; null: train.init_ray's default (the workers' CPUs + 2, at least the cores).
    num_cpus: Optional[int] = None
    # The cluster this config is written for (nodes x GPUs per node); `simpo-ray plan`
    # uses them as its defaults. Informational otherwise: train.num_workers is what runs.
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None

    def validate(self, path: str) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) is not None:
                _positive(f"{path}.{name}", getattr(self, name))


def _choice(path: str, value, options) -> None:
    if value not in options:
        raise ConfigError(path, f"must be one of {', '.join(map(str, options))}; got {value!r}")


def _positive(path: str, value) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(path, f"must be > 0, got {value!r}")
