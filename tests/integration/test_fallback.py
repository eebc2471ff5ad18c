"""After a fallback past damaged checkpoints, no checkpoint is lost (issue 15, finding 1),
and nothing a training run opens listens beyond loopback (finding 3).

The steps redone after falling back were saved under the damaged folders' names; Ray
Train's registry still listed the damaged entries, and evicting one deleted its path:
the fresh folder of that name. With ``keep_checkpoints=3`` only 1 of 3 was left on disk
two steps after the fallback. Now each fallback starts a new lineage of names
(``checkpoint_000005.1``): the eviction deletes the damaged folders, and every kept
checkpoint is whole and exports.
"""

import threading
import time

import pytest

from tests.integration.conftest import read_metrics, tiny_cfg
from tests.integration.test_security import LOOPBACK, cluster_listeners

pytestmark = pytest.mark.slow

COMMON = {"train.max_steps": 9, "train.checkpoint_every": 1, "output.keep_checkpoints": 3,
          "train.eval_every": 100, "output.export": "false", "output.name": "fallback"}


def test_no_checkpoint_is_lost_after_a_fallback(ray_local, tmp_path, capsys):
    from simpo_ray.checkpoint import verify
    from simpo_ray.cli import main
    from simpo_ray.metrics import read_reports
    from simpo_ray.train import train

    _, first = train(tiny_cfg(tmp_path, **COMMON, **{"train.stop_after": 6}))
    run = tmp_path / "fallback"
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == [f"checkpoint_00000{k}" for k in (4, 5, 6)]
    # the newest truncated, the one before it with one byte flipped (same size)
    shard = sorted((run / "checkpoint_000006" / "deepspeed").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shard = sorted((run / "checkpoint_000005" / "deepspeed").glob("*model_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    seen, done = set(), threading.Event()

    def watch():  # every listening socket of the cluster while the workers train
        while not done.is_set():
            seen.update(cluster_listeners(ray_local))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, second = train(tiny_cfg(tmp_path, **COMMON, **{"train.stop_after": 7}))
    finally:
        done.set()
        watcher.join()
    assert second["final_metrics"]["step"] == 7
    # finding 3: the training workers' process group (torch's TCPStore, gloo) listened
    # on every interface; now nothing of the run listens beyond loopback
    workers = {(ip, port) for ip, port, name in seen if "Train" in name or "ray::" in name}
    assert workers, f"no worker listeners seen: {seen}"
    assert {(ip, port, name) for ip, port, name in seen if ip not in LOOPBACK} == set()
    assert [m["step"] for m in read_metrics(run) if m["attempt"] == 2] == [5, 6, 7]  # fell back to 4

    # keep_checkpoints whole checkpoints on disk, the redone ones under their own names;
    # the damaged ones were the ones evicted
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_000005.1", "checkpoint_000006.1", "checkpoint_000007.1"], kept
    for name in kept:
        assert all(verify(str(run / name), r, 2) is None for r in range(2)), name
    assert main(["export", str(run), "--checkpoint", "checkpoint_000005.1", "--out", str(tmp_path / "e5")]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0  # the newest by name is the last one trained
    assert "exported checkpoint_000007.1 (step 7)" in capsys.readouterr().out

    # metrics.jsonl: the redone steps are marked as a later attempt, and readers take them
    lines = read_metrics(run)
    assert {m["attempt"] for m in lines if m["step"] <= 6} == {1, 2}
    assert [(m["step"], m["attempt"]) for m in read_reports(run / "metrics.jsonl")] == [
        (0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2)]
