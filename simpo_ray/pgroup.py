"""The training workers' process group, on loopback for a private cluster.

Ray Train's torch backend lets rank 0 start torch's TCPStore (the process group's
rendezvous), which listens on every interface (``*:PORT``), and gloo picks the
interface of the machine's hostname. On a private cluster (every node at 127.0.0.1,
``on_loopback``) nothing needs to reach the workers from outside, so ``torch_config``
gives a backend whose start differs in two things: rank 0 first opens the store itself
on a socket bound to 127.0.0.1 (torch's rendezvous then reuses it: the store is
multi-tenant per port), and gloo / NCCL are told to use the loopback interface. The
rest is Ray's own setup (``_setup_torch_process_group`` per rank). On a cluster with
nodes elsewhere Ray's backend runs unchanged.
"""

from __future__ import annotations

import os

# Imported by train.fit only (Ray Train is loaded there anyway).
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

LOOPBACK = "127.0.0.1"
_STORE = []  # rank 0's store server: alive as long as the worker process


def open_loopback_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = TCPStore(LOOPBACK, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                     multi_tenant=True, master_listen_fd=sock.fileno())
    _STORE[:] = [store, sock]
    return port


def _loopback_env(port: int) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      NCCL_SOCKET_IFNAME="lo")


class LoopbackBackend(_TorchBackend):
    """Ray's torch backend, started with the store and the transports on loopback."""

    def on_start(self, worker_group, backend_config):
        import ray

        world = len(worker_group)
        port = worker_group.execute_single(0, open_loopback_store, world_size=world,
                                           timeout_s=backend_config.timeout_s)
        worker_group.execute(_loopback_env, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, WORLD_SIZE, ...
        ray.get([worker_group.execute_single_async(
            i, _setup_torch_process_group, backend=backend_config.backend, world_rank=i, world_size=world,
            init_method="env://", timeout_s=backend_config.timeout_s) for i in range(world)])


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return LoopbackBackend


def on_loopback() -> bool:
    """Every node of the connected cluster is at 127.0.0.1 (the private cluster
    ``train.init_ray`` starts, or a ``ray start`` on loopback)."""
    import ray

    return all(n["NodeManagerAddress"] == LOOPBACK for n in ray.nodes() if n.get("Alive"))


def torch_config(backend: str, loopback: bool):
    """The ``TorchConfig`` of a run: on loopback for a private cluster, Ray's own otherwise."""
    return (LoopbackTorchConfig if loopback else TorchConfig)(backend=backend)
