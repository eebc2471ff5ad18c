"""Hostile input through the real trainer: `simpo-ray train` (its own process and Ray
cluster) and ``train()`` on the session's Ray. The error arrives before any training
worker starts (no ``workers/`` folder, no metrics line) and nothing hangs. Lenient mode
on the same rows (dropped, counted per reason in the summary and in every metrics line,
training on the rest) is checked on test_reliability's killed-worker run. The corpus is
the one the unit tests use (``tests/unit/test_hostile.py``)."""

import os
import subprocess
import time

import pytest

from simpo_ray.data import DataError
from tests.conftest import REPO
from tests.integration.conftest import BUNDLED, cli_train, tiny_cfg, write_hostile
from tests.unit.test_hostile import EXPECTED
from tests.unit.test_model_folder import _sharded_copy

pytestmark = pytest.mark.slow


@pytest.fixture
def hostile(tmp_path):
    return write_hostile(tmp_path)


def _no_worker_started(run_dir):
    assert not os.path.exists(os.path.join(run_dir, "workers")), "a training worker started"
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


def test_cli_train_stops_on_hostile_rows_before_any_worker(hostile, tmp_path):
    rows, _ = hostile
    args = cli_train(tmp_path, "hostile", f"data.train_files=[{BUNDLED}, {rows}]", "train.max_steps=2")
    start = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    fatal = sum(v for k, v in EXPECTED.items() if k != "identical after truncation")
    assert f"simpo-ray: {fatal} malformed row(s)" in proc.stderr
    assert f"{rows}: row 2: invalid JSON" in proc.stderr and "data.strict=false" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_worker_started(tmp_path / "hostile")
    print(f"stopped after {time.time() - start:.0f} s")


def test_an_unreadable_file_stops_even_a_lenient_run_before_any_worker(ray_local, hostile, tmp_path):
    from simpo_ray.train import train

    _, noise = hostile
    cfg = tiny_cfg(tmp_path, **{"data.train_files": f"[{BUNDLED}, {noise}]", "data.strict": "false",
                                "output.name": "unreadable", "output.export": "false"})
    with pytest.raises(DataError, match=rf"1 file\(s\) cannot be read[^\n]*\n  {noise}: cannot be read"):
        train(cfg)
    _no_worker_started(cfg.output.run_dir)


def test_a_model_folder_with_a_missing_shard_stops_before_any_worker(ray_local, tiny_path, tmp_path):
    from simpo_ray.train import train

    folder, names = _sharded_copy(tiny_path, tmp_path / "model")
    (folder / names[0]).unlink()
    cfg = tiny_cfg(tmp_path, **{"model.name_or_path": str(folder), "output.name": "shard",
                                "output.export": "false"})
    with pytest.raises(FileNotFoundError, match=f"1 of 2 shards missing .first: {names[0]}"):
        train(cfg)
    _no_worker_started(cfg.output.run_dir)
