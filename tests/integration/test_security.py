"""A local cluster we start listens on loopback only. (Secrets never reaching any output
is checked on a real command run in test_reliability's SIGTERM test.)"""

import os

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_local_ray_listens_on_loopback_only(ray_local):
    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in mine]
    assert listening, "found no Ray listeners to check"
    for c in listening:
        assert c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (c.laddr, psutil.Process(c.pid).name())
