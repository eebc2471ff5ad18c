"""Multi-node on one machine: a head and a worker node started with `ray start` (private
temp dir, free ports), the way cluster/ starts real nodes.

1. Two nodes, one ZeRO-3 worker on each: the 70B recipe in its CPU smoke mode, driven
   by `simpo-ray train --address` joining the cluster.
2. `ray job submit --working-dir . -- simpo-ray train examples/tiny_cpu.yaml ...` to the
   same head: SUCCEEDED, checkpoints in the configured storage URI, and the exported
   model loads.

Only the processes these tests start are stopped (their process group, then anything
left that names the private temp dir); never `ray stop`, which would stop every Ray on
the machine.

Addresses: `ray start --address` (a worker node joining) rewrites 127.0.0.1 to the
machine's interface address, so both nodes use that address, as real nodes do; the
dashboard and job API stay on 127.0.0.1.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Each node: 3 logical CPUs. A training worker takes 1.6 of them, so two never fit on
# one node (placement puts one per node) and 1.4 stay free for Ray Data.
NODE_CPUS = 3
CPUS_PER_WORKER = 1.6
TINY = ["model.name_or_path=tiny", "model.tiny.hidden_size=64", "model.tiny.num_layers=2",
        "model.tiny.num_heads=2", "model.tiny.intermediate_size=128"]
# A GPU recipe's CPU smoke mode: the tiny model and bundled data, same DeepSpeed /
# checkpointing / schedule settings (also in cluster/README.md).
SMOKE = TINY + [
    "model.dtype=float32", "model.attn_implementation=sdpa", "data.train_files=examples/data/preferences.jsonl",
    "data.eval_files=null", "data.eval_fraction=0.1", "data.max_length=512", "data.max_prompt_length=256",
    "train.use_gpu=false", "train.num_workers=2", f"train.cpus_per_worker={CPUS_PER_WORKER}",
    "train.total_batch_size=8", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_every=2",
    "train.checkpoint_every=2", "optim.lr=1e-3",
]


def _env(**extra):
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",  # the CLI sends the cluster's token only with this
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{BIN}:{env.get('PATH', '')}",
    })
    # A local cluster started earlier in this session (init_ray) leaves its address and
    # the loopback switch in the environment; these processes must not inherit them.
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_ports(n):
    """n distinct free TCP ports from the ephemeral range (outside Ray's worker range)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if not 10002 <= port <= 19999:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


class Node:
    """One `ray start --block` process group; stop() ends it and only it."""

    def __init__(self, args, log, temp_dir):
        self.temp_dir = str(temp_dir)
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=_env(), cwd=REPO,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, grace=20):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.proc.pid, *self._leftovers()]:
            try:  # gcs_server and friends may ignore SIGTERM: SIGKILL what is left of ours
                os.killpg(pid, signal.SIGKILL) if pid == self.proc.pid else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)

    def _leftovers(self):
        mine = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if self.temp_dir.encode() in (d / "cmdline").read_bytes():
                        mine.append(int(d.name))
                except OSError:
                    pass
        return [p for p in mine if p != os.getpid()]


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def _wait_for_nodes(dashboard, n, deadline):
    while time.time() < deadline:
        r = _run([str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--format", "json",
                  "--filter", "state=ALIVE"], timeout=60)
        if r.returncode == 0:
            try:
                if len(json.loads(r.stdout)) >= n:
                    return
            except ValueError:
                pass
        time.sleep(2)
    raise TimeoutError(f"{n} Ray nodes not alive in time")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + one worker node on this machine, each with NODE_CPUS logical CPUs."""
    tmp = tmp_path_factory.mktemp("cluster")
    # Ray caps the socket path length: keep the temp dirs short and private. Each node gets
    # its own (as on separate machines): a shared one lets the worker node's runtime-env
    # agent replace the job's unpacked working_dir under the running driver.
    temp_dir = Path(f"/tmp/srt-{os.getpid()}-{random.randrange(10**6)}")
    gcs, dash, client, *p = _free_ports(15)
    lo = random.randrange(20000, 31000, 500)  # worker ports: a private block below the ephemeral range
    from ray._private.services import node_ip_address_from_perspective

    ip = node_ip_address_from_perspective()  # what Ray itself resolves 127.0.0.1 to
    common = [f"--node-ip-address={ip}", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats"]
    head = Node(["--head", f"--port={gcs}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                 f"--dashboard-agent-listen-port={p[0]}", f"--dashboard-agent-grpc-port={p[1]}",
                 f"--runtime-env-agent-port={p[2]}", f"--metrics-export-port={p[3]}",
                 f"--node-manager-port={p[4]}", f"--object-manager-port={p[5]}",
                 f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}", *common],
                tmp / "head.log", temp_dir)
    nodes = [head]
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_for_nodes(dashboard, 1, time.time() + 120)
        nodes.append(Node([f"--address={ip}:{gcs}", f"--dashboard-agent-listen-port={p[6]}",
                           f"--dashboard-agent-grpc-port={p[7]}", f"--runtime-env-agent-port={p[8]}",
                           f"--metrics-export-port={p[9]}", f"--node-manager-port={p[10]}",
                           f"--object-manager-port={p[11]}", f"--min-worker-port={lo + 200}",
                           f"--max-worker-port={lo + 399}", f"--temp-dir={temp_dir}-w", *common],
                          tmp / "worker.log", f"{temp_dir}-w"))
        _wait_for_nodes(dashboard, 2, time.time() + 120)
        yield {"gcs": f"{ip}:{gcs}", "dashboard": dashboard, "tmp": tmp}
    except BaseException:
        for n in nodes:
            print(f"--- {n.log}\n" + Path(n.log).read_text()[-3000:])
        raise
    finally:
        for n in reversed(nodes):
            n.stop()
        for d in (temp_dir, Path(f"{temp_dir}-w")):
            shutil.rmtree(d, ignore_errors=True)


def _train_workers(dashboard):
    r = _run([str(BIN / "ray"), "list", "actors", "--address", dashboard, "--format", "json", "--detail",
              "--filter", "class_name=RayTrainWorker", "--limit", "100"], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout) if r.stdout.lstrip().startswith("[") else []  # else "No resource ..."


def _lines(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_two_nodes_one_zero3_worker_each(cluster):
    root = cluster["tmp"] / "runs"
    before = {a["actor_id"] for a in _train_workers(cluster["dashboard"])}
    r = _run([str(BIN / "simpo-ray"), "train", "examples/llama3-70b-instruct.yaml", *SMOKE,
              f"output.root={root}", "output.name=two-node", "--address", cluster["gcs"]], timeout=420)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    lines = _lines(root / "two-node")
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert all(len(set(m["ranks_micro_batches"])) == 1 for m in lines if "loss" in m)
    workers = [a for a in _train_workers(cluster["dashboard"]) if a["actor_id"] not in before]
    assert len(workers) == 2, workers
    assert len({a["node_id"] for a in workers}) == 2, "both training workers landed on one node"
    assert (root / "two-node" / "model" / "config.json").is_file()


def test_ray_job_submit_tiny_run(cluster):
    root, store = cluster["tmp"] / "job-runs", cluster["tmp"] / "store"
    job_id = f"simpo-test-{os.getpid()}"
    cache = os.environ["SIMPO_RAY_CACHE"]
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "SIMPO_RAY_CACHE": cache}}
    r = _run([str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id,
              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--",
              "simpo-ray", "train", "examples/tiny_cpu.yaml", *TINY, "train.max_steps=2", "train.eval_every=2",
              "train.checkpoint_every=2", f"train.cpus_per_worker={CPUS_PER_WORKER}",
              f"output.root={root}", "output.name=job", f"output.storage=file://{store}"], timeout=180)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    deadline, status = time.time() + 420, None
    while time.time() < deadline:
        s = _run([str(BIN / "ray"), "job", "status", "--address", cluster["dashboard"], job_id], timeout=60)
        out = (s.stdout + s.stderr).lower()  # "Job '<id>' succeeded" / "... failed" / "... stopped"
        status = next((w.upper() for w in ("succeeded", "failed", "stopped") if f"' {w}" in out), None)
        if status:
            break
        time.sleep(3)
    logs = _run([str(BIN / "ray"), "job", "logs", "--address", cluster["dashboard"], job_id], timeout=60).stdout
    if status is None:
        _run([str(BIN / "ray"), "job", "stop", "--address", cluster["dashboard"], job_id], timeout=60)
    assert status == "SUCCEEDED", logs[-5000:]
    assert "[simpo-ray] done" in logs
    assert sorted(p.name for p in (store / "job").glob("checkpoint_0*")) == ["checkpoint_000002"]
    lines = _lines(root / "job")
    assert lines[-1]["step"] == 2 and lines[-1]["checkpoint"].startswith(str(store))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = root / "job" / "model"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model(**ids).logits.shape[-1] == model.config.vocab_size
