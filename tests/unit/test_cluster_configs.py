"""cluster/: the launcher configs pass Ray's own schema validation (offline), the KubeRay
manifests and the runtime_env are well-formed, agree with each other and with the recipes,
and keep the safety rules of cluster/README.md (no public Ray ports, token auth, secrets
as files)."""

import copy
import glob
import os
import re

import pytest
import yaml

from simpo_ray.config import RunConfig

from ..conftest import REPO

CLUSTER = os.path.join(REPO, "cluster")
LAUNCHERS = sorted(glob.glob(os.path.join(CLUSTER, "*-8xh100.yaml")))
SECRETISH = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)($|_)", re.I)


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_version():
    import ray

    return ray.__version__


def test_there_are_launcher_configs_for_aws_and_gcp():
    assert {os.path.basename(p) for p in LAUNCHERS} == {"aws-8xh100.yaml", "gcp-8xh100.yaml"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    validate_config(prepare_config(copy.deepcopy(config)))
    # and the validation is real: an unknown field is refused
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["bogus_field"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_layout_and_safety(path):
    c = _load(path)
    nodes = c["available_node_types"]
    head, gpu = nodes[c["head_node_type"]], nodes["gpu_worker"]
    types = {n["node_config"].get("InstanceType") or n["node_config"].get("machineType") for n in nodes.values()}
    assert {"p5.48xlarge", "a3-highgpu-8g"} & types, "8 x H100 worker nodes"
    assert "GPU" not in head.get("resources", {}) or head["resources"]["GPU"] == 0
    # the 70B recipe's cluster: 4 GPU nodes
    recipe = RunConfig.from_yaml(os.path.join(REPO, "examples", "llama3-70b-instruct.yaml"))
    assert gpu["min_workers"] == recipe.ray.nodes <= c["max_workers"]
    # same Ray on the nodes as on the client (job submission checks it)
    for image in (c["docker"]["image"], c["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{_ray_version()}-"), image
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard / job API on loopback, reached by SSH tunnel"
    for cmd in (head_start, " ".join(c["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in cmd
    assert any(dst.endswith(".ray/auth_token") for dst in c["file_mounts"]), "Ray token shipped as a file"
    # no security-group / firewall rule opening Ray's ports: the provider's defaults (SSH only)
    text = open(path).read()
    assert "IpPermissions" not in text and "firewall" not in text.lower()


def test_no_credentials_in_any_cluster_file():
    # Hugging Face tokens, AWS access keys, private keys, Ray tokens pasted inline.
    leaked = re.compile(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|"
                        r"RAY_AUTH_TOKEN\s*[:=]\s*\S")
    files = [p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p)]
    assert len(files) >= 6
    for path in files:
        assert not leaked.search(open(path).read()), path


def test_runtime_env_is_valid_and_holds_no_secrets():
    from ray.runtime_env import RuntimeEnv

    env = _load(os.path.join(CLUSTER, "runtime_env.yaml"))
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    pins = {re.split(r"[=<>]", p)[0]: p for p in env["pip"]["packages"]}
    for pkg in ("torch", "deepspeed", "transformers"):
        assert "==" in pins[pkg], f"{pkg} is pinned"
    for k, v in env["env_vars"].items():
        assert isinstance(v, str)
        if SECRETISH.search(k):
            assert k.endswith("_PATH") and v.startswith("/"), f"{k}: secrets travel as files, not values"
    assert env["env_vars"]["HF_HOME"].startswith("/mnt/shared/")


def _containers(pod_spec):
    return pod_spec["spec"]["containers"]


def test_kuberay_raycluster_and_rayjob():
    docs = list(yaml.safe_load_all(open(os.path.join(CLUSTER, "kuberay", "raycluster.yaml"))))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    netpol = next(d for d in docs if d["kind"] == "NetworkPolicy")
    job = _load(os.path.join(CLUSTER, "kuberay", "rayjob.yaml"))
    assert rc["apiVersion"] == job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert rc["spec"]["rayVersion"] == _ray_version()
    head = rc["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the head is never exposed by a LoadBalancer / NodePort"
    assert head["rayStartParams"]["num-gpus"] == "0"
    (workers,) = rc["spec"]["workerGroupSpecs"]
    limits = _containers(workers["template"])[0]["resources"]["limits"]
    recipe = RunConfig.from_yaml(os.path.join(REPO, "examples", "llama3-70b-instruct.yaml"))
    assert int(limits["nvidia.com/gpu"]) == recipe.ray.gpus_per_node
    assert workers["replicas"] == workers["minReplicas"] == recipe.ray.nodes
    assert workers["replicas"] * int(limits["nvidia.com/gpu"]) == recipe.train.num_workers

    # token auth in every pod, the token (and the HF token) as Secret files, never env values
    pods = [head["template"], workers["template"], job["spec"]["submitterPodTemplate"]]
    for pod in pods:
        secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
        assert "ray-auth-token" in secrets
        for c in _containers(pod):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN_PATH"]["value"].startswith("/etc/ray-auth/")
            for name, e in env.items():
                if SECRETISH.search(name):
                    assert name.endswith("_PATH") and "valueFrom" not in e, name
    # the NetworkPolicy covers every pod of the cluster and the submitter
    label = netpol["spec"]["podSelector"]["matchLabels"]
    for pod in pods:
        assert label.items() <= pod["metadata"]["labels"].items()
    assert netpol["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": label}}]}]

    # the RayJob finds this cluster and runs a config that exists and validates
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["simpo-ray", "train"]
    RunConfig.from_yaml(os.path.join(REPO, entry[2]), entry[3:])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    images = {c["image"] for pod in pods for c in _containers(pod)}
    assert len(images) == 1, "one image (cluster/Dockerfile) everywhere"
    dockerfile = open(os.path.join(CLUSTER, "Dockerfile")).read()
    assert f"FROM rayproject/ray:{_ray_version()}-" in dockerfile
