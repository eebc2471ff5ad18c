"""Shared test setup: no network, a private model cache, one Ray instance per session."""

import os
import tempfile

# Before anything imports transformers or starts Ray (workers inherit the env).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SIMPO_RAY_CACHE", tempfile.mkdtemp(prefix="simpo-ray-cache-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster with more logical CPUs than cores (see RUNBOOK:
    Ray Data starves when Train holds every CPU)."""
    import ray

    from simpo_ray.train import init_ray
    from simpo_ray.config import RunConfig

    cfg = RunConfig.from_dict({"ray": {"num_cpus": 4}})
    init_ray(cfg)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_path():
    """The built-in tiny model + tokenizer folder (built locally from a seed)."""
    import dataclasses

    from simpo_ray.config import TinyModelConfig
    from simpo_ray.tiny import materialize

    return materialize(dataclasses.asdict(TinyModelConfig()))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)
