"""The three trackers on real parts, no network: a real `mlflow server` on 127.0.0.1 (a
free port, SQLite backend), TensorBoard event files read back with tensorboard's own
reader, and W&B in offline mode read back from its run file. One tiny 2-worker run logs
to all three, stopped after step 2 with a checkpoint (train.stop_after) and rerun to the
end: the resumed run continues the same tracker runs, and every tracker holds exactly
the metrics.jsonl values under the same steps. Secrets in the environment appear in no
file of the run, no tracker param or tag, and no output."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from simpo_ray.metrics import read_reports
from tests.integration.conftest import fit

pytestmark = pytest.mark.slow

SECRET = "mlflow-FAKE-token-0123456789"
KINDS = ("mlflow", "tensorboard", "wandb")
KEYS = ("loss", "rewards/accuracies", "lr", "sys/rss_mb", "eval/rewards/accuracies", "alarm/chosen_logp_collapse")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--default-artifact-root", str(store / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    else:
        proc.kill()
        pytest.fail("mlflow server did not start: " + proc.communicate()[0][-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _wandb_records(path):
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (":W&B", magic,
    version), then LevelDB-log blocks of 32 KiB whose records (crc32, length, type:
    full / first / middle / last) carry protobuf ``Record`` messages."""
    import struct

    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            yield parts + chunk


def _wandb_history(run_dir):
    """step -> logged values, from every offline W&B run file of the run folder, and the run ids."""
    from wandb.proto import wandb_internal_pb2

    out, ids = {}, set()
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        ids.add(f.stem.removeprefix("run-"))
        for raw in _wandb_records(f):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = int(items.get("_step", rec.history.step.num))
                out[step] = items
    return out, ids


def test_mlflow_tensorboard_and_wandb_follow_the_metrics_and_a_resume(ray_local, tmp_path, mlflow_server,
                                                                     monkeypatch, capsys):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    over = {"output.trackers": "[mlflow, tensorboard, wandb]", "output.mlflow.tracking_uri": mlflow_server,
            "output.mlflow.experiment": "trk", "output.wandb.mode": "offline", "output.wandb.project": "p",
            "train.max_steps": 4}
    _, _, first, _ = fit(tmp_path, **over, **{"train.stop_after": 2})
    assert not first["finished"]
    run_dir = tmp_path / "it"
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"mlflow", "tensorboard", "wandb", "logged"}
    _, _, summary, _ = fit(tmp_path, **over)
    again = json.loads((run_dir / "trackers.json").read_text())
    assert summary["finished"] and {k: again[k] for k in KINDS} == {k: ids[k] for k in KINDS}
    size = (run_dir / "metrics.jsonl").stat().st_size  # every line reached every tracker
    assert again["logged"] == {k: size for k in KINDS}
    lines = read_reports(run_dir / "metrics.jsonl")  # every step once, as the tracker should have it
    expect = {k: {m["step"]: float(m[k]) for m in lines if k in m} for k in KEYS}
    assert sorted(expect["loss"]) == [1, 2, 3, 4] and sorted(expect["eval/rewards/accuracies"]) == [0, 2, 4]

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # the resume continued the same run
    run = runs[0]
    assert run.info.run_name == "it" and run.info.status == "FINISHED"
    for k, want in expect.items():
        got = {}
        for m in client.get_metric_history(run.info.run_id, k):
            got[m.step] = m.value
        assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 for s in want), k
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.tiny.hidden_size"] == "64"
    assert run.data.tags["data.fingerprint"] == summary["data"]["fingerprint"] and run.data.tags["loss"] == "simpo"
    assert "README.md" in [a.path for a in client.list_artifacts(run.info.run_id)]

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for k, want in expect.items():
        got = {e.step: e.value for e in acc.Scalars(k)}
        assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-5 for s in want), k

    history, wandb_ids = _wandb_history(run_dir)
    assert wandb_ids == {ids["wandb"]}  # both invocations wrote the same W&B run
    for k, want in expect.items():
        got = {s: h[k] for s, h in history.items() if k in h}
        assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 for s in want), k

    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert all(SECRET not in str(v) for v in {**run.data.params, **run.data.tags}.values())
    for p in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in p.read_bytes(), p


def test_an_unreachable_tracker_stops_before_any_worker_unless_not_required(ray_local, tmp_path, capsys):
    from simpo_ray.config import ConfigError
    from simpo_ray.tracking import RunInfo, open_trackers
    from tests.integration.conftest import tiny_cfg

    dead = {"output.trackers": "[mlflow, tensorboard]", "output.mlflow.tracking_uri": f"http://127.0.0.1:{_free_port()}"}
    with pytest.raises(ConfigError, match="output.trackers.*mlflow cannot be opened"):
        fit(tmp_path, **dead, **{"train.max_steps": 1})
    assert not (tmp_path / "it" / "metrics.jsonl").exists()  # no worker ever reported
    cfg = tiny_cfg(tmp_path, **dead, **{"output.trackers_required": "false"})
    trackers = open_trackers(cfg, tmp_path, RunInfo("it"), {})
    assert [t.name for t in trackers.opened] == ["tensorboard"]  # trains on with the others
    assert "mlflow cannot be opened" in capsys.readouterr().out
    trackers.finish(None, None, True)
