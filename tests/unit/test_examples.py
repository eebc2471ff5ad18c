"""Every example config loads and validates (smoke modes run in tests/integration)."""

import glob
import os

import pytest

from simpo_ray.config import RunConfig

from ..conftest import REPO

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "**", "*.yaml"), recursive=True))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.relpath(p, REPO))
def test_example_validates(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.train.total_batch_size % (cfg.train.micro_batch_size * cfg.train.num_workers) == 0
