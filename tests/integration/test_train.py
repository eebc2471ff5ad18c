"""End to end on CPU: real Ray (local), real Ray Data, real DeepSpeed ZeRO-3 with 2 workers.

One run of 4 steps (``tiny_run``, tests/integration/conftest.py); the exported folder is
compared with DeepSpeed's own offline consolidation of the last checkpoint and used to
generate. Resume is tested in test_reliability.py, DPO and SFT in the diagnostic smoke
(test_bench_diagnostic.py), packed batches against this run in test_reliability.py.
"""

import json
import math
import os

import pytest
import torch

from tests.integration.conftest import tiny_cfg

pytestmark = pytest.mark.slow


def test_two_worker_zero3_run(tiny_run):
    cfg, result, summary, (baseline, *lines) = tiny_run
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


def test_export_matches_checkpoint_and_generates(tiny_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, summary, _ = tiny_run
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


def test_strict_data_errors_stop_before_training(ray_local, tmp_path):
    from simpo_ray.data import DataError
    from simpo_ray.train import train

    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    bad.write_text("\n".join([good, '{"prompt": "p", "chosen": "x", "rejected": "x"}', good, "{oops"]) + "\n")
    cfg = tiny_cfg(tmp_path, **{"data.train_files": str(bad), "output.name": "bad"})
    with pytest.raises(DataError) as e:
        train(cfg)
    msg = str(e.value)
    assert f"{bad}: row 2: chosen == rejected" in msg and f"{bad}: row 4: invalid JSON" in msg
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")
