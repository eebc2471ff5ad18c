"""Trackers without Ray: the config section, what a metrics line becomes, and the follower
on a real TensorBoard writer and a real MLflow file store: lines appended to
metrics.jsonl (a half-written one included) reach the tracker once, with their step; a
second open of the same run folder continues the same tracker runs."""

import json

import pytest

from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.tracking import RunInfo, flatten, numeric, open_trackers


def test_the_output_section_checks_trackers():
    cfg = RunConfig.from_dict({"output": {"trackers": ["mlflow", "wandb"], "wandb": {"mode": "offline"}}})
    assert cfg.output.trackers == ["mlflow", "wandb"] and cfg.output.trackers_required
    for bad, field in (({"trackers": ["mlfow"]}, "output.trackers[0]"), ({"trackers": ["mlflow", "mlflow"]},
                       "output.trackers"), ({"wandb": {"mode": "cloud"}}, "output.wandb.mode"),
                       ({"mlflow": {"tracking_uri": "https://u:pw@host:5000"}}, "output.mlflow.tracking_uri")):
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            RunConfig.from_dict({"output": bad})


def test_flatten_and_numeric():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null",
                                                                           "e": "{}"}
    line = {"step": 3, "time": 1.0, "attempt": 1, "loss": 0.5, "alarm/x": True, "alarm/y": False,
            "checkpoint": "/p", "ranks_micro_batches": [2, 2], "eval/acc": 1, "none": None}
    assert numeric(line) == {"loss": 0.5, "alarm/x": 1.0, "alarm/y": 0.0, "eval/acc": 1.0}


def _lines(path, *lines, partial=""):
    with open(path, "a") as f:
        f.write("".join(json.dumps(m) + "\n" for m in lines) + partial)


def test_follower_logs_each_line_once_and_a_reopen_continues_the_runs(tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    cfg = RunConfig.from_dict({"output": {"root": str(tmp_path / "runs"), "name": "r",
                                          "trackers": ["mlflow", "tensorboard"]}})
    _lines(metrics, {"step": 0, "eval/acc": 0.5})  # from before the trackers: a new tracker run gets it too
    t = open_trackers(cfg, run_dir, RunInfo("r", group="g", params={"optim.lr": 0.1}, tags={"round": 1}),
                      {"fingerprint": "fp"})
    ids = json.loads((run_dir / "trackers.json").read_text())
    t.follow(metrics)
    _lines(metrics, {"step": 1, "loss": 2.0, "alarm/a": False}, partial='{"step": 2, "lo')
    t._poll(metrics)
    with open(metrics, "a") as f:  # the rest of the half-written line, then one without metrics
        f.write('ss": 1.5}\n' + json.dumps({"step": 5}) + "\n")
    t.finish(None, None, finished=False)
    again = open_trackers(cfg, run_dir, RunInfo("r", group="g"), {"fingerprint": "fp"})
    now = json.loads((run_dir / "trackers.json").read_text())
    assert {k: now[k] for k in ("mlflow", "tensorboard")} == {k: ids[k] for k in ("mlflow", "tensorboard")}
    size = metrics.stat().st_size  # the first session logged up to the end, for each tracker
    assert now["logged"] == {"mlflow": size, "tensorboard": size}
    again.follow(metrics)
    _lines(metrics, {"step": 3, "loss": 1.0})
    again.finish(None, None, finished=True)

    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 2.0), (2, 1.5), (3, 1.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "alarm/a")] == [0.0]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/acc")] == [(0, 0.5)]
    assert run.data.params["search.optim.lr"] == "0.1" and run.data.params["output.name"] == "r"
    assert run.data.tags["group"] == "g" and run.data.tags["round"] == "1" and run.data.tags["data.fingerprint"] == "fp"
    assert client.get_experiment(run.info.experiment_id).name == "g"
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.5), (3, 1.0)]


def test_trials_opening_side_by_side_share_one_experiment(tmp_path):
    """Sweep trials start at once: a file store must still get one experiment per sweep."""
    import threading

    from mlflow import MlflowClient

    from simpo_ray.tracking import MlflowTracker

    cfg = RunConfig.from_dict({"output": {"root": str(tmp_path), "name": "t", "trackers": ["mlflow"]}})
    made, start = [], threading.Barrier(8)

    def trial(i):
        start.wait()
        made.append(MlflowTracker(cfg, tmp_path / "trials" / f"t{i}", RunInfo(f"t{i}", group="sweep"), {}, {}, None))

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = MlflowClient((tmp_path / "trials" / "mlruns").as_uri())
    named = [e for e in client.search_experiments() if e.name == "sweep"]
    assert len(made) == 8 and len(named) == 1
    assert len(client.search_runs([named[0].experiment_id])) == 8


def test_a_killed_follower_is_caught_up_from_the_recorded_offset(tmp_path):
    """A sweep trial's actor ended by Tune after its last poll: the sweep's end logs what
    the tracker missed, from trackers.json's offset, and closes the run."""
    from mlflow import MlflowClient

    from simpo_ray.tracking import catch_up

    run_dir = tmp_path / "trials" / "t1"
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    cfg = RunConfig.from_dict({"output": {"root": str(tmp_path), "name": "t1", "trackers": ["mlflow"]}})
    t = open_trackers(cfg, run_dir, RunInfo("t1", group="sw"), {})
    t.follow(metrics)
    _lines(metrics, {"step": 1, "loss": 3.0})
    t._poll(metrics)
    _lines(metrics, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0})
    t._stop.set()  # the process dies: no drain, no finish
    t._thread.join()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    catch_up(cfg, run_dir, RunInfo("t1", group="sw"), finished=True)
    client = MlflowClient((tmp_path / "trials" / "mlruns").as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_tracker_run_that_cannot_be_read_back_is_replaced_with_every_line(tmp_path, capsys):
    """An MLflow file store rewrites a run's meta.yaml in place: a sweep killed mid-write
    left it empty (CI, the interrupted sweep). The reopen warns, a new MLflow run gets the
    whole metrics.jsonl, TensorBoard continues where it was."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    cfg = RunConfig.from_dict({"output": {"root": str(tmp_path / "runs"), "name": "r",
                                          "trackers": ["mlflow", "tensorboard"]}})
    t = open_trackers(cfg, run_dir, RunInfo("r"), {}).follow(metrics)
    _lines(metrics, {"step": 1, "loss": 2.0})
    t.finish(None, None, finished=False)
    old = json.loads((run_dir / "trackers.json").read_text())
    store = tmp_path / "runs" / "mlruns"
    (next(store.glob(f"*/{old['mlflow']}")) / "meta.yaml").write_text("")
    again = open_trackers(cfg, run_dir, RunInfo("r"), {}).follow(metrics)
    assert f"mlflow run {old['mlflow']} cannot be continued" in capsys.readouterr().out
    _lines(metrics, {"step": 2, "loss": 1.0})
    again.finish(None, None, finished=True)
    now = json.loads((run_dir / "trackers.json").read_text())
    assert now["mlflow"] != old["mlflow"] and now["tensorboard"] == old["tensorboard"]
    client = MlflowClient(store.as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(now["mlflow"], "loss")] == [(1, 2.0), (2, 1.0)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.0)]  # each line once
