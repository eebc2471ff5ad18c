"""sweep(spec): Ray Tune over Ray Train. Each trial is a full SimPO training run.

A sweep file (``tune/*.yaml``) names a base training config, a search space over any
config field, the scheduler and the resources per trial. The driver prepares the data
once; every trial merges its sampled values into the base config and runs the same
TorchTrainer as ``simpo-ray train`` (DeepSpeed ZeRO-3 workers), forwarding the workers'
reports to Tune. ASHA stops weak trials on held-out pairwise accuracy (``OBJECTIVE``,
the constant the worker reports under); a stopper ends trials that diverge.

Why a function trainable: Ray Train V2 has no ``Tuner(TorchTrainer)``. The trial holds a
small CPU reservation and builds the trainer; the trainer's workers get their own
placement group, which Tune cannot see, so concurrency is computed from the cluster's
resources here (workers that do not fit wait, then die with WorkerGroupStartupTimeoutError).

Experiment folder (``storage/name``): Tune's state and trial folders, ``trials/<id>/``
(each trial's Ray Train run with its checkpoints), ``spec.yaml``, ``results.csv``,
``best_config.yaml``, ``sweep.png`` and ``summary.json``. Rerunning the same command
after the driver died restores the experiment (``Tuner.restore``): finished trials are
kept, unfinished ones resume from their latest Train checkpoint, errored ones resume
too, restart from scratch or stay errored (``failures.on_resume``). ASHA's rung records
are rebuilt from the trials' recorded reports.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from simpo_ray.config import OBJECTIVE, ConfigError, RunConfig, _build, apply_overrides

# The learning rates the SimPO paper and its recipes use for 7-9B instruct models.
PAPER_LR = (3e-7, 1e-6)
DOMAINS = ("grid", "choice", "uniform", "loguniform")
# Fields the sweep owns: resources come from the sweep file; the total batch stays fixed
# across trials (gradient accumulation adapts); the data (and reference log-probs) are
# prepared once for all trials; output and ray are per sweep.
NOT_SEARCHABLE = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.total_batch_size",
                  "train.log_every", "train.eval_every", "data.", "model.name_or_path", "simpo.loss",
                  "output.", "ray.")
COLLAPSE_ALARM = "alarm/chosen_logp_collapse"


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
    alarms: list = field(default_factory=lambda: [COLLAPSE_ALARM])


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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("<file>", f"sweep file not found: {path}") from None
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{path} must hold a mapping at the top level")
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(item, "override must look like key.sub=value")
        value = yaml.safe_load(raw) if raw else ""
        head, _, rest = key.strip().partition(".")
        if head in ("search_space", "overrides") and rest:
            data.setdefault(head, {})[rest] = value
        elif head in names:
            data = apply_overrides(data, [item])
        else:
            data.setdefault("overrides", {})[key.strip()] = value
    data["source"] = str(path.resolve().parent)
    return _build(SweepSpec, data, "").validate()


def _raw_base(spec: SweepSpec) -> dict:
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    p = Path(spec.base)
    if not p.is_absolute() and spec.source and (Path(spec.source) / p).exists():
        p = Path(spec.source) / p
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("base", f"training config not found: {spec.base}") from None
    if not isinstance(data, dict):
        raise ConfigError("base", f"{p} must hold a mapping")
    return data


def base_config(spec: SweepSpec) -> RunConfig:
    """The base training config with the sweep's resources, cadence and fixed values.
    Trials export nothing (the best config is re-run to get a model)."""
    fixed = {k: v for k, v in spec.search_space.items() if not isinstance(v, dict)}
    data = merged(_raw_base(spec), {**spec.overrides, **fixed})
    r, k = spec.resources, spec.report_every
    t = data.setdefault("train", {})
    t.update(num_workers=r.num_workers, cpus_per_worker=r.cpus_per_worker, use_gpu=r.use_gpu,
             log_every=k, eval_every=k)
    # Every report must carry held-out accuracy, so checkpoints fall on report steps too.
    t["checkpoint_every"] = k * max(1, math.ceil(int(t.get("checkpoint_every", 50)) / k))
    name_or_path = (data.get("model") or {}).get("name_or_path", "tiny")
    if name_or_path != "tiny" and Path(name_or_path).exists():  # trials run in their own cwd
        data["model"]["name_or_path"] = str(Path(name_or_path).resolve())
    return RunConfig.from_dict(data)


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


def to_tune(space: dict) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {k: make[kind](v) for k, d in space.items() for kind, v in d.items()}


def trial_config(base: dict, sampled: dict) -> RunConfig:
    """Merge a trial's sampled values (dotted keys) into the base config dict, validated."""
    sampled = dict(sampled)
    if "simpo.gamma_beta_ratio" in sampled and "simpo.gamma" not in sampled:
        sampled["simpo.gamma"] = None  # never both
    if "simpo.gamma" in sampled and "simpo.gamma_beta_ratio" not in sampled:
        sampled["simpo.gamma_beta_ratio"] = None
    return RunConfig.from_dict(merged(base, sampled))


