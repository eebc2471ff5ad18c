"""A local cluster we start listens on loopback only. (Secrets never reaching any output
is checked on a real command run in test_reliability's SIGTERM test.)"""

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_local_ray_listens_on_loopback_only(ray_local):
    # The processes of the cluster this session started (gcs, raylet, dashboard, ...)
    # and their children (workers); other tests' clusters are not ours to judge.
    node = ray_local._private.worker._global_node
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    mine = set(roots)
    for pid in roots:
        mine |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in mine]
    assert listening, "found no Ray listeners to check"
    for c in listening:
        assert c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (c.laddr, psutil.Process(c.pid).name())
