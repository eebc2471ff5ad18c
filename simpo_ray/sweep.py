"""sweep(spec): Ray Tune over Ray Train. Each trial is a full training run.

The sweep file (``sweep_spec``) names a base training config, a search space and the
resources per trial. The driver prepares the data once (``train.prepare``); every trial
merges its sampled values into the base config and runs ``train.fit`` on the prepared
data (DeepSpeed ZeRO-3 workers, as ``simpo-ray train``), forwarding the workers' reports
to Tune. ASHA stops weak trials on held-out pairwise accuracy (``OBJECTIVE``, the
constant the worker reports under); a stopper ends trials that diverge. The end of the
sweep (table, best config, plot) is ``sweep_report``.

Why a function trainable: Ray Train V2 has no ``Tuner(TorchTrainer)``. The trial holds a
small CPU reservation and runs the fit; the trainer's workers get their own placement
group, which Tune cannot see, so concurrency is computed from the cluster's resources
(``sweep_spec.concurrency``; workers that do not fit wait, then die with
WorkerGroupStartupTimeoutError).

Experiment folder (``storage/name``): Tune's state and trial folders, ``trials/<id>/``
(each trial's Ray Train run with its checkpoints), ``spec.json`` (the spec it was made
with), ``results.csv``, ``best_config.yaml``, ``sweep.png`` and ``summary.json``.
Rerunning the same command after the driver died restores the experiment
(``Tuner.restore``): finished trials are kept, unfinished ones resume from their latest
Train checkpoint, errored ones resume too, restart from scratch or stay errored
(``failures.on_resume``). ASHA's rung records are rebuilt from the trials' recorded
reports. A changed spec is refused (``config.check_rerun``): it needs a new name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

from simpo_ray.config import OBJECTIVE, ConfigError, check_rerun
from simpo_ray.metrics import read_reports
from simpo_ray.sweep_report import divergence, report
from simpo_ray.sweep_spec import SweepSpec, base_config, concurrency, search_space, trial_config


def to_tune(space: dict) -> dict:
    """``sweep_spec.search_space`` as Tune's sampling domains."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {k: make[kind](v) for k, d in space.items() for kind, v in d.items()}


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


def run_trial(config: dict, *, prepared, train_root: str) -> None:
    """One trial (runs in a Tune actor): the sampled config fitted on the sweep's
    prepared data, its reports forwarded to Tune. Its Train run (and run folder) is
    trials/<trial id>, so a restored trial resumes from its latest checkpoint; its
    metrics.jsonl is appended across restarts (Tune's own result.json starts over when
    a trial without a Tune checkpoint is resumed), so the table reads it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from simpo_ray.tracking import RunInfo
    from simpo_ray.train import fit

    cfg = trial_config(prepared.cfg.to_dict(), config)
    trial_id = ray.tune.get_context().get_trial_id()
    try:
        fit(cfg, prepared, callbacks=[TuneReportCallback()], name=trial_id, storage=train_root,
            tracking=RunInfo(trial_id, group=Path(train_root).parent.name, params=config))
    except Exception as e:
        why = diverged_error(e)
        if why is None:
            raise
        # The workers stopped on non-finite losses (train.max_bad_steps): the trial ends
        # as diverged instead of erroring, so Tune does not retry it.
        run_dir = Path(train_root) / trial_id
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


def run_sweep(spec: SweepSpec, address: Optional[str] = None) -> dict:
    """Run (or resume) a sweep; returns the summary (also written to summary.json).
    ``address``: join this Ray cluster (default: the base config's, $RAY_ADDRESS, else local)."""
    import ray
    from ray import tune

    from simpo_ray.train import prepare

    base = base_config(spec)
    base.output.export = False  # trials export nothing: the best config is trained again
    if address:
        base.ray.address = address
    storage = Path(spec.storage or Path(base.output.root) / "sweeps").expanduser().resolve()
    exp_dir = storage / spec.name
    _check_same_spec(exp_dir, spec)
    # A trial's workers may wait for the previous trial's placement group to be removed;
    # Ray's 60 s default is short on a busy machine. Must be set before Ray starts.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    prepared = prepare(base)
    if not prepared.plan.has_eval:
        raise ConfigError("data.eval_fraction", "a sweep needs held-out pairs (eval_files or eval_fraction > 0)")
    n = concurrency(ray.cluster_resources(), spec.resources)
    total = prepared.plan.total_steps
    print(f"[simpo-ray] sweep {spec.name}: {spec.num_samples} samples, {n} trial(s) at once "
          f"({spec.resources.num_workers} worker(s) each), {total} steps per trial; folder {exp_dir}", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, prepared=prepared, train_root=str(exp_dir / "trials")),
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
    return report(spec, tuner.fit(), prepared, exp_dir)


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
    check_rerun(exp_dir / "spec.json", dataclasses.asdict(spec), "a sweep of a different spec")