def merged(data: dict, values: dict) -> dict:
    """A copy of a config dict with dotted keys set to values (already parsed)."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        node, parts = out, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{p}' is not a section")
        node[parts[-1]] = copy.deepcopy(value)
    return out


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


def divergence(result: dict, alarms=(COLLAPSE_ALARM,)) -> Optional[str]:
    """Why a report shows a diverged run (a non-finite loss, a raised alarm, or the
    marker a trial adds when its workers stopped on non-finite losses), else None."""
    if result.get("diverged"):
        return str(result["diverged"])
    for key in ("loss", "eval/loss"):
        v = result.get(key)
        if isinstance(v, (int, float)) and not math.isfinite(v):
            return f"{key} is {v}"
    for key in alarms:
        v = result.get(key)
        if isinstance(v, (bool, int, float)) and v > 0:
            return key
    return None


class DivergenceStopper:
    """Tune's ``stop``: ends a trial whose report shows divergence (the table marks it).
    A plain callable (Tune wraps it in a FunctionStopper), so importing this module
    does not import Ray Tune."""

    def __init__(self, alarms):
        self.alarms = list(alarms)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return divergence(result, self.alarms) is not None


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(config: dict, *, base: dict, datasets: dict, base_plan: dict, stats: dict,
              model_path: str, train_root: str) -> None:
    """One trial (runs in a Tune actor): the sampled config -> a TorchTrainer whose
    reports are forwarded to Tune. Its Train run is trials/<trial id>, so a restored
    trial resumes from its latest checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from simpo_ray.train import make_plan, make_trainer, progress_callback

    cfg = trial_config(base, config)
    base_cfg = RunConfig.from_dict(base)
    if (cfg.train, cfg.model, cfg.data) == (base_cfg.train, base_cfg.model, base_cfg.data):
        # Steps and padding do not change; skip make_plan's tokenizer load (and the
        # transformers import) in every trial.
        plan = dict(base_plan, margin={"gamma": cfg.simpo.resolved_gamma,
                                       "gamma_beta_ratio": cfg.simpo.resolved_gamma_beta_ratio})
    else:
        plan = make_plan(cfg, stats, model_path, has_eval=True)
    trial_id = ray.tune.get_context().get_trial_id()
    # The trial's Train run folder looks like a `simpo-ray train` run folder. Its
    # metrics.jsonl is appended across restarts (Tune's own result.json starts over
    # when a trial without a Tune checkpoint is resumed), so the table reads it.
    run_dir = Path(train_root) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    callbacks = [progress_callback(str(run_dir), plan["total_steps"]), TuneReportCallback()]
    try:
        make_trainer(cfg, datasets, plan, callbacks, storage_path=train_root, name=trial_id).fit()
    except Exception as e:
        why = diverged_error(e)
        if why is None:
            raise
        # The workers stopped on non-finite losses (train.max_bad_steps): the trial ends
        # as diverged instead of erroring, so Tune does not retry it.
        last = dict((read_reports(run_dir / "metrics.jsonl") or [{"step": 0}])[-1], diverged=why)
        last.setdefault(OBJECTIVE, float("nan"))
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(last) + "\n")
        ray.tune.report({k: v for k, v in last.items() if isinstance(v, (bool, int, float, str))})


def diverged_error(e: Exception) -> Optional[str]:
    """The first line of a worker's FloatingPointError (non-finite losses), else None."""
    for err in [e, *getattr(e, "worker_failures", {}).values()]:
        if isinstance(err, FloatingPointError) or "FloatingPointError" in str(err):
            text = str(err)
            line = next((x for x in text.splitlines() if "non-finite" in x), text.splitlines()[0] if text else "")
            return line.strip()[:300] or "FloatingPointError"
    return None


