"""Generation probes in a real ZeRO-3 run on 2 CPU workers: the live policy generates in
lockstep (synced_gpus) on the held-out prompts, the gen/ metrics reach every probed
metrics line and the progress line, the texts reach generations.jsonl, and a collapse
seen only in the generations (a learning rate that makes the tiny model's greedy replies
loop) raises alarm/generation and, with train.stop_on_alarm, stops the run with a
checkpoint."""

import json
import os

import pytest

from simpo_ray.probes import GEN_KEYS, GENERATION_ALARM
from tests.integration.conftest import fit

pytestmark = pytest.mark.slow

PROMPTS, EVERY = 6, 2


def test_probes_write_generations_and_a_looping_policy_stops_the_run(ray_local, tmp_path, capsys):
    cfg, _, summary, lines = fit(tmp_path, **{
        "optim.lr": 3e-2, "optim.warmup_ratio": 0, "train.max_steps": 12, "train.checkpoint_every": 100,
        "train.stop_on_alarm": "true", "output.export": "false", "eval.generate_every": EVERY,
        "eval.generate_prompts": PROMPTS, "eval.generate_max_tokens": 24})
    probed = [m for m in lines if "gen/length_median" in m]
    assert probed[0]["step"] == 0 and all(m["step"] % EVERY == 0 for m in probed)
    assert all(set(GEN_KEYS) <= set(m) and GENERATION_ALARM in m for m in probed)
    assert probed[0][GENERATION_ALARM] is False
    fired = [m["step"] for m in probed if m[GENERATION_ALARM]]
    assert fired, [(m["step"], {k: m[k] for k in GEN_KEYS}) for m in probed]
    # stopped at the first alarm, with a checkpoint, before the planned end
    stop = fired[0]
    assert not summary["finished"] and summary["final_metrics"]["step"] == stop < 12
    assert lines[-1]["step"] == stop and lines[-1].get("checkpoint")
    out = capsys.readouterr().out
    assert "generations changed since step 0" in out and "train.stop_on_alarm" in out and "gen len" in out
    gens = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "generations.jsonl"))]
    assert sorted({g["step"] for g in gens}) == [m["step"] for m in probed]
    assert all(len([g for g in gens if g["step"] == m["step"]]) == PROMPTS for m in probed)
    assert len({g["prompt_id"] for g in gens}) == PROMPTS  # the same prompts every time
    assert all(isinstance(g["text"], str) and g["tokens"] <= 24 for g in gens)
