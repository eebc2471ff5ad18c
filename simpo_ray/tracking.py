"""Experiment trackers (``output.trackers``: mlflow, tensorboard, wandb), from the driver.

One code path for every run: ``train``, ``sft``, sweep trials, ``iterate`` rounds and
``compare`` methods all train through ``train.fit``, and ``fit`` opens the trackers
before any worker starts (an unreachable one stops the run there, unless
``output.trackers_required: false``), then follows the run's ``metrics.jsonl`` while
the workers train: every line the progress callback appends is logged under the same
keys and step (numbers as they are, booleans such as the alarms as 0/1). So a tracker
holds exactly what ``metrics.jsonl`` holds, whichever command made the run, and the
credentials stay in the driver's environment (``WANDB_API_KEY``,
``MLFLOW_TRACKING_TOKEN``...): nothing of them reaches params, tags, the run folder or the
output.

Per run: the run name is the run's name (a sweep trial's id, ``<name>`` of a round or a
method), the resolved config as params (dotted keys), tags for the data fingerprint,
model, library versions and the git commit of the working folder, plus what the
command adds (``group``: the sweep, ``iterate`` run or ``compare`` folder; the round;
the method). At the end the model card is an artifact (the weights too with
``output.mlflow.log_model``). The tracker run ids are kept in ``trackers.json`` in the
run folder, so a resumed run continues the same tracker runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TRACKERS_FILE = "trackers.json"
# Report keys that are bookkeeping, not metrics.
_NOT_LOGGED = ("step", "time", "attempt")


class TrackerError(Exception):
    """A tracker that cannot be opened (server down, bad URI, no credentials)."""


@dataclass(frozen=True)
class RunInfo:
    """What a command says about a run besides its config."""

    name: str
    group: Optional[str] = None
    params: dict = field(default_factory=dict)   # e.g. a sweep trial's sampled values
    tags: dict = field(default_factory=dict)     # e.g. {"round": 2}, {"method": "dpo"}


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": value}; lists and None as their JSON text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def numeric(m: dict) -> dict:
    """The loggable part of a metrics line: numbers (booleans as 0/1), bookkeeping left out."""
    out = {}
    for k, v in m.items():
        if k in _NOT_LOGGED or isinstance(v, (str, list, dict)) or v is None:
            continue
        if isinstance(v, (bool, int, float)):
            out[k] = float(v)
    return out


def git_commit(folder: str = ".") -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg, stats: dict) -> dict:
    from simpo_ray.export import library_versions

    tags = {"data.fingerprint": stats.get("fingerprint", ""), "model": cfg.model.name_or_path,
            "loss": cfg.simpo.loss, **{f"version.{k}": str(v) for k, v in library_versions().items()}}
    commit = git_commit(os.getcwd())
    if commit:
        tags["git.commit"] = commit
    return tags


# ---------------------------------------------------------------- the three trackers
class MlflowTracker:
    """A run in an MLflow experiment (``output.mlflow``; default a file store ``mlruns/``
    beside the run folder: ``output.root/mlruns``, a sweep's ``trials/mlruns``, a
    compare or iterate folder's ``mlruns``)."""

    name = "mlflow"

    def __init__(self, cfg, run_dir: Path, info: RunInfo, params: dict, tags: dict, resume: Optional[str]):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down fails at once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        m = cfg.output.mlflow
        if m.tracking_uri is None:  # MLflow 3 keeps its file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = m.tracking_uri or (Path(run_dir).parent / "mlruns").resolve().as_uri()
        self.client, self.log_model = MlflowClient(self.uri), m.log_model
        if resume:
            self.run_id = self.client.get_run(resume).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp_id = self._experiment(m.experiment or info.group or "simpo-ray")
        run = self.client.create_run(exp_id, run_name=info.name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _experiment(self, name: str) -> str:
        """The experiment's id, made once. Trials of a sweep start side by side: a file
        store is locked while it looks and creates (it does not refuse a second experiment
        of the same name), a server refuses the second and it is looked up again."""
        import contextlib

        from mlflow.exceptions import MlflowException

        lock = contextlib.nullcontext()
        if self.uri.startswith("file:"):
            import fcntl
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            root = Path(url2pathname(urlparse(self.uri).path))
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / ".simpo-ray-experiments.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with lock:
            found = self.client.get_experiment_by_name(name)
            if found:
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:
                return self.client.get_experiment_by_name(name).experiment_id

    @property
    def id(self) -> str:
        return self.run_id

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def finish(self, card: Optional[str], export_dir: Optional[str], finished: bool) -> None:
        if card:
            self.client.log_artifact(self.run_id, card)
        if self.log_model and export_dir and Path(export_dir).is_dir():
            self.client.log_artifacts(self.run_id, export_dir, "model")
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class TensorboardTracker:
    """Event files (``output.tensorboard.dir``, default ``<run folder>/tensorboard``)."""

    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, info: RunInfo, params: dict, tags: dict, resume: Optional[str]):
        from tensorboardX import SummaryWriter

        base = Path(cfg.output.tensorboard.dir) / info.name if cfg.output.tensorboard.dir else run_dir / "tensorboard"
        self.dir = str(base)
        # One event file per invocation; the default name has only the second and the host,
        # so a quick rerun would overwrite the previous file.
        self.writer = SummaryWriter(logdir=self.dir, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        if not resume:
            table = "\n".join(f"| {k} | {v} |" for k, v in {**tags, **params}.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    @property
    def id(self) -> str:
        return self.dir

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, card: Optional[str], export_dir: Optional[str], finished: bool) -> None:
        if card:
            self.writer.add_text("model_card", Path(card).read_text(), 0)
        self.writer.close()


class WandbTracker:
    """A W&B run (``output.wandb``: project, entity, mode online/offline)."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path, info: RunInfo, params: dict, tags: dict, resume: Optional[str]):
        import wandb

        w = cfg.output.wandb
        run_id = resume or uuid.uuid4().hex[:8]  # W&B's own id shape: 8 of [0-9a-z]
        try:
            self.run = wandb.init(project=w.project or "simpo-ray", entity=w.entity, mode=w.mode, id=run_id,
                                  resume="allow", name=info.name, group=info.group, dir=str(run_dir),
                                  config=params, tags=[f"{k}={v}"[:64] for k, v in tags.items()], reinit="create_new")
        except Exception as e:  # wandb raises its own types (UsageError, CommError...)
            raise TrackerError(f"wandb ({w.mode}): {e}") from e
        self.wandb = wandb

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def finish(self, card: Optional[str], export_dir: Optional[str], finished: bool) -> None:
        if card:
            art = self.wandb.Artifact(f"model-card-{self.run.id}", type="model-card")
            art.add_file(card)
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if finished else 1)


KINDS = {t.name: t for t in (MlflowTracker, TensorboardTracker, WandbTracker)}


# ---------------------------------------------------------------- open, follow, finish
class Trackers:
    """The open trackers of one run; ``follow`` logs metrics.jsonl as it grows. Each
    tracker has its own offset in metrics.jsonl (``trackers.json``'s ``logged``): a tracker
    run that had to be started afresh gets the whole file, one that continues gets only
    what it missed."""

    def __init__(self, run_dir: Path, opened: list, ids: dict, fresh: set):
        self.run_dir, self.opened, self.ids, self.fresh = Path(run_dir), opened, ids, fresh
        self._stop, self._thread, self._offsets = threading.Event(), None, {}

    def _poll(self, path: Path) -> None:
        if not path.is_file():
            return
        with open(path) as f:
            f.seek(min(self._offsets.values()))
            while True:
                start = f.tell()
                line = f.readline()
                if not line.endswith("\n"):  # a line being written: read it next time
                    break
                end = f.tell()
                if line.strip():
                    m = json.loads(line)
                    for t in self.opened:
                        if self._offsets[t.name] <= start:
                            t.log(int(m.get("step", 0)), numeric(m))
                for t in self.opened:
                    self._offsets[t.name] = max(self._offsets[t.name], end)
        if self.ids.get("logged") != self._offsets:  # how far each tracker has it: a rerun catches up
            self.ids["logged"] = dict(self._offsets)
            _write_ids(self.run_dir, self.ids)

    def follow(self, path: Path):
        """Log the lines of ``path`` each tracker does not have yet (those after its offset
        in ``trackers.json``: a run whose process was killed, e.g. a sweep trial Tune
        stopped, catches up when it is opened again; a tracker run started afresh gets them
        all), then what is appended (a thread)."""
        size = path.stat().st_size if path.is_file() else 0
        logged = self.ids.get("logged", {})
        for t in self.opened:
            had = logged if isinstance(logged, int) else logged.get(t.name, size)  # an int: one offset for all
            self._offsets[t.name] = 0 if t.name in self.fresh else min(int(had), size)
        if not self.opened:
            return self

        def loop():
            while not self._stop.wait(0.5):
                self._poll(path)

        self._path, self._thread = path, threading.Thread(target=loop, name="simpo-ray-trackers", daemon=True)
        self._thread.start()
        return self

    def finish(self, card: Optional[str], export_dir: Optional[str], finished: bool) -> None:
        """Log what is left, the card (and weights), close every tracker."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._poll(self._path)
        for t in self.opened:
            try:
                t.finish(card, export_dir, finished)
            except Exception as e:  # the run is done; a tracker failing now must not hide it
                print(f"[simpo-ray] WARNING: {t.name}: could not finish the tracker run: {e}", flush=True)


def open_trackers(cfg, run_dir: Path, info: RunInfo, stats: dict) -> Optional[Trackers]:
    """Open ``output.trackers`` for a run (resuming the ids in ``trackers.json``); None
    when there are none. An unreachable tracker raises ConfigError naming it, or with
    ``output.trackers_required: false`` is left out with a warning."""
    from simpo_ray.config import ConfigError

    if not cfg.output.trackers:
        return None
    record = Path(run_dir) / TRACKERS_FILE
    ids = json.loads(record.read_text()) if record.is_file() else {}
    params = {**flatten(cfg.to_dict()), **{f"search.{k}": v for k, v in flatten(info.params).items()}}
    tags = {**run_tags(cfg, stats), **({"group": info.group} if info.group else {}),
            **{k: str(v) for k, v in info.tags.items()}}
    opened, fresh = [], set()
    for kind in cfg.output.trackers:
        try:
            try:
                opened.append(KINDS[kind](cfg, Path(run_dir), info, params, tags, ids.get(kind)))
            except Exception as e:
                if not ids.get(kind):
                    raise
                # The run cannot be read back (an MLflow file store rewrites a run's meta.yaml
                # in place: a process killed mid-write leaves it empty), or is gone: a new run
                # gets every line of metrics.jsonl, so nothing is lost.
                print(f"[simpo-ray] WARNING: {kind} run {ids[kind]} cannot be continued ({type(e).__name__}: "
                      f"{_first_line(e)}); a new {kind} run gets the whole metrics.jsonl", flush=True)
                opened.append(KINDS[kind](cfg, Path(run_dir), info, params, tags, None))
                fresh.add(kind)
        except Exception as e:
            why = f"{kind} cannot be opened: {type(e).__name__}: {_first_line(e)}"
            if cfg.output.trackers_required:
                raise ConfigError("output.trackers", why + " (output.trackers_required: false trains on without it)")
            print(f"[simpo-ray] WARNING: {why}; training on without it (output.trackers_required: false)", flush=True)
    fresh |= {t.name for t in opened if not ids.get(t.name)}
    ids.update({t.name: t.id for t in opened})
    _write_ids(Path(run_dir), ids)
    print("[simpo-ray] trackers: " + ", ".join(f"{t.name} ({t.id})" for t in opened), flush=True)
    return Trackers(run_dir, opened, ids, fresh)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _write_ids(run_dir: Path, ids: dict) -> None:
    tmp = run_dir / (TRACKERS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=1))
    os.replace(tmp, run_dir / TRACKERS_FILE)


def catch_up(cfg, run_dir, info: RunInfo, finished: bool) -> None:
    """Log what a run's trackers missed (its process was killed after the last poll:
    Tune ends a trial's actor once the trial stops) and close them; called by the
    sweep's end for every trial with a ``trackers.json``. The sweep's results are made by
    then: a tracker that cannot be reached now is a warning, not a failed sweep."""
    from simpo_ray.config import ConfigError

    run_dir = Path(run_dir)
    if not cfg.output.trackers or not (run_dir / TRACKERS_FILE).is_file():
        return
    try:
        trackers = open_trackers(cfg, run_dir, info, {})
    except ConfigError as e:
        print(f"[simpo-ray] WARNING: {run_dir.name}: its tracker runs miss their last lines: {e}", flush=True)
        return
    if trackers:
        trackers.follow(run_dir / "metrics.jsonl")
        trackers.finish(None, None, finished)