def describe(spec: SweepSpec) -> str:
    """The resolved sweep: its fields and the search space with the defaults filled in."""
    d = dataclasses.asdict(spec)
    d.pop("source")
    d["search_space"] = search_space(spec)
    return yaml.safe_dump(d, sort_keys=False)


def run_sweep(spec: SweepSpec, address: Optional[str] = None) -> dict:
    """Run (or resume) a sweep; returns the summary (also written to summary.json).
    ``address``: join this Ray cluster (default: the base config's, $RAY_ADDRESS, else local)."""
    import ray
    from ray import tune

    from simpo_ray.train import prepare

    base = base_config(spec)
    base.output.export = False
    if address:
        base.ray.address = address
    storage = Path(spec.storage or Path(base.output.root) / "sweeps").expanduser().resolve()
    exp_dir = storage / spec.name
    _check_same_spec(exp_dir, spec)
    # A trial's workers may wait for the previous trial's placement group to be removed;
    # Ray's 60 s default is short on a busy machine. Must be set before Ray starts.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    prepared = prepare(base)
    if not prepared["plan"]["has_eval"]:
        raise ConfigError("data.eval_fraction", "a sweep needs held-out pairs (eval_files or eval_fraction > 0)")
    n = concurrency(ray.cluster_resources(), spec.resources)
    total = prepared["plan"]["total_steps"]
    print(f"[simpo-ray] sweep {spec.name}: {spec.num_samples} samples, {n} trial(s) at once "
          f"({spec.resources.num_workers} worker(s) each), {total} steps per trial; folder {exp_dir}", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), datasets=prepared["datasets"],
                             base_plan=prepared["plan"], stats=prepared["stats"],
                             model_path=_model_path(base), train_root=str(exp_dir / "trials")),
        {"cpu": spec.resources.trial_cpus})
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"[simpo-ray] resuming sweep from {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                   resume_errored=spec.failures.on_resume == "resume",
                                   restart_errored=spec.failures.on_resume == "restart")
    else:
        tuner = tune.Tuner(trainable, param_space=to_tune(search_space(spec)),
                           tune_config=_tune_config(spec, n, total, str(exp_dir / "trials")),
                           run_config=tune.RunConfig(
                               name=spec.name, storage_path=str(storage), verbose=1,
                               stop=DivergenceStopper(spec.divergence.alarms),
                               failure_config=tune.FailureConfig(max_failures=spec.failures.max_failures)))
    grid = tuner.fit()
    return report(spec, grid, base, prepared, exp_dir)


def _model_path(cfg: RunConfig) -> str:
    from simpo_ray.models import resolve_model_path

    return resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))


