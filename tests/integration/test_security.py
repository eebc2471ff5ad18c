"""A local cluster we start listens on loopback only. (Secrets never reaching any output
is checked on a real command run in test_reliability's SIGTERM test.)"""

import psutil
import pytest

pytestmark = pytest.mark.slow


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def cluster_listeners(ray) -> list:
    """(address, port, process name) of every listening TCP socket of the cluster this
    session started (gcs, raylet, dashboard, ...) and their children (workers, the
    training workers' process group); other tests' clusters are not ours to judge."""
    node = ray._private.worker._global_node
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    mine = set(roots)
    for pid in roots:
        mine |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in mine:
            try:
                out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
            except psutil.NoSuchProcess:
                pass
    return out


def test_local_ray_listens_on_loopback_only(ray_local):
    listening = cluster_listeners(ray_local)
    assert listening, "found no Ray listeners to check"
    for ip, port, name in listening:
        assert ip in LOOPBACK, (ip, port, name)
