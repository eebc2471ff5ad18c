"""simpo-ray plan: shapes against real (tiny, locally built) models, model states against
DeepSpeed's own estimator, the recipes against the clusters they name, and the CLI."""

import glob
import json
import os

import pytest

from simpo_ray.config import RunConfig
from simpo_ray.planner import (GiB, Cluster, activation_bytes, head_bytes, host_bytes_per_node, model_state_bytes,
                               plan, suggest)
from simpo_ray.shapes import KNOWN_SHAPES, ModelShape, model_shape, shape_from_hf_config

from ..conftest import REPO

RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "examples", "*.yaml")) if "tiny" not in p)


def _hf_models():
    """Small configs of the architectures our recipes use, built locally (no download)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**common, tie_word_embeddings=True),
        "llama-bias": LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        "mistral": MistralConfig(**common),
        "gemma2": Gemma2Config(**common, head_dim=32),
        "qwen2": Qwen2Config(**common),
    }


@pytest.mark.parametrize("name", list(_hf_models()))
def test_shape_counts_match_the_real_model(name):
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    hf = _hf_models()[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf)
    total, largest = model_to_params(model)  # DeepSpeed's own count (shared weights once)
    shape = shape_from_hf_config(model.config, name)
    assert shape.params() == total
    assert shape.largest_module_params() == largest


def test_known_architectures_have_their_published_sizes():
    # Parameter counts of the public checkpoints (their model cards / safetensors index).
    expected = {"meta-llama/meta-llama-3-8b-instruct": 8_030_261_248,
                "meta-llama/meta-llama-3-70b-instruct": 70_553_706_496,
                "mistralai/mistral-7b-v0.1": 7_241_732_096,
                "google/gemma-2-9b-it": 9_241_705_984}
    for name, n in expected.items():
        assert KNOWN_SHAPES[name].params() == n, name


def test_tiny_shape_matches_the_built_tiny_model():
    import dataclasses

    from simpo_ray.config import TinyModelConfig
    from simpo_ray.tiny import build_model

    spec = dataclasses.asdict(TinyModelConfig(hidden_size=96, num_layers=3, num_heads=3, intermediate_size=200))
    cfg = RunConfig.from_dict({"model": {"tiny": spec}})
    assert model_shape(cfg).params() == sum(p.numel() for p in build_model(spec).parameters())


@pytest.mark.parametrize("nodes,gpn", [(1, 8), (4, 8), (2, 4)])
@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_agree_with_deepspeed(nodes, gpn, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = KNOWN_SHAPES["meta-llama/meta-llama-3-70b-instruct"]
    n, largest = shape.params(), shape.largest_module_params()
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        n, largest, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params, zero_init=True)
    ours = model_state_bytes(n, largest, nodes * gpn, 3, "bfloat16", offload_optimizer, offload_params)
    assert sum(ours.values()) == pytest.approx(gpu, abs=4)
    host = host_bytes_per_node(n, largest, Cluster(nodes, gpn), 3, "bfloat16", offload_optimizer, offload_params)
    # DeepSpeed's host figure: the offloaded states when offloading, else zero.Init loading.
    assert (host["offload"] if offload_optimizer else host["load"]) == pytest.approx(cpu, abs=4)


@pytest.mark.parametrize("gpus", [8, 32])
def test_zero2_model_states_agree_with_deepspeed(gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = KNOWN_SHAPES["meta-llama/meta-llama-3-8b-instruct"].params()
    _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
    ours = model_state_bytes(n, 0, gpus, 2, "bfloat16", False, False)
    assert sum(ours.values()) == pytest.approx(gpu, abs=4)


def test_activation_and_head_terms_behave():
    s = KNOWN_SHAPES["meta-llama/meta-llama-3-8b-instruct"]
    full = activation_bytes(s, 2, 2048, "bfloat16", False, "sdpa")
    ckpt = activation_bytes(s, 2, 2048, "bfloat16", True, "sdpa")
    assert ckpt < full / 5
    assert activation_bytes(s, 4, 2048, "bfloat16", False, "sdpa") == pytest.approx(2 * full, rel=1e-9)
    assert activation_bytes(s, 1, 2048, "bfloat16", True, "eager") > activation_bytes(s, 1, 2048, "bfloat16", True,
                                                                                      "sdpa")
    # chunked, bf16: one (chunk, S) fp32 block, fp32 slices of S vocab rows of the weight and
    # its gradient, and an fp32 grad of the scored hidden states; never a whole fp32 lm_head.
    from simpo_ray.logps import VOCAB_SLICE_ELEMENTS

    S, h = VOCAB_SLICE_ELEMENTS // s.hidden_size, s.hidden_size
    chunked = head_bytes(s, 2, 2048, "bfloat16", 1024)
    assert chunked == 1024 * S * 4 + 8 * S * h + 2 * 2 * 2048 * h * 4
    assert chunked < 0.3 * (1024 * s.vocab_size * 4 + 8 * s.vocab_size * h)  # the old whole-head copies
    assert head_bytes(s, 8, 4096, "bfloat16", 1024) - chunked == (2 * 8 * 4096 - 2 * 2 * 2048) * h * 4
    assert head_bytes(s, 2, 2048, "float32", 1024) == 1024 * s.vocab_size * 4 + 4 * s.vocab_size * h
    plain = head_bytes(s, 2, 2048, "bfloat16", 0)
    assert head_bytes(s, 4, 2048, "bfloat16", 0) > 1.9 * plain - 2 * 2048 * s.vocab_size * 4
    # soft-capped logits (Gemma-2) always take the plain path
    g = KNOWN_SHAPES["google/gemma-2-9b-it"]
    assert head_bytes(g, 2, 2048, "bfloat16", 1024) == head_bytes(g, 2, 2048, "bfloat16", 0)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_fits_the_cluster_it_names(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.ray.nodes and cfg.ray.gpus_per_node, "a GPU recipe names its cluster size"
    assert cfg.train.use_gpu and cfg.train.num_workers == cfg.ray.nodes * cfg.ray.gpus_per_node
    p = plan(cfg, Cluster(cfg.ray.nodes, cfg.ray.gpus_per_node))
    assert p.fits, (path, p.gpu_total / GiB)


def test_70b_recipe_on_one_node_gets_a_change_that_fits():
    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "llama3-70b-instruct.yaml"))
    p = plan(cfg, Cluster(nodes=1, gpus_per_node=8))
    assert not p.fits
    overrides, cluster, q = suggest(p)
    assert q.fits and (overrides or cluster.nodes > 1)
    from simpo_ray.planner import _valid

    again = plan(_valid(cfg, overrides, cluster), cluster)
    assert again.fits and again.gpu_total == q.gpu_total


def test_a_model_too_large_for_any_change_says_so():
    huge = ModelShape("huge", 256000, 32768, 131072, 200, 256, 16, 128)
    cfg = RunConfig.from_dict({"model": {"name_or_path": "x/huge"}, "train": {"use_gpu": True, "num_workers": 8,
                                                                             "total_batch_size": 128}})
    assert suggest(plan(cfg, Cluster(1, 8), huge)) is None


def test_cli_plan_70b_fits_on_4x8_h100(capsys):
    from simpo_ray.cli import main

    rc = main(["plan", os.path.join(REPO, "examples", "llama3-70b-instruct.yaml")])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict: FITS" in out and "4 node(s) x 8 GPUs" in out
    assert "70.55 B parameters" in out

    rc = main(["plan", os.path.join(REPO, "examples", "llama3-70b-instruct.yaml"), "--nodes", "1", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and d["fits"] is False and d["gpu_bytes"]["total"] > 80 * GiB


def test_cli_plan_reads_a_local_model_folder(tmp_path, capsys):
    from transformers import MistralConfig

    from simpo_ray.cli import main

    MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8).save_pretrained(tmp_path)
    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "mistral-7b-base.yaml"))
    assert model_shape(RunConfig.from_dict(dict(cfg.to_dict(), model=dict(
        cfg.to_dict()["model"], name_or_path=str(tmp_path))))).params() == 7_241_732_096
    rc = main(["plan", os.path.join(REPO, "examples", "mistral-7b-base.yaml"), f"model.name_or_path={tmp_path}"])
    assert rc == 0 and "7.24 B parameters" in capsys.readouterr().out


def test_cli_plan_unknown_model_is_a_clear_error(capsys):
    from simpo_ray.cli import main

    rc = main(["plan", os.path.join(REPO, "examples", "llama3-8b-instruct.yaml"),
               "model.name_or_path=nobody/no-such-model-xyz"])
    err = capsys.readouterr().err
    assert rc == 2 and "nobody/no-such-model-xyz" in err and "built-in table" in err