def resumable_asha(trials_dir: str, **kwargs):
    """ASHA whose rung records survive ``Tuner.restore``. Tune saves no scheduler state,
    so after a resume the cuts would only compare trials reporting after it; here every
    trial Tune adds (again) replays its recorded reports (trials/<id>/metrics.jsonl).
    Defined here so importing this module does not import Ray Tune (Tune pickles it
    with cloudpickle, by value)."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            bracket = self._trial_info[trial.trial_id]
            for m in read_reports(Path(trials_dir) / trial.trial_id / "metrics.jsonl"):
                v = m.get(OBJECTIVE)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    bracket.on_result(trial, m.get("step", 0), self._metric_op * v)

    return ResumableASHA(**kwargs)


def _tune_config(spec: SweepSpec, n: int, total_steps: int, trials_dir: str):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    s = spec.scheduler
    scheduler = (resumable_asha(trials_dir, time_attr="step", grace_period=s.grace_period,
                                reduction_factor=s.reduction_factor, max_t=s.max_t or total_steps)
                 if s.type == "asha" else FIFOScheduler())
    if spec.search == "random":
        # Tune ignores max_concurrent_trials for a generator passed in: give it here.
        search = tune.search.BasicVariantGenerator(max_concurrent=n, random_state=spec.seed)
    else:
        try:
            if spec.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch as Search
            else:
                from ray.tune.search.hyperopt import HyperOptSearch as Search
            search = Search(random_state_seed=spec.seed) if spec.search == "hyperopt" else Search(seed=spec.seed)
        except (ImportError, AssertionError) as e:
            raise ConfigError("search", f"{spec.search} is not installed (pip install {spec.search}): {e}") from None
    return tune.TuneConfig(metric=OBJECTIVE, mode="max", scheduler=scheduler, search_alg=search,
                           num_samples=spec.num_samples,
                           max_concurrent_trials=None if spec.search == "random" else n,
                           trial_dirname_creator=trial_dirname)


def _check_same_spec(exp_dir: Path, spec: SweepSpec) -> None:
    """A rerun resumes only the same sweep; a changed file needs a new name."""
    saved = exp_dir / "spec.yaml"
    now = yaml.safe_dump(dataclasses.asdict(spec), sort_keys=True)
    if saved.exists() and saved.read_text() != now:
        raise ConfigError("name", f"{exp_dir} holds a sweep with a different spec ({saved}); "
                                  "rerun it unchanged to resume, or pick a new name")
    exp_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(now)


# ----- the end of a sweep: table, best config, plot -----------------------------------

def trial_rows(results, space_keys: list, total_steps_of, alarms=(COLLAPSE_ALARM,), asha=True) -> list:
    """One row per trial: its config, best held-out accuracy, steps run and why it stopped.

    ``results``: dicts with ``trial_id``, ``config``, ``reports`` (every report, in
    order), ``error`` (str or None), ``checkpoint``, ``done`` (False: the sweep was
    interrupted while it ran); ``total_steps_of(config)`` -> int.
    """
    rows = []
    for r in results:
        reports = r["reports"]
        scored = [m for m in reports if isinstance(m.get(OBJECTIVE), (int, float)) and math.isfinite(m[OBJECTIVE])]
        best = max(scored, key=lambda m: (m[OBJECTIVE], m.get("step", 0)), default=None)
        last = reports[-1] if reports else {}
        steps, total = int(last.get("step", 0)), total_steps_of(r["config"])
        why = divergence(last, alarms)
        if r["error"]:
            reason = "error"
        elif why:
            reason = "diverged"
        elif not reports:
            reason = "no reports"
        elif not r.get("done", True):
            reason = "interrupted"  # Ctrl-C: rerun the same command to resume
        elif steps >= total:
            reason = "completed"
        else:
            reason = "early stopped (asha)" if asha else "stopped"
        row = {"trial_id": r["trial_id"], "stop_reason": reason}
        row.update({k: r["config"].get(k) for k in space_keys})
        row.update({"best_accuracy": best[OBJECTIVE] if best else None,
                    "best_step": best.get("step") if best else None,
                    "final_accuracy": last.get(OBJECTIVE), "steps": steps, "total_steps": total,
                    "final_loss": last.get("loss"), "detail": r["error"] or why or "",
                    "checkpoint": r.get("checkpoint")})
        rows.append(row)
    return rows


def read_reports(path: Path) -> list:
    """A trial's reports in step order; a step reported again after a resume (redone
    from the last checkpoint) keeps its latest line."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            by_step[m.get("step", 0)] = m
    return [by_step[k] for k in sorted(by_step)]


def best_row(rows: list) -> Optional[dict]:
    """Highest held-out accuracy among trials that neither diverged nor errored."""
    good = [r for r in rows if r["stop_reason"] not in ("diverged", "error", "interrupted")
            and r["best_accuracy"] is not None]
    return max(good, key=lambda r: (r["best_accuracy"], r["steps"]), default=None)


