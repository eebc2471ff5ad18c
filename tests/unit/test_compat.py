"""Every private hook in simpo_ray.compat.HOOKS still exists in the installed libraries.

An upgrade that removes or renames one fails here, naming the hook, the file that uses
it and the version it was checked with. Heavy or optional modules (vLLM, the
transformers Trainer) are checked in their source, without importing them."""

import ast
import importlib
import importlib.util
import inspect
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from simpo_ray import compat


def _source_def(package: str, relpath: str, cls: str, method: str) -> ast.FunctionDef:
    """The ``def`` of ``cls.method`` in a file of an installed package, found without
    importing the package (skips when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / relpath).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    return item
    raise AssertionError(f"{package}/{relpath}: no {cls}.{method}")


def _args(fn: ast.FunctionDef) -> set:
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def _build_shm_op():
    mod = importlib.import_module("deepspeed.comm.torch")
    assert "build_shm_op()" in inspect.getsource(mod)  # still what the CPU backend calls
    original = mod.build_shm_op
    try:
        compat.skip_cpu_shm_build()
        assert mod.build_shm_op() is None
    finally:
        mod.build_shm_op = original


def _enable_ray_cluster():
    from ray._private import ray_constants, services

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services)


def _node_ip_address():
    import ray

    assert 'kwargs.pop("_node_ip_address"' in inspect.getsource(ray.init)


def _ray_constant(name: str, value: str):
    def check():
        from ray._private import ray_constants

        assert getattr(ray_constants, name) is not None
        assert f'"{value}"' in inspect.getsource(ray_constants)
    return check


def _train_env(name: str, value: str):
    def check():
        from ray.train.v2._internal import constants

        assert getattr(constants, name) == value
    return check


def _context_logger():
    m = importlib.import_module("ray.train.v2._internal.execution.context")
    assert m.logger.name == m.__file__  # worker.quiet_worker_logs names it so


def _storage_logger():
    m = importlib.import_module("ray.train.v2._internal.execution.storage")
    assert m.logger.name == "ray.train.v2._internal.execution.storage"


def _asha():
    from ray.tune.schedulers import ASHAScheduler

    s = ASHAScheduler(metric="m", mode="max", time_attr="step", max_t=10)
    assert isinstance(s._trial_info, dict) and s._metric_op == 1.0
    assert list(inspect.signature(s._brackets[0].on_result).parameters) == ["trial", "cur_iter", "cur_rew"]


def _dataset_fingerprint():
    import datasets

    fp = datasets.Dataset.from_list([{"a": 1}])._fingerprint
    assert isinstance(fp, str) and fp


def _vllm_reload():
    runner = _source_def("vllm", "v1/worker/gpu_model_runner.py", "GPUModelRunner", "reload_weights")
    assert "weights_path" in _args(runner)
    _source_def("vllm", "v1/worker/gpu_worker.py", "Worker", "reload_weights")  # what collective_rpc calls
    for name in ("collective_rpc", "reset_prefix_cache"):
        _source_def("vllm", "entrypoints/llm.py", "LLM", name)


def _global_node():
    import ray._private.node
    import ray._private.worker

    assert hasattr(ray._private.worker, "_global_node")
    assert "self.all_processes" in inspect.getsource(ray._private.node.Node.__init__)


def _node_ip_from_perspective():
    from ray._private.services import node_ip_address_from_perspective

    assert callable(node_ip_address_from_perspective)


def _autoscaler_util():
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert callable(prepare_config) and callable(validate_config)


def _resolve_execution_options():
    import ray.train

    assert ray.train.DataConfig()._resolve_execution_options("train").preserve_order is False


def _attn_implementation():
    from transformers import PretrainedConfig

    assert hasattr(PretrainedConfig(), "_attn_implementation")


def _clip_grad_norm():
    assert "model" in _args(_source_def("transformers", "trainer.py", "Trainer", "_clip_grad_norm"))


def _torch_backend():
    from ray.train.torch import config

    assert issubclass(config._TorchBackend, __import__("ray.train.backend", fromlist=["Backend"]).Backend)
    params = inspect.signature(config._setup_torch_process_group).parameters
    assert {"backend", "world_rank", "world_size", "init_method", "timeout_s"} <= set(params)
    assert callable(config._set_torch_distributed_env_vars)
    assert "_setup_torch_process_group" in inspect.getsource(config._TorchBackend.on_start)


def _socket_ifname():
    import torch

    import mmap

    with open(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # searched in place, not read in
            assert data.find(b"GLOO_SOCKET_IFNAME") >= 0


CHECKS = {
    "deepspeed.comm.torch.build_shm_op": _build_shm_op,
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER": _enable_ray_cluster,
    "ray.init(_node_ip_address=)": _node_ip_address,
    "RAY_API_SERVER_ADDRESS": _ray_constant("RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE", "RAY_API_SERVER_ADDRESS"),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": _train_env("HEALTH_CHECK_INTERVAL_S_ENV_VAR",
                                                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"),
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": _train_env("WORKER_GROUP_START_TIMEOUT_S_ENV_VAR",
                                                         "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"),
    "ray.train.v2._internal.execution.context": _context_logger,
    "ray.train.v2._internal.execution.storage": _storage_logger,
    "ray.tune.schedulers.ASHAScheduler._trial_info/_metric_op": _asha,
    "ray.train.torch.config._TorchBackend/_setup_torch_process_group/_set_torch_distributed_env_vars":
        _torch_backend,
    "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME": _socket_ifname,
    "datasets.Dataset._fingerprint": _dataset_fingerprint,
    "vllm worker.reload_weights(weights_path=)": _vllm_reload,
    "ray._private.worker._global_node": _global_node,
    "ray._private.services.node_ip_address_from_perspective": _node_ip_from_perspective,
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": _ray_constant("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S",
                                                           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"),
    "ray.autoscaler._private.util.prepare_config/validate_config": _autoscaler_util,
    "ray.train.DataConfig._resolve_execution_options": _resolve_execution_options,
    "transformers.PretrainedConfig._attn_implementation": _attn_implementation,
    "transformers.Trainer._clip_grad_norm": _clip_grad_norm,
}


def test_every_hook_has_a_check():
    assert set(CHECKS) == set(compat.HOOKS)
    assert {h.library for h in compat.HOOKS.values()} <= set(compat.CHECKED_WITH)


@pytest.mark.parametrize("key", list(compat.HOOKS))
def test_hook_is_still_there(key):
    hook = compat.HOOKS[key]
    try:
        installed = version(hook.library)
    except PackageNotFoundError:
        installed = "not installed"
    try:
        CHECKS[key]()
    except (ImportError, AttributeError, AssertionError, OSError) as e:
        pytest.fail(f"private hook {key} (used by {hook.where}) is gone or changed in {hook.library} {installed} "
                    f"(checked with {compat.CHECKED_WITH[hook.library]}): {type(e).__name__}: {e}")
