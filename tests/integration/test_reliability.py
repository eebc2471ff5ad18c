"""Faults on CPU with real Ray Train + DeepSpeed ZeRO-3 (2 workers): exact resume,
a killed worker (on lenient hostile data), a damaged checkpoint, poisoned losses and a
streak of them, and a graceful stop."""

import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_MODEL
from tests.integration.conftest import BUNDLED, cli_train, fit, read_metrics, tiny_cfg, train_lines, write_hostile
from tests.unit.test_hostile import EXPECTED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory):
    """6 steps in one go: the reference for exact resume. Packed, with micro-batches cut
    by a token budget (a data-dependent number of pairs per micro-batch and rank): the
    path with the most state to rebuild on resume (the per-epoch step schedule the
    workers count and agree on, on top of data order, RNG, optimizer and scheduler)."""
    from simpo_ray.train import train

    root = tmp_path_factory.mktemp("straight")
    _, summary = train(tiny_cfg(root, **BUDGET, **{"train.max_steps": 6, "output.name": "straight",
                                               "train.checkpoint_every": 3, "output.export": "false"}))
    lines = train_lines(summary["run_dir"])
    assert summary["finished"] and [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    return lines


# Packed rows and token-budget micro-batches (see the straight fixture).
BUDGET = {"data.packing": "true", "data.token_budget": 1100}


def test_stop_and_resume_reproduce_the_uninterrupted_losses(straight, tmp_path):
    from simpo_ray.train import train

    common = {"train.max_steps": 6, "output.name": "resumed", "train.checkpoint_every": 3,
              "output.export": "false", **BUDGET}
    _, s1 = train(tiny_cfg(tmp_path, **common, **{"train.stop_after": 3}))
    assert not s1["finished"] and s1["final_metrics"]["step"] == 3
    stopped = read_metrics(s1["run_dir"])
    _, s2 = train(tiny_cfg(tmp_path, **common))
    assert s2["finished"] and s2["final_metrics"]["step"] == 6
    every = read_metrics(s2["run_dir"])
    assert every[:len(stopped)] == stopped  # the baseline line and steps 1-3, untouched
    assert [m["step"] for m in every] == [0, 1, 2, 3, 4, 5, 6]  # nothing repeated, nothing lost
    resumed = train_lines(s2["run_dir"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    # the data position continued: every step ends at the micro-batch the straight run's did
    assert [m["ranks_micro_batches"] for m in resumed] == [m["ranks_micro_batches"] for m in straight]
    # token budget: the step count the workers counted is met, with the same forwards on
    # both ranks, and the steps really hold different numbers of pairs
    assert all(m["total_steps"] == 6 and len(set(m["ranks_micro_batches"])) == 1 for m in resumed)
    assert len({m["pairs"] for m in straight}) > 1 and straight[0]["data/unused_pairs_per_epoch"] >= 0
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=0, abs_tol=1e-6), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["lr"], b["lr"], rel_tol=1e-12)

    # Damage the newest checkpoint: the next rerun must warn, fall back to step 3 and redo 4-6.
    ckpt6 = Path(s2["run_dir"]) / "checkpoint_000006" / "deepspeed"
    shard = sorted(ckpt6.glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _, s3 = train(tiny_cfg(tmp_path, **common))
    again = train_lines(s3["run_dir"])[6:]
    assert [m["step"] for m in again] == [4, 5, 6]
    for a, b in zip(straight[3:], again):  # same numbers: same data position, RNG, optimizer
        assert math.isclose(a["loss"], b["loss"], rel_tol=0, abs_tol=1e-6)


def test_resume_on_another_number_of_workers_continues_the_same_trajectory(straight, tmp_path):
    """A cluster that shrank or grew between submits: 1 worker for steps 1-2, 2 workers
    for 3-4, 1 worker for 5-6 (each resume converts the ZeRO-3 checkpoint to a universal
    one). A step is the same pairs for any number of workers, so the losses follow the
    uninterrupted 2-worker run (token-budget micro-batches: the hardest position to keep)
    up to float summation order, and every step holds the same number of pairs."""
    from simpo_ray.train import train

    common = {"train.max_steps": 6, "output.name": "regrown", "train.checkpoint_every": 2,
              "output.export": "false", **BUDGET}
    for workers, stop in ((1, 2), (2, 4), (1, 6)):
        _, s = train(tiny_cfg(tmp_path, **common, **{"train.num_workers": workers, "train.stop_after": stop}))
        assert s["final_metrics"]["step"] == stop
    assert s["finished"]
    lines = train_lines(s["run_dir"])
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # nothing repeated, nothing lost
    assert [len(m["ranks_micro_batches"]) for m in lines] == [1, 1, 2, 2, 1, 1]
    # no pair skipped or seen twice: the same pairs per step, so the same sum
    assert [m["pairs"] for m in lines] == [m["pairs"] for m in straight]
    for a, b in zip(straight, lines):
        assert math.isclose(a["loss"], b["loss"], rel_tol=0, abs_tol=1e-4), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["lr"], b["lr"], rel_tol=1e-9)
    assert not list(Path(tempfile.gettempdir()).glob("simpo-universal-*"))  # the converted copies are gone


def test_poisoned_losses_are_skipped_counted_and_a_streak_stops_the_run(tiny_run, tmp_path, monkeypatch):
    """Packed rows (the same pairs per micro-batch as the padded ``tiny_run``). Micro-batches
    3 and 4 of epoch 0 (1-based) are poisoned: dropped on both ranks, counted, replaced by
    the next ones. Micro-batches 15-17 are poisoned in a row: with train.max_bad_steps=3
    the run stops there (after step 6) with a diagnostic."""
    monkeypatch.setenv("SIMPO_RAY_INJECT_NAN", "0:3,0:4,0:15,0:16,0:17")
    with pytest.raises(Exception) as e:
        fit(tmp_path, **{"data.packing": "true", "train.max_steps": 8, "output.name": "nan",
                         "train.max_bad_steps": 3, "train.max_failures": 0, "output.export": "false"})
    assert "3 consecutive non-finite" in str(e.value)
    assert "at step 6, epoch 0, micro-batch 17" in str(e.value)
    lines = train_lines(tmp_path / "nan")
    assert [m["step"] for m in lines[:4]] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert lines[3]["skipped_micro_batches"] == 2
    # the two dropped micro-batches were replaced by the next ones
    assert lines[3]["ranks_micro_batches"] == [4 * 2 + 2] * 2

    # Padding-free packing: same pairs in the same order, so the first step's loss (computed
    # before any update, and before the poisoned micro-batches) equals the padded run's.
    padded, packed = tiny_run[3][1], lines[0]
    assert packed["step"] == padded["step"] == 1
    assert math.isclose(packed["loss"], padded["loss"], rel_tol=1e-5)
    assert math.isclose(packed["rewards/margins"], padded["rewards/margins"], rel_tol=1e-4, abs_tol=1e-5)
    assert packed["data/dropped_total"] == 0


def test_killed_worker_restarts_from_last_checkpoint(ray_local, tmp_path):
    """On lenient data with hostile rows (tests/unit/test_hostile.py): they are dropped,
    counted per reason in the summary and in every metrics line, before and after the
    restart, and training runs on the rest."""
    from simpo_ray.train import train

    rows, _ = write_hostile(tmp_path)
    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 14, "output.name": "kill", "train.checkpoint_every": 2,
                                "output.export": "false", "train.max_failures": 1,
                                "data.train_files": f"[{BUNDLED}, {rows}]", "data.strict": "false"})
    run_dir = Path(cfg.output.run_dir)
    out = {}
    th = threading.Thread(target=lambda: out.update(summary=train(cfg)[1]), daemon=True)
    th.start()
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and killed_after is None:
        time.sleep(0.05)
        steps = [m["step"] for m in train_lines(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 3:
            os.kill(int((run_dir / "workers" / "rank1.pid").read_text()), signal.SIGKILL)
            killed_after = steps[-1]
    assert killed_after is not None, "the run never reached step 3"
    th.join(timeout=300)
    assert out["summary"]["finished"] and out["summary"]["data"]["dropped"] == EXPECTED
    lines = train_lines(run_dir)
    for m in lines:
        assert m["data/dropped_total"] == sum(EXPECTED.values())
        assert all(m[f"data/dropped/{k}"] == v for k, v in EXPECTED.items())
    steps = [m["step"] for m in lines]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    last_ckpt = [m["step"] for m in read_metrics(run_dir)[: restart + 1] if m.get("checkpoint")][-1]
    assert steps[restart] == last_ckpt + 1  # continued right after the last checkpoint
    assert steps[:restart] == list(range(1, steps[restart - 1] + 1))
    assert steps[restart:] == list(range(last_ckpt + 1, 15))  # nothing lost after it


SECRET = "hf_FAKEsecret0123456789abcdef"


def test_sigterm_on_the_driver_checkpoints_and_exits_cleanly(tmp_path):
    """The real command in its own process and Ray cluster. Secrets set in its
    environment (hub token, tracking keys) must appear in none of its outputs, the
    trackers' files included (MLflow's default file store beside the run folder,
    TensorBoard events, a W&B offline run)."""
    from tests.conftest import REPO

    args = cli_train(tmp_path, "term", *SMALL_MODEL, "train.max_steps=60", "train.log_every=1",
                     "train.checkpoint_every=50", "output.trackers=[mlflow, tensorboard, wandb]",
                     "output.wandb.mode=offline")
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", HF_TOKEN=SECRET, WANDB_API_KEY=SECRET,
                                     MLFLOW_TRACKING_TOKEN=SECRET))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if (run_dir / "metrics.jsonl").exists() and len(train_lines(run_dir)) >= 2:
                break
        assert proc.poll() is None, proc.communicate()[0][-3000:]  # it must still be training
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "stopped early" in output
    lines = train_lines(run_dir)
    assert lines[-1]["step"] < 60 and lines[-1].get("checkpoint")
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is False
    assert SECRET not in output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    assert any("mlruns" in p.parts for p in files) and any(p.name.startswith("events.out.tfevents") for p in files)
    assert any(p.suffix == ".wandb" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p

