"""A sweep file (``tune/*.yaml``): the spec dataclasses, the search space and the configs
it makes.

A sweep names a base training config (a YAML path relative to the sweep file, or an
inline mapping), dotted overrides for every trial, a search space over any config
field not fixed for the whole sweep, the scheduler, the resources per trial and what
counts as divergence. Everything here is plain Python (no Ray): ``sweep`` runs it with
Ray Tune, ``sweep_report`` tabulates the trials.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from simpo_ray.config import ConfigError, RunConfig, build, load_yaml, merged, parse_override, set_dotted
from simpo_ray.metrics import COLLAPSE_ALARM
from simpo_ray.probes import GENERATION_ALARM

# The learning rates the SimPO paper and its recipes use for 7-9B instruct models.
PAPER_LR = (3e-7, 1e-6)
DOMAINS = ("grid", "choice", "uniform", "loguniform")
# Fields the sweep owns: resources come from the sweep file; the total batch stays fixed
# across trials (gradient accumulation adapts); the data (and reference log-probs) are
# prepared once for all trials; output and ray are per sweep.
NOT_SEARCHABLE = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.total_batch_size",
                  "train.log_every", "train.eval_every", "data.", "model.name_or_path", "simpo.loss",
                  "output.", "ray.")


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha | fifo (no early stopping)
    # In optimizer steps (ASHA's time attribute is the worker's "step").
    grace_period: int = 10
    reduction_factor: float = 3.0
    max_t: Optional[int] = None  # None: the base config's total steps

    def validate(self, path: str) -> None:
        if self.type not in ("asha", "fifo"):
            raise ConfigError(f"{path}.type", f"must be asha or fifo; got {self.type!r}")
        if self.grace_period < 1:
            raise ConfigError(f"{path}.grace_period", "must be >= 1")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{path}.reduction_factor", "must be > 1")


@dataclass
class ResourceSpec:
    """Per trial: the Train workers, plus a small reservation for the trial itself."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trial_cpus: float = 0.1  # the trial only waits on its trainer (0 is rejected by Tune)
    # CPUs left free for Ray Data and the Train controllers (they starve otherwise).
    reserve_cpus: float = 1.0
    max_concurrent: Optional[int] = None  # cap; None: as many as the cluster fits

    def validate(self, path: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{path}.num_workers", "must be >= 1")
        for name in ("cpus_per_worker", "trial_cpus"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}", "must be > 0")
        if self.reserve_cpus < 0:
            raise ConfigError(f"{path}.reserve_cpus", "must be >= 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"{path}.max_concurrent", "must be >= 1")


@dataclass
class DivergenceSpec:
    # Boolean metrics that mark a trial as diverged (besides a non-finite loss).
    alarms: list = field(default_factory=lambda: [COLLAPSE_ALARM, GENERATION_ALARM])


@dataclass
class FailureSpec:
    # Retries of a trial that errors while the sweep runs (from its last Train checkpoint).
    max_failures: int = 0
    # Errored trials when a sweep is resumed: resume (same trial id, from its last Train
    # checkpoint), restart (a new trial with the same config, from scratch) or skip.
    on_resume: str = "resume"

    def validate(self, path: str) -> None:
        if self.on_resume not in ("resume", "restart", "skip"):
            raise ConfigError(f"{path}.on_resume", f"must be resume, restart or skip; got {self.on_resume!r}")


@dataclass
class SweepSpec:
    name: str = "sweep"
    # A training config: a YAML path (relative to the sweep file) or an inline mapping.
    base: Union[str, dict] = "examples/tiny_cpu.yaml"
    overrides: dict = field(default_factory=dict)  # dotted keys applied to the base
    storage: Optional[str] = None  # experiment folder = storage/name; None: <output.root>/sweeps
    num_samples: int = 8
    seed: int = 0
    search: str = "random"  # random | optuna | hyperopt
    report_every: int = 10  # held-out accuracy every K steps (every report carries it)
    # The default lr space is the paper's 3e-7..1e-6 times this (1 for 7-9B models).
    lr_scale: float = 1.0
    search_space: dict = field(default_factory=dict)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    divergence: DivergenceSpec = field(default_factory=DivergenceSpec)
    failures: FailureSpec = field(default_factory=FailureSpec)
    source: Optional[str] = None  # the sweep file's folder (set by load_spec)

    def validate(self) -> "SweepSpec":
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty folder name, got {self.name!r}")
        if self.num_samples < 1:
            raise ConfigError("num_samples", "must be >= 1")
        if self.report_every < 1:
            raise ConfigError("report_every", "must be >= 1")
        if self.search not in ("random", "optuna", "hyperopt"):
            raise ConfigError("search", f"must be random, optuna or hyperopt; got {self.search!r}")
        if self.lr_scale <= 0:
            raise ConfigError("lr_scale", "must be > 0")
        for name in ("scheduler", "resources", "failures"):
            getattr(self, name).validate(name)
        if self.scheduler.type == "asha" and self.scheduler.grace_period % self.report_every:
            raise ConfigError("scheduler.grace_period",
                              f"({self.scheduler.grace_period}) must be a multiple of report_every "
                              f"({self.report_every}): ASHA decides on held-out accuracy")
        space = search_space(self)
        if self.search != "random" and any("grid" in d for d in space.values()):
            raise ConfigError("search_space", f"grid needs search: random ({self.search} samples)")
        base = base_config(self)
        if base.data.eval_files is None and base.data.eval_fraction == 0:
            raise ConfigError("base.data.eval_fraction",
                              "a sweep needs held-out pairs (eval_files or eval_fraction > 0)")
        base = base.to_dict()
        for key, dom in space.items():  # every bound must make a valid config
            for v in dom.get("grid") or dom.get("choice") or dom.get("uniform") or dom["loguniform"]:
                trial_config(base, {key: v})
        return self


def load_spec(path: Union[str, Path], overrides: Optional[list] = None) -> SweepSpec:
    """Read a sweep file. Overrides: ``num_samples=4 scheduler.grace_period=2`` set sweep
    fields; ``search_space.optim.lr={grid: [1e-3]}`` a search entry; any other dotted key
    (``train.max_steps=8``) goes to the base config's overrides."""
    path = Path(path)
    data = load_yaml(path, "sweep")
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    for item in overrides or []:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head in ("search_space", "overrides") and rest:
            data = _put(data, head, rest, value)
        elif head in names:
            data = set_dotted(data, key, value)
        else:
            data = _put(data, "overrides", key, value)
    data["source"] = str(path.resolve().parent)
    return build(SweepSpec, data, "").validate()


def _put(data: dict, section: str, key: str, value) -> dict:
    """Set one entry of a mapping whose keys are dotted names themselves (one level)."""
    entries = data.get(section) or {}
    if not isinstance(entries, dict):
        raise ConfigError(section, f"expected a mapping, got {type(entries).__name__}")
    return set_dotted(data, section, {**entries, key: value})


def _raw_base(spec: SweepSpec) -> dict:
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    p = Path(spec.base)
    if not p.is_absolute() and spec.source and (Path(spec.source) / p).exists():
        p = Path(spec.source) / p
    return load_yaml(p, "base training config")


def base_config(spec: SweepSpec) -> RunConfig:
    """The base training config with the sweep's resources, cadence and fixed values.
    Trials export nothing (the best config is re-run to get a model)."""
    fixed = {k: v for k, v in spec.search_space.items() if not isinstance(v, dict)}
    r, k = spec.resources, spec.report_every
    owned = {"train.num_workers": r.num_workers, "train.cpus_per_worker": r.cpus_per_worker,
             "train.use_gpu": r.use_gpu, "train.log_every": k, "train.eval_every": k}
    data = merged(_raw_base(spec), {**spec.overrides, **fixed, **owned})
    cfg = RunConfig.from_dict(data)
    # Every report must carry held-out accuracy, so checkpoints fall on report steps too.
    then = {"train.checkpoint_every": k * max(1, math.ceil(cfg.train.checkpoint_every / k))}
    name_or_path = cfg.model.name_or_path
    if name_or_path != "tiny" and Path(name_or_path).exists():  # trials run in their own cwd
        then["model.name_or_path"] = str(Path(name_or_path).resolve())
    return RunConfig.from_dict(merged(data, then))


def search_space(spec: SweepSpec) -> dict:
    """Dotted key -> {"grid"|"choice"|"uniform"|"loguniform": values}, the defaults filled in:
    lr log-uniform over the paper's range x lr_scale, beta 2..10, gamma_beta_ratio 0..1."""
    out = {
        "optim.lr": {"loguniform": [PAPER_LR[0] * spec.lr_scale, PAPER_LR[1] * spec.lr_scale]},
        "simpo.beta": {"uniform": [2.0, 10.0]},
        "simpo.gamma_beta_ratio": {"uniform": [0.0, 1.0]},
    }
    if "simpo.gamma" in spec.search_space:  # an absolute margin replaces the ratio
        out.pop("simpo.gamma_beta_ratio")
    for key, dom in spec.search_space.items():
        path = f"search_space.{key}"
        if any(key == n or (n.endswith(".") and key.startswith(n)) for n in NOT_SEARCHABLE):
            raise ConfigError(path, "is fixed for the whole sweep (resources, cadence, total batch, "
                                    "the data prepared once), not searched")
        if not isinstance(dom, dict):
            out.pop(key, None)  # a plain value: fixed for every trial (set in the base)
            continue
        if len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise ConfigError(path, f"must be a value or one of {{{', '.join(DOMAINS)}: ...}}; got {dom!r}")
        kind, vals = next(iter(dom.items()))
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{path}.{kind}", f"must be a non-empty list; got {vals!r}")
        if kind in ("uniform", "loguniform"):
            try:
                lo, hi = (float(v) for v in vals)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}.{kind}", f"must be [low, high] numbers; got {vals!r}") from None
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ConfigError(f"{path}.{kind}", f"needs 0 <= low < high (low > 0 for log); got {vals!r}")
            vals = [lo, hi]
        out[key] = {kind: vals}
    return out


def trial_config(base: dict, sampled: dict) -> RunConfig:
    """Merge a trial's sampled values (dotted keys) into the base config dict, validated."""
    sampled = dict(sampled)
    if "simpo.gamma_beta_ratio" in sampled and "simpo.gamma" not in sampled:
        sampled["simpo.gamma"] = None  # never both
    if "simpo.gamma" in sampled and "simpo.gamma_beta_ratio" not in sampled:
        sampled["simpo.gamma_beta_ratio"] = None
    return RunConfig.from_dict(merged(base, sampled))


def concurrency(cluster: dict, r: ResourceSpec) -> int:
    """How many trials fit at once: each holds trial_cpus plus its workers' CPUs (and GPUs)."""
    per_trial = r.trial_cpus + r.num_workers * r.cpus_per_worker
    n = math.floor((cluster.get("CPU", 0) - r.reserve_cpus) / per_trial + 1e-9)
    if r.use_gpu:
        n = min(n, math.floor(cluster.get("GPU", 0) / r.num_workers + 1e-9))
    if r.max_concurrent:
        n = min(n, r.max_concurrent)
    if n < 1:
        gpus = f" and {r.num_workers} GPUs" if r.use_gpu else ""
        raise ConfigError("resources", f"one trial needs {per_trial:g} CPUs{gpus} (+{r.reserve_cpus:g} reserved) "
                                       f"but the cluster has {cluster.get('CPU', 0):g} CPUs, "
                                       f"{cluster.get('GPU', 0):g} GPUs")
    return n


def describe(spec: SweepSpec) -> str:
    """The resolved sweep: its fields and the search space with the defaults filled in."""
    d = dataclasses.asdict(spec)
    d.pop("source")
    d["search_space"] = search_space(spec)
    return yaml.safe_dump(d, sort_keys=False)
