"""A local cluster we start listens on loopback only; secrets in the environment never
reach printed configs, logs, metrics files or model cards."""

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

SECRET = "hf_FAKEsecret0123456789abcdef"


def test_local_ray_listens_on_loopback_only(ray_local):
    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in mine]
    assert listening, "found no Ray listeners to check"
    for c in listening:
        assert c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (c.laddr, psutil.Process(c.pid).name())


def test_secrets_from_the_environment_appear_in_no_output(tmp_path):
    from tests.conftest import REPO

    env = dict(os.environ, HF_TOKEN=SECRET, WANDB_API_KEY=SECRET, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "simpo_ray.cli", "train", os.path.join(REPO, "examples", "tiny_cpu.yaml"),
            f"output.root={tmp_path}", "output.name=sec", "model.tiny.hidden_size=64", "model.tiny.num_layers=2",
            "model.tiny.num_heads=2", "model.tiny.intermediate_size=128", "train.max_steps=2",
            "train.log_every=1", "ray.num_cpus=4"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