def format_table(rows: list) -> str:
    if not rows:
        return "(no trials)"
    cols = [c for c in rows[0] if c not in ("checkpoint", "detail")]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def write_csv(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        w.writeheader()
        w.writerows(rows)


def plot(rows: list, base: RunConfig, path: Path) -> None:
    """Best held-out accuracy against lr, beta and gamma_beta_ratio, one point per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [("optim.lr", "learning rate", True), ("simpo.beta", "beta", False),
                 ("simpo.gamma_beta_ratio", "gamma / beta", False)]
    styles = {"completed": ("o", "tab:green"), "early stopped (asha)": ("v", "tab:orange"),
              "diverged": ("x", "tab:red"), "error": ("x", "black"), "stopped": ("s", "tab:blue"),
              "interrupted": ("s", "tab:gray")}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    best = best_row(rows)
    for ax, (key, label, log) in zip(axes, axes_keys):
        for reason, (marker, color) in styles.items():
            pts = [(_value(r, key, base), r["best_accuracy"]) for r in rows
                   if r["stop_reason"] == reason and r["best_accuracy"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=reason, s=40)
        if best:
            ax.scatter([_value(best, key, base)], [best["best_accuracy"]], marker="*", s=220,
                       facecolors="none", edgecolors="black", label="best")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best held-out pairwise accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _value(row: dict, key: str, base: RunConfig):
    if row.get(key) is not None:
        return row[key]
    if key == "simpo.gamma_beta_ratio" and row.get("simpo.gamma") is not None:
        return row["simpo.gamma"] / (row.get("simpo.beta") or base.simpo.beta)
    section, name = key.split(".")
    return getattr(getattr(base, section), name) if key != "simpo.gamma_beta_ratio" \
        else base.simpo.resolved_gamma_beta_ratio


def report(spec: SweepSpec, grid, base: RunConfig, prepared: dict, exp_dir: Path) -> dict:
    """Table (printed + CSV), best config YAML, plot, summary.json."""
    from simpo_ray.train import make_plan

    base_dict = base.to_dict()
    results = []
    for res in grid:
        trial_id = Path(res.path).name.removeprefix("trial_")
        reports = read_reports(exp_dir / "trials" / trial_id / "metrics.jsonl")
        ckpts = [m["checkpoint"] for m in reports if os.path.isdir(str(m.get("checkpoint")))]
        results.append({"trial_id": trial_id, "config": res.config, "reports": reports,
                        "done": bool((res.metrics or {}).get("done")),
                        "error": f"{type(res.error).__name__}: {res.error}".splitlines()[0] if res.error else None,
                        "checkpoint": ckpts[-1] if ckpts else None})
    results.sort(key=lambda r: r["trial_id"])
    plans = {}

    def total_steps_of(config):
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in plans:
            cfg = trial_config(base_dict, config)
            same = (cfg.train, cfg.data) == (base.train, base.data)
            plans[key] = prepared["plan"]["total_steps"] if same else \
                make_plan(cfg, prepared["stats"], _model_path(cfg), True)["total_steps"]
        return plans[key]

    rows = trial_rows(results, sorted(search_space(spec)), total_steps_of, spec.divergence.alarms,
                      asha=spec.scheduler.type == "asha")
    write_csv(rows, exp_dir / "results.csv")
    notes = "".join(f"\n  {r['trial_id']} {r['stop_reason']}: {r['detail']}" for r in rows if r["detail"])
    print("[simpo-ray] sweep results:\n" + format_table(rows) + notes, flush=True)
    plot(rows, base, exp_dir / "sweep.png")
    best = best_row(rows)
    summary = {"experiment": str(exp_dir), "results_csv": str(exp_dir / "results.csv"),
               "plot": str(exp_dir / "sweep.png"), "trials": len(rows),
               "stop_reasons": {k: sum(r["stop_reason"] == k for r in rows) for k in {r["stop_reason"] for r in rows}},
               "best": best}
    if best:
        cfg = trial_config(base_dict, next(r["config"] for r in results if r["trial_id"] == best["trial_id"]))
        # Export as the base config says, into a run folder of its own.
        cfg.output = RunConfig.from_dict(merged(_raw_base(spec), {"output.name": f"{spec.name}-best"})).output
        header = (f"# Best trial {best['trial_id']} of sweep {spec.name}: held-out pairwise accuracy "
                  f"{best['best_accuracy']:.4f} at step {best['best_step']}.\n"
                  f"# Train it: simpo-ray train {exp_dir / 'best_config.yaml'}\n")
        (exp_dir / "best_config.yaml").write_text(header + cfg.to_yaml())
        summary["best_config"] = str(exp_dir / "best_config.yaml")
        summary["best_checkpoint"] = best["checkpoint"]
        print(f"[simpo-ray] best trial {best['trial_id']}: accuracy {best['best_accuracy']:.4f} "
              f"(step {best['best_step']}); its latest checkpoint {best['checkpoint']}", flush=True)
    print(f"[simpo-ray] table {exp_dir / 'results.csv'}, best config {summary.get('best_config')}, "
          f"plot {exp_dir / 'sweep.png'}", flush=True)
    if summary["stop_reasons"].get("interrupted"):
        print("[simpo-ray] the sweep was interrupted: rerun the same command to resume it", flush=True)
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
