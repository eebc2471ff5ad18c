"""Helpers the integration tests share: the tiny training config, one fit and its
metrics lines, the tiny command line, loading a benchmark script, the hostile-rows
files, and the one padded 2-worker run that several modules check or compare with.

``ray_local`` and ``tiny_path`` live in ``tests/conftest.py`` (the unit tests use them too).
"""

import importlib.util
import json
import os
import sys

import pytest

from tests.conftest import REPO, SMALL_MODEL

TINY_CPU = os.path.join(REPO, "examples", "tiny_cpu.yaml")
BUNDLED = os.path.join(REPO, "examples", "data", "preferences.jsonl")
# examples/tiny_cpu.yaml on the smallest model, a report every step, held-out accuracy and
# a checkpoint every 2; no generation probes (tests/integration/test_probes.py runs them).
TINY = [*SMALL_MODEL, "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "eval.generate_every=0"]


def tiny_cfg(root, **over):
    """examples/tiny_cpu.yaml with ``TINY``, run ``root/it`` unless ``output.name`` is given;
    ``over``: dotted keys -> values (strings as on the command line)."""
    from simpo_ray.config import RunConfig

    overrides = [f"output.root={root}", "output.name=it", *TINY, *(f"{k}={v}" for k, v in over.items())]
    return RunConfig.from_yaml(TINY_CPU, overrides)


def read_metrics(run_dir):
    """Every line of ``run_dir/metrics.jsonl`` (the step-0 baseline included)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_lines(run_dir):
    """The metrics lines of training steps (those with a loss)."""
    return [m for m in read_metrics(run_dir) if "loss" in m]


def fit(root, **over):
    """``simpo_ray.train.train`` on ``tiny_cfg(root, **over)`` on the session's Ray:
    -> (cfg, result, summary, every metrics line)."""
    from simpo_ray.train import train

    cfg = tiny_cfg(root, **over)
    result, summary = train(cfg)
    return cfg, result, summary, read_metrics(summary["run_dir"])


def cli_train(root, name, *overrides):
    """``simpo-ray train examples/tiny_cpu.yaml`` in its own process and its own local Ray."""
    return [sys.executable, "-m", "simpo_ray.cli", "train", TINY_CPU, f"output.root={root}",
            f"output.name={name}", "output.export=false", "ray.num_cpus=4", "eval.generate_every=0", *overrides]


def load_script(relpath, name):
    """A script of the repository (e.g. benchmarks/diagnostic.py) as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_hostile(folder):
    """The unit tests' hostile corpus (tests/unit/test_hostile.py) as ``rows.jsonl``, and
    ``noise.parquet``, a file no reader can parse. -> (rows, noise) paths."""
    from tests.unit.test_hostile import ROWS

    rows = folder / "rows.jsonl"
    rows.write_bytes(b"".join(line for line, _ in ROWS))
    noise = folder / "noise.parquet"
    noise.write_bytes(bytes(range(256)) * 8)
    return rows, noise


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """4 padded steps of ZeRO-3 on 2 workers, exported: test_train checks the run and its
    export; test_reliability's packed run compares its first step (before any update) with it.
    -> (cfg, result, summary, every metrics line)."""
    return fit(tmp_path_factory.mktemp("runs"), **{"train.max_steps": 4})
