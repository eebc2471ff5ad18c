"""A real Ray Tune sweep over Ray Train on CPU: the tiny sweep in tune/ cut to 3 trials of
6 steps (one ZeRO-3 worker each, 2 at once), run through the command line with its own
private Ray.

The driver is killed mid-sweep (SIGKILL, with its local cluster) once a trial has a
checkpoint; the same command is run again and must resume the experiment, not start
over. The finished sweep is then checked: ASHA stopped trials early, the best config
loads as a training config, the plot is a PNG.
"""

import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest

from simpo_ray.config import OBJECTIVE, RunConfig
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SWEEP = os.path.join(REPO, "tune", "tiny_cpu.yaml")
NAME = "tiny-cpu"


# Three of the tiny sweep's lrs, in the order the trials start (2 at once): a learner;
# an lr that blows up at once (that trial's workers stop on non-finite losses and the table
# marks it diverged); then a run that barely moves, which starts once the diverged one has
# ended, so ASHA meets it at each rung after the learner's result is recorded there.
LRS = [3.0e-3, 1.0e+30, 1.0e-5]
STEPS = 6  # rungs at 2 and 4 (grace period 2, reduction factor 2)


def _cmd(storage):
    return [sys.executable, "-m", "simpo_ray.cli", "tune", SWEEP, f"storage={storage}",
            f"search_space.optim.lr={{grid: {LRS}}}", f"train.max_steps={STEPS}", "train.max_bad_steps=1",
            "train.max_failures=0", "eval.generate_every=0", "output.trackers=[mlflow]"]


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, TUNE_GLOBAL_CHECKPOINT_S="1")  # experiment state every second
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # its own private cluster
        env.pop(key, None)
    return env


def _reports(exp):
    """Trial id -> every report of its Train run, as written (trials/<id>/metrics.jsonl)."""
    out = {}
    for d in sorted(exp.glob("trial_*")):  # Tune's trial folders
        tid = d.name.removeprefix("trial_")
        f = exp / "trials" / tid / "metrics.jsonl"
        lines = f.read_text().splitlines() if f.exists() else []
        out[tid] = [json.loads(x) for x in lines if x.strip()]
    return out


def _kill_tree(proc):
    """SIGKILL the driver and everything it started (its Ray cluster), by pid."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweeps")
    exp = storage / NAME
    with open(storage / "first.log", "w") as log:
        first = subprocess.Popen(_cmd(storage), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 400
            # Interrupt once a trial has checkpointed step 4 of 6: it is mid-run, and its
            # step-2 checkpoint is surely registered. Tune saved its state when it started.
            while not any(m.get("step", 0) >= 4 and m.get("checkpoint")
                          for ms in _reports(exp).values() for m in ms):
                assert first.poll() is None, (storage / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no trial reached step 4"
                time.sleep(0.5)
        finally:
            _kill_tree(first)
    before = _reports(exp)
    second = subprocess.run(_cmd(storage), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {"exp": exp, "before": before, "after": _reports(exp), "rows": rows,
            "summary": json.loads((exp / "summary.json").read_text()), "out": second.stdout}


def test_interrupted_sweep_resumes(sweep):
    before, after, rows = sweep["before"], sweep["after"], sweep["rows"]
    assert "resuming sweep" in sweep["out"]
    assert len(rows) == len(LRS) and set(after) == {r["trial_id"] for r in rows}  # no trial started twice
    assert set(before) <= set(after)  # every trial keeps its id
    resumed = []
    for tid, old in before.items():
        new = after[tid]
        assert new[:len(old)] == old  # what was reported before the kill is kept
        if not old or len(new) == len(old):
            continue  # not started, or finished before the kill
        saved = {m["step"] for m in old if m.get("checkpoint")}
        first = new[len(old)]["step"]
        if saved:
            # Continued right after one of its checkpoints: no step-0 baseline again.
            assert first > 0 and first - 2 in saved, (tid, [m["step"] for m in new])
            resumed.append(tid)
        else:
            assert first == 0  # killed before its first checkpoint: it starts over
        # (a diverged trial's end marker repeats its last report: sweep.run_trial)
        steps = [m["step"] for m in new[len(old):] if "diverged" not in m]
        assert steps == sorted(set(steps))
    assert resumed, {t: [m["step"] for m in ms] for t, ms in after.items()}


def test_asha_stops_trials_early_and_divergence_is_marked(sweep):
    rows = {float(r["optim.lr"]): r for r in sweep["rows"]}
    assert sorted(rows) == sorted(LRS)
    diverged = rows.pop(1e30)
    assert diverged["stop_reason"] == "diverged" and "non-finite" in diverged["detail"]
    reasons = [r["stop_reason"] for r in rows.values()]
    assert set(reasons) <= {"completed", "early stopped (asha)"}, rows
    early = [r for r in rows.values() if r["stop_reason"] == "early stopped (asha)"]
    assert early and all(int(r["steps"]) < int(r["total_steps"]) for r in early), rows
    assert "completed" in reasons
    for r in rows.values():
        assert 0.0 <= float(r["best_accuracy"]) <= 1.0 and r["simpo.beta"] and r["simpo.gamma_beta_ratio"]


def test_best_config_loads_as_training_config(sweep):
    rows, summary = sweep["rows"], sweep["summary"]
    best = summary["best"]
    assert float(best["best_accuracy"]) == max(float(r["best_accuracy"]) for r in rows
                                                if r["stop_reason"] != "diverged")
    cfg = RunConfig.from_yaml(summary["best_config"])
    assert cfg.optim.lr == pytest.approx(float(best["optim.lr"]))
    assert cfg.simpo.beta == pytest.approx(float(best["simpo.beta"]))
    assert cfg.train.total_batch_size == 8 and cfg.train.num_workers == 1
    assert cfg.output.name == f"{NAME}-best" and cfg.output.export
    assert os.path.isdir(summary["best_checkpoint"])
    reports = sweep["after"][best["trial_id"]]
    assert max(m[OBJECTIVE] for m in reports) == pytest.approx(float(best["best_accuracy"]))
    assert best["checkpoint"] == summary["best_checkpoint"]


def test_plot_is_a_png(sweep):
    with open(sweep["exp"] / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_each_trial_is_one_mlflow_run_grouped_under_the_sweep(sweep, monkeypatch):
    """MLflow's default file store beside the trials: one experiment named after the
    sweep, one run per trial (the one resumed after the kill continued its run), with
    the trial's sampled values as params."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only on request
    client = MlflowClient((sweep["exp"] / "trials" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    by_trial = {r.info.run_name: r for r in runs}
    assert len(runs) == len(LRS) and set(by_trial) == set(sweep["after"])
    for tid, run in by_trial.items():
        assert float(run.data.params["search.optim.lr"]) in LRS and run.data.tags["group"] == NAME
        assert json.loads((sweep["exp"] / "trials" / tid / "trackers.json").read_text())["mlflow"] == run.info.run_id
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        reported = [m["step"] for m in sweep["after"][tid] if math.isfinite(m.get("loss", float("nan")))]
        assert sorted(set(steps)) == sorted(set(reported))
