"""benchmarks/diagnostic.py --smoke: SFT -> SimPO / DPO on real Ray Train + DeepSpeed.

Correctness only: every number in range, the JSON and the plot written, and both
preference runs started from the SFT export (their step-0 held-out log-probs, computed
by the training workers, equal the SFT model's scored here, and differ from the
untrained model's). No timing and no paper numbers are asserted: the smoke budgets
are far too small for the figures to mean anything.

Its three fits are also the suite's SFT run (`simpo-ray sft` machinery: chosen
responses only, completion-only NLL, exported like SimPO) and its DPO run (reference
log-probs precomputed once; at the start the policy is the reference, so the reward
margin is zero).
"""

import json
import math
import os

import pytest

from tests.integration.conftest import load_script, read_metrics


def _load_bench():
    return load_script(os.path.join("benchmarks", "diagnostic.py"), "bench_diagnostic")


def test_task_generator_is_seeded_and_skewed(tmp_path):
    bench = _load_bench()
    a = bench.make_task(3, 60, 10, 20, tmp_path / "a")
    b = bench.make_task(3, 60, 10, 20, tmp_path / "b")
    for split in ("train", "dev", "test"):
        assert open(a["files"][split]).read() == open(b["files"][split]).read()
    rows = {s: bench.read_rows(a["files"][s]) for s in ("train", "dev", "test")}
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [60, 10, 20]
    prompts = [r["prompt"] for s in rows.values() for r in s]
    assert len(set(prompts)) == len(prompts)  # no prompt shared between splits
    st = a["stats"]["train"]
    assert st["mean_chars_rejected"] > 2 * st["mean_chars_chosen"]  # the length skew
    assert set(a["kinds"]["test"]) <= set(bench.KINDS) and len(a["kinds"]["test"]) == 20


@pytest.mark.slow
def test_smoke_run(ray_local, tmp_path):
    bench = _load_bench()
    out = tmp_path / "diag"
    s = bench.run(bench.argparse.Namespace(smoke=True, seed=0, out=str(out), plot=None,
                                           hidden=64, layers=2, heads=2))
    on_disk = json.loads((out / "diagnostic.json").read_text())
    assert on_disk["best"].keys() == {"simpo", "dpo"}
    png = out / "diagnostic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    def in_unit(x):
        return isinstance(x, float) and 0.0 <= x <= 1.0

    sft = on_disk["sft"]
    assert in_unit(sft["test"]["likelihood_accuracy"]) and "reward_accuracy" not in sft["test"]
    assert sft["generation"]["mean_length"] > 0
    # The SFT run: NLL of the chosen responses only (no pair metrics), lower after training
    # than the held-out NLL at step 0; exported like a SimPO run.
    baseline, *lines = read_metrics(out / "runs" / "sft")
    assert baseline["step"] == 0 and "eval/loss" in baseline and "rewards/accuracies" not in lines[0]
    assert lines[-1]["loss"] < baseline["eval/loss"]
    assert os.path.isfile(os.path.join(sft["export"], "model.safetensors"))
    for method in ("simpo", "dpo"):
        best = on_disk["best"][method]
        for split in ("dev", "test"):
            assert in_unit(best[split]["likelihood_accuracy"]) and in_unit(best[split]["reward_accuracy"])
            assert best[split]["pairs"] == on_disk["data"][split]["pairs"]
        g = best["generation"]
        assert g["mean_length"] > 0 and in_unit(g["unfinished"]) and in_unit(g["exact_correct"])
        assert math.isclose(g["length_vs_sft"], g["mean_length"] / sft["generation"]["mean_length"] - 1)
        if method == "simpo":  # SimPO's reward is the scaled average log-likelihood
            assert best["test"]["reward_accuracy"] == best["test"]["likelihood_accuracy"]

    for run in on_disk["grid"]:
        start = run["start"]
        # Configured from the SFT export, and really holding its weights at step 0.
        assert start["model_name_or_path"] == start["sft_export"] == sft["export"]
        assert start["matches_sft"]
        assert abs(start["step0_dev_logp_chosen"] - start["sft_dev_logp_chosen"]) < 1e-3
        assert abs(start["step0_dev_logp_chosen"] - start["untrained_dev_logp_chosen"]) > 0.05
        if run["method"] == "dpo":  # the SFT model is the reference: no margin before training
            assert start["dpo_margin_zero_at_start"]
            baseline, *lines = read_metrics(out / "runs" / run["run"])
            assert abs(baseline["eval/rewards/margins"]) < 1e-5
            assert lines[0]["step"] == 1 and abs(lines[0]["rewards/margins"]) < 1e-5  # forward before any update
            assert all(math.isfinite(m["loss"]) for m in lines)
            assert "logps/accuracies" in lines[0] and "alarm/chosen_logp_drop" in lines[0]
        assert os.path.isfile(os.path.join(out, "runs", run["run"], "model", "model.safetensors"))
    assert s["plot"] == str(png)
