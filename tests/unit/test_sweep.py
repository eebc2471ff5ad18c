"""Sweep specs, search spaces, concurrency, divergence and the results table: no Ray cluster.

S: the Tune wiring (sweep), SP: the spec (sweep_spec), R: the report (sweep_report), T: tables."""

import glob
import math
import os

import pytest

from simpo_ray import sweep as S
from simpo_ray import sweep_report as R
from simpo_ray import sweep_spec as SP
from simpo_ray import tables as T
from simpo_ray.config import OBJECTIVE, ConfigError, RunConfig

from ..conftest import REPO

SPECS = sorted(glob.glob(os.path.join(REPO, "tune", "*.yaml")))
TINY = os.path.join(REPO, "tune", "tiny_cpu.yaml")


def _spec(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(f"base: {os.path.join(REPO, 'examples', 'tiny_cpu.yaml')}\nreport_every: 2\n"
                 "scheduler: {grace_period: 2}\n" + text)
    return p


@pytest.mark.parametrize("path", SPECS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_sweep_file_validates(path):
    spec = SP.load_spec(path)
    base = SP.base_config(spec)
    r = spec.resources
    assert (base.train.num_workers, base.train.cpus_per_worker, base.train.use_gpu) == \
        (r.num_workers, r.cpus_per_worker, r.use_gpu)
    # every report carries held-out accuracy (Tune checks the metric on each one)
    assert base.train.log_every == base.train.eval_every == spec.report_every
    assert base.train.checkpoint_every % spec.report_every == 0
    assert spec.scheduler.grace_period % spec.report_every == 0
    assert SP.describe(spec)


def test_there_are_a_tiny_and_a_paper_scale_sweep():
    names = {os.path.basename(p) for p in SPECS}
    assert "tiny_cpu.yaml" in names and "llama3_8b_instruct.yaml" in names
    big = SP.load_spec(os.path.join(REPO, "tune", "llama3_8b_instruct.yaml"))
    base = SP.base_config(big)
    assert base.train.use_gpu and base.train.total_batch_size == 128 and "Llama-3" in base.model.name_or_path
    # defaults: the paper's lr range (lr_scale 1), beta 2..10, gamma_beta_ratio 0..1
    space = SP.search_space(big)
    assert space["optim.lr"] == {"loguniform": [3e-7, 1e-6]}
    assert space["simpo.beta"] == {"uniform": [2.0, 10.0]}
    assert space["simpo.gamma_beta_ratio"] == {"uniform": [0.0, 1.0]}


def test_default_space_scaled_and_overridden(tmp_path):
    spec = SP.load_spec(_spec(tmp_path, "lr_scale: 1000\nsearch_space:\n  simpo.beta: 2.5\n"
                                       "  simpo.gamma: {choice: [0.5, 1.0]}\n"
                                       "  optim.warmup_ratio: {grid: [0.0, 0.1]}\n"))
    space = SP.search_space(spec)
    assert space["optim.lr"]["loguniform"] == pytest.approx([3e-4, 1e-3])
    assert "simpo.beta" not in space and SP.base_config(spec).simpo.beta == 2.5  # a plain value is fixed
    assert "simpo.gamma_beta_ratio" not in space  # an absolute margin replaces the ratio
    assert space["simpo.gamma"] == {"choice": [0.5, 1.0]}
    assert space["optim.warmup_ratio"] == {"grid": [0.0, 0.1]}


def test_tune_domains(tmp_path):
    from ray import tune

    spec = SP.load_spec(_spec(tmp_path, "search_space:\n  optim.lr: {loguniform: [1e-5, 1e-3]}\n"
                                       "  simpo.beta: {grid: [2, 4]}\n"))
    d = S.to_tune(SP.search_space(spec))
    assert isinstance(d["optim.lr"], tune.search.sample.Float) and d["optim.lr"].lower == 1e-5
    assert d["simpo.beta"] == {"grid_search": [2, 4]}
    assert isinstance(d["simpo.gamma_beta_ratio"], tune.search.sample.Float)


def test_overrides_reach_the_sweep_or_the_base(tmp_path):
    spec = SP.load_spec(_spec(tmp_path, ""), ["num_samples=3", "scheduler.grace_period=4", "train.max_steps=8",
                                            "search_space.optim.lr={grid: [1.0e-3, 3.0e-3]}"])
    assert spec.num_samples == 3 and spec.scheduler.grace_period == 4
    assert spec.overrides == {"train.max_steps": 8}
    assert SP.base_config(spec).train.max_steps == 8
    assert SP.search_space(spec)["optim.lr"] == {"grid": [1e-3, 3e-3]}


@pytest.mark.parametrize("text, field", [
    ("num_sample: 3\n", "num_sample"),  # typo: did you mean
    ("search_space:\n  optim.lr: {normal: [0, 1]}\n", "search_space.optim.lr"),
    ("search_space:\n  optim.lr: {loguniform: [0, 1e-3]}\n", "search_space.optim.lr.loguniform"),
    ("search_space:\n  train.total_batch_size: {grid: [8, 16]}\n", "search_space.train.total_batch_size"),
    ("search_space:\n  train.num_workers: {grid: [1, 2]}\n", "search_space.train.num_workers"),
    ("search_space:\n  data.max_length: {grid: [256, 512]}\n", "search_space.data.max_length"),
    ("search_space:\n  simpo.loss: {choice: [simpo, dpo]}\n", "search_space.simpo.loss"),
    ("search_space:\n  optim.lrr: {grid: [1e-3]}\n", "optim.lrr"),  # names the training field
    ("search_space:\n  simpo.beta: {uniform: [-1, 2]}\n", "simpo.beta"),  # a bound fails validation
    ("search: optuna\nsearch_space:\n  simpo.beta: {grid: [2, 4]}\n", "search_space"),
    ("search: bayes\n", "search"),
    ("report_every: 3\n", "scheduler.grace_period"),
    ("resources: {num_workers: 0}\n", "resources.num_workers"),
])
def test_bad_specs_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as e:
        SP.load_spec(_spec(tmp_path, text))
    assert e.value.path == field, str(e.value)


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed\n", "is not valid YAML"),
    (None, "sweep file not found"),
    ("num_sample: 3\n", "config field 'num_sample': unknown key; did you mean 'num_samples'?"),
    ("- a list\n", "must hold a mapping at the top level"),
    ("base: broken.yaml\n", "broken.yaml is not valid YAML"),  # the base file, read the same way
])
def test_tune_with_a_bad_sweep_file_exits_2_without_traceback(tmp_path, capsys, text, message):
    from simpo_ray.cli import main

    (tmp_path / "broken.yaml").write_text("train: {num_workers: 1\n")
    bad = tmp_path / "bad.yaml"
    if text is not None:
        bad.write_text(text)
    assert main(["tune", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert err.startswith("simpo-ray: config field "), err


def test_override_values_are_parsed_once(tmp_path):
    with pytest.raises(ConfigError, match="override must look like key.sub=value"):
        SP.load_spec(_spec(tmp_path, ""), ["num_samples"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        SP.load_spec(_spec(tmp_path, ""), ["search_space.optim.lr={grid: [1"])


def test_trial_config_merges_and_keeps_the_total_batch():
    base = SP.base_config(SP.load_spec(TINY)).to_dict()
    cfg = SP.trial_config(base, {"optim.lr": 1e-4, "simpo.gamma": 1.0, "train.micro_batch_size": 2})
    assert cfg.optim.lr == 1e-4 and cfg.simpo.gamma == 1.0 and cfg.simpo.gamma_beta_ratio is None
    assert cfg.train.total_batch_size == 8 and cfg.train.grad_accum_steps == 4  # accumulation adapts
    cfg = SP.trial_config(dict(base, simpo=dict(base["simpo"], gamma=2.0, gamma_beta_ratio=None)),
                         {"simpo.gamma_beta_ratio": 0.3})
    assert cfg.simpo.gamma is None and cfg.simpo.gamma_beta_ratio == 0.3  # never both
    with pytest.raises(ConfigError):
        SP.trial_config(base, {"train.micro_batch_size": 3})  # 8 is not divisible by 3


def test_concurrency_from_resources():
    r = SP.ResourceSpec(num_workers=1, cpus_per_worker=1, trial_cpus=0.1, reserve_cpus=1)
    assert SP.concurrency({"CPU": 4}, r) == 2
    assert SP.concurrency({"CPU": 64}, r) == 57
    assert SP.concurrency({"CPU": 64}, SP.ResourceSpec(max_concurrent=3)) == 3
    gpu = SP.ResourceSpec(num_workers=8, cpus_per_worker=8, use_gpu=True)
    assert SP.concurrency({"CPU": 192, "GPU": 16}, gpu) == 2  # 8 GPUs per trial
    assert SP.concurrency({"CPU": 1000, "GPU": 8}, gpu) == 1
    with pytest.raises(ConfigError, match="one trial needs 2.1 CPUs"):
        SP.concurrency({"CPU": 2}, SP.ResourceSpec(num_workers=2, cpus_per_worker=1))
    with pytest.raises(ConfigError, match="8 GPUs"):
        SP.concurrency({"CPU": 1000, "GPU": 4}, gpu)


def test_divergence_and_the_stopper():
    from ray.tune.stopper import FunctionStopper

    assert R.divergence({"step": 0, OBJECTIVE: 0.5}) is None  # the baseline has no loss
    assert R.divergence({"loss": 0.6, "eval/loss": 0.7, "grad_norm": float("nan")}) is None
    assert R.divergence({"loss": float("nan")}) == "loss is nan"
    assert R.divergence({"loss": 0.6, "eval/loss": float("inf")}) == "eval/loss is inf"
    assert R.divergence({"loss": 0.6, SP.COLLAPSE_ALARM: True}) == SP.COLLAPSE_ALARM
    assert R.divergence({"loss": 0.6, SP.COLLAPSE_ALARM: False}) is None
    stop = S.DivergenceStopper([SP.COLLAPSE_ALARM, "alarm/other"])
    assert FunctionStopper.is_valid_function(stop)  # Tune takes it as a stop function
    assert stop("t", {"loss": float("nan")}) and stop("t", {"alarm/other": 1})
    assert not stop("t", {"loss": 0.5, OBJECTIVE: 0.9})


def _rep(step, acc, loss=0.5, **kw):
    return {"step": step, OBJECTIVE: acc, "loss": loss, **kw}


RESULTS = [
    {"trial_id": "a", "config": {"optim.lr": 1e-3, "simpo.beta": 2.0}, "error": None, "checkpoint": "/c/a",
     "reports": [{"step": 0, OBJECTIVE: 0.5}, _rep(2, 0.7), _rep(4, 0.8)]},
    {"trial_id": "b", "config": {"optim.lr": 1e-5, "simpo.beta": 4.0}, "error": None, "checkpoint": None,
     "reports": [{"step": 0, OBJECTIVE: 0.5}, _rep(2, 0.5)]},
    {"trial_id": "c", "config": {"optim.lr": 1.0, "simpo.beta": 8.0}, "error": None, "checkpoint": None,
     "reports": [_rep(2, 0.95), _rep(4, 0.9, loss=float("nan"))]},
    {"trial_id": "d", "config": {"optim.lr": 3e-3, "simpo.beta": 9.0}, "error": "RuntimeError: boom",
     "checkpoint": None, "reports": [_rep(2, 0.99)]},
    {"trial_id": "e", "config": {"optim.lr": 2e-3, "simpo.beta": 3.0}, "error": None, "checkpoint": None,
     "reports": [_rep(2, 0.6, **{SP.COLLAPSE_ALARM: True})]},
    {"trial_id": "f", "config": {"optim.lr": 2e-4, "simpo.beta": 3.0}, "error": None, "checkpoint": None,
     "reports": [_rep(2, 0.97)], "done": False},
]


def test_table_marks_why_each_trial_stopped_and_best_skips_bad_ones(tmp_path):
    rows = R.trial_rows(RESULTS, ["optim.lr", "simpo.beta"], lambda config: 4)
    assert [r["stop_reason"] for r in rows] == ["completed", "early stopped (asha)", "diverged", "error", "diverged",
                                                "interrupted"]
    a = rows[0]
    assert (a["best_accuracy"], a["best_step"], a["steps"], a["total_steps"]) == (0.8, 4, 4, 4)
    assert rows[2]["detail"] == "loss is nan" and rows[4]["detail"] == SP.COLLAPSE_ALARM
    assert R.best_row(rows)["trial_id"] == "a"  # c, d, f scored higher but diverged / errored / unfinished
    T.write_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("trial_id,stop_reason,optim.lr")
    text = T.format_table(rows)
    assert "early stopped (asha)" in text and len(text.splitlines()) == 2 + len(rows)
    R.plot(rows, RunConfig(), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_deduplicate_steps_redone_after_resume(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "x": 1}\n{"step": 2, "x": 2}\n{"step": 4, "x": 3}\n'
                 '{"step": 4, "x": 4}\n{"step": 6, "x": NaN}\n')
    from simpo_ray.metrics import read_reports

    reps = read_reports(f)
    assert [m["step"] for m in reps] == [0, 2, 4, 6] and reps[2]["x"] == 4 and math.isnan(reps[3]["x"])
    assert read_reports(tmp_path / "missing.jsonl") == []


def test_rerun_with_a_changed_spec_is_refused(tmp_path):
    spec = SP.load_spec(TINY, [f"storage={tmp_path}"])
    S._check_same_spec(tmp_path / "x", spec)
    S._check_same_spec(tmp_path / "x", spec)  # the same sweep: fine (resume)
    with pytest.raises(ConfigError, match="different spec"):
        S._check_same_spec(tmp_path / "x", SP.load_spec(TINY, [f"storage={tmp_path}", "num_samples=2"]))


def test_workers_stopping_on_non_finite_losses_count_as_diverged():
    from ray.train import WorkerGroupError

    msg = "5 consecutive non-finite losses or gradient norms (train.max_bad_steps=5) at step 7"
    why = S.diverged_error(WorkerGroupError("rank 0 failed", {0: FloatingPointError(msg)}))
    assert why == msg
    assert R.divergence({"step": 6, "loss": 0.7, "diverged": why}) == msg
    assert S.diverged_error(WorkerGroupError("rank 0 failed", {0: RuntimeError("OOM")})) is None
    assert S.diverged_error(RuntimeError("worker died")) is None


def test_asha_rungs_are_rebuilt_from_recorded_reports_on_resume(tmp_path):
    import json
    import types

    from ray.tune.schedulers import TrialScheduler

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, OBJECTIVE: acc}) for s, acc in [(0, 0.5), (2, 0.9), (4, 0.95)]))
    asha = S.resumable_asha(str(tmp_path), time_attr="step", grace_period=2, reduction_factor=2, max_t=8)
    asha.set_search_properties(OBJECTIVE, "max")
    a, b = types.SimpleNamespace(trial_id="a"), types.SimpleNamespace(trial_id="b")
    asha.on_trial_add(None, a)  # a finished before the driver died: Tune adds it again
    asha.on_trial_add(None, b)  # b has nothing recorded
    assert asha.on_trial_result(None, b, {"step": 2, OBJECTIVE: 0.6}) == TrialScheduler.STOP  # below a's 0.9
    from ray import cloudpickle  # Tune stores the scheduler in tuner.pkl with it

    fresh = cloudpickle.loads(cloudpickle.dumps(
        S.resumable_asha(str(tmp_path / "none"), time_attr="step", grace_period=2, reduction_factor=2, max_t=8)))
    fresh.set_search_properties(OBJECTIVE, "max")
    fresh.on_trial_add(None, b)
    assert fresh.on_trial_result(None, b, {"step": 2, OBJECTIVE: 0.6}) == TrialScheduler.CONTINUE
