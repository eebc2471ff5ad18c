"""End to end on CPU: real Ray (local), real Ray Data, real DeepSpeed ZeRO-3 with 2 workers.

One run of 4 steps, then the same command again with max_steps=6 resumes it; the
exported folder is compared with DeepSpeed's own offline consolidation of the last
checkpoint and used to generate.
"""

import json
import math
import os

import pytest
import torch

from simpo_ray.config import RunConfig
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _cfg(root, **over):
    overrides = [f"output.root={root}", "output.name=it", "model.tiny.hidden_size=64",
                 "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.intermediate_size=128",
                 "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"), overrides)


def _lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    from simpo_ray.train import train

    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root, **{"train.max_steps": 4})
    result, summary = train(cfg)
    return cfg, result, summary


def test_two_worker_zero3_run(first_run):
    cfg, result, summary = first_run
    baseline, *lines = _lines(summary["run_dir"])
    assert baseline["step"] == 0 and "loss" not in baseline  # held-out accuracy before training
    assert 0.0 <= baseline["eval/rewards/accuracies"] <= 1.0
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert math.isfinite(m["loss"]) and m["loss"] > 0
        # both ZeRO-3 ranks ran exactly the same micro-batches (else collectives hang)
        assert len(m["ranks_micro_batches"]) == 2 and len(set(m["ranks_micro_batches"])) == 1
        assert m["gamma"] == pytest.approx(cfg.simpo.beta * cfg.simpo.gamma_beta_ratio)
    assert "eval/rewards/accuracies" in lines[1] and "eval/rewards/accuracies" not in lines[0]
    assert lines[-1]["ranks_micro_batches"] == [4 * cfg.train.grad_accum_steps] * 2
    assert os.path.isdir(os.path.join(summary["run_dir"], "checkpoint_000004", "deepspeed"))
    assert result.metrics["step"] == 4


def test_export_matches_checkpoint_and_generates(first_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, summary = first_run
    export = summary["export_dir"]
    exported = load_file(os.path.join(export, "model.safetensors"))
    ckpt = get_fp32_state_dict_from_zero_checkpoint(
        os.path.join(summary["run_dir"], "checkpoint_000004"), tag="deepspeed")
    # DeepSpeed wraps PolicyLogps, whose .lm is the Hugging Face model
    ckpt = {k.removeprefix("lm."): v for k, v in ckpt.items()}
    assert set(exported) == set(ckpt)
    for k in ckpt:
        assert torch.equal(exported[k], ckpt[k]), k
    card = open(os.path.join(export, "README.md")).read()
    assert summary["data"]["fingerprint"] in card and "gamma_beta_ratio" in card

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_rerun_resumes_from_latest_checkpoint(first_run):
    from simpo_ray.train import train

    cfg, _, summary = first_run
    before = _lines(summary["run_dir"])
    cfg2 = _cfg(cfg.output.root, **{"train.max_steps": 6})
    _, summary2 = train(cfg2)
    lines = _lines(summary2["run_dir"])
    assert lines[:5] == before  # the baseline line and steps 1-4, untouched
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4, 5, 6]  # nothing repeated, nothing lost
    accum = cfg.train.grad_accum_steps
    assert lines[5]["ranks_micro_batches"] == [5 * accum] * 2  # data position continued
    assert summary2["final_metrics"]["step"] == 6


def test_strict_data_errors_stop_before_training(ray_local, tmp_path):
    from simpo_ray.data import DataError
    from simpo_ray.train import train

    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    bad.write_text("\n".join([good, '{"prompt": "p", "chosen": "x", "rejected": "x"}', good, "{oops"]) + "\n")
    cfg = _cfg(tmp_path, **{"data.train_files": str(bad), "output.name": "bad"})
    with pytest.raises(DataError) as e:
        train(cfg)
    msg = str(e.value)
    assert f"{bad}: row 2: chosen == rejected" in msg and f"{bad}: row 4: invalid JSON" in msg
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")


def test_dpo_precomputes_reference_logps_and_starts_at_zero_margin(ray_local, tmp_path):
    """DPO on the same machinery: the reference pass adds columns once; at step 0 the
    policy equals the reference, so the held-out reward margin is zero."""
    from simpo_ray.train import train

    cfg = _cfg(tmp_path, **{"simpo.loss": "dpo", "simpo.beta": 0.1, "train.max_steps": 2,
                            "output.name": "dpo", "output.export": "false"})
    _, summary = train(cfg)
    baseline, *lines = _lines(summary["run_dir"])
    assert abs(baseline["eval/rewards/margins"]) < 1e-5
    assert abs(lines[0]["rewards/margins"]) < 1e-5  # step 1's forward ran before any update
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert "logps/accuracies" in lines[0] and "alarm/chosen_logp_drop" in lines[0]


def test_sft_stage_runs_on_the_same_machinery(ray_local, tmp_path):
    """`simpo-ray sft`: chosen responses only, completion-only NLL, exported like SimPO."""
    from simpo_ray.train import train

    cfg = _cfg(tmp_path, **{"simpo.loss": "sft", "train.max_steps": 3, "output.name": "sft",
                            "optim.lr": 1e-2})
    _, summary = train(cfg)
    baseline, *lines = _lines(summary["run_dir"])
    assert "eval/loss" in baseline and "rewards/accuracies" not in lines[0]
    assert lines[-1]["loss"] < baseline["eval/loss"]  # the NLL of chosen responses went down
    assert os.path.isfile(os.path.join(summary["export_dir"], "model.safetensors"))


def test_packed_batches_give_the_padded_loss(first_run, tmp_path):
    """Padding-free packing: same pairs in the same order, so the first step's loss (computed
    before any update) equals the padded run's."""
    from simpo_ray.train import train

    _, _, summary = first_run
    padded = _lines(summary["run_dir"])[1]
    _, s = train(_cfg(tmp_path, **{"data.packing": "true", "train.max_steps": 1, "output.name": "packed",
                                   "output.export": "false"}))
    packed = _lines(s["run_dir"])[1]
    assert packed["step"] == padded["step"] == 1
    assert math.isclose(packed["loss"], padded["loss"], rel_tol=1e-5)
    assert math.isclose(packed["rewards/margins"], padded["rewards/margins"], rel_tol=1e-4, abs_tol=1e-5)
    assert packed["data/dropped_total"] == 0
