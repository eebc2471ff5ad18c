"""A SIGKILLed driver leaves no process of its private Ray cluster behind
(``simpo_ray.reaper``). No training: a driver that starts its cluster the way every
command does (``train.init_ray``), runs tasks so workers exist, and is killed."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

DRIVER = """
import time
import ray
from simpo_ray.config import RunConfig
from simpo_ray.train import init_ray

init_ray(RunConfig.from_dict({"ray": {"num_cpus": 2}}))

@ray.remote
def one():
    return 1

assert sum(ray.get([one.remote() for _ in range(4)])) == 4
print("READY", flush=True)
time.sleep(600)
"""


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkilled_driver_leaves_no_cluster_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = REPO
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    tree = []
    try:
        out = []
        for line in driver.stdout:
            out.append(line)
            if line.startswith("READY"):
                break
        assert out and out[-1].startswith("READY"), "".join(out)[-3000:]
        tree = psutil.Process(driver.pid).children(recursive=True)
        watchers = [p for p in tree if "simpo_ray.reaper" in " ".join(p.cmdline())]
        cluster = [p for p in tree if p not in watchers]
        assert len(watchers) == 1 and any("raylet" in " ".join(p.cmdline()) for p in cluster)
        assert any("agent" in " ".join(p.cmdline()) for p in cluster)  # the ones that used to stay
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.time() + 40
        while time.time() < deadline and any(map(_running, cluster + watchers)):
            time.sleep(0.5)
        left = [" ".join(p.cmdline())[:120] for p in cluster if _running(p)]
        assert not left, left
        assert not _running(watchers[0])  # the watcher ends too
    finally:  # a failed check leaves nothing running either
        driver.kill()
        for p in tree:
            if _running(p):
                p.kill()
