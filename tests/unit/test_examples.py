"""Every example config loads and validates, and every GPU recipe's CPU smoke mode
(tests/conftest.py: RECIPE_SMOKE, ONPOLICY_SMOKE; cluster/README.md) resolves, plans and
passes ``--dry-run``.

No recipe is trained here, because a fit would re-prove what the suite already fits: the
70B recipe's smoke mode is trained across two Ray nodes (tests/integration/test_cluster),
and ``on-policy tiny`` through generate + train (tests/integration/test_generate). Each
other recipe's smoke config is checked to differ from the one fitted only in fields whose
other values are fitted elsewhere too (the loss's scalars, padded vs packed rows, names).
"""

import glob
import os

import pytest

from simpo_ray.cli import main
from simpo_ray.config import RunConfig
from tests.conftest import ONPOLICY_SMOKE, RECIPE_SMOKE, REPO

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "**", "*.yaml"), recursive=True))
RECIPES = [p for p in EXAMPLES if "tiny" not in os.path.basename(p)]
FITTED = os.path.join(REPO, "examples", "llama3-70b-instruct.yaml")  # test_cluster trains its smoke mode
FITTED_ONPOLICY = os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml")  # test_generate runs it
# Fields where a recipe's smoke config may differ from the fitted one, and why that
# needs no fit of its own.
FREE = {
    "simpo.beta": "a scalar of the loss (tests/unit/test_losses)",
    "simpo.gamma_beta_ratio": "a scalar of the loss (tests/unit/test_losses)",
    "data.packing": "padded rows: every tiny_cpu fit; packed: the 70B smoke and test_reliability",
    "output.name": "a folder name",
    "output.keep_checkpoints": "1 in the 70B smoke, 2 in every tiny_cpu fit",
}
# Generation settings an on-policy recipe keeps in its smoke mode (its sampling).
FREE_GENERATE = {"generate.num_samples", "generate.temperature", "generate.top_p", "generate.seed",
                 "generate.reward.batch_size", "generate.min_score_margin"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "engine_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _differing(a: RunConfig, b: RunConfig, section: str = "") -> set:
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return {k for k in fa.keys() | fb.keys() if k.startswith(section) and fa.get(k) != fb.get(k)}


def _onpolicy(path: str) -> bool:
    return "generate" in RunConfig.from_yaml(path).to_dict() and os.path.basename(path).startswith("onpolicy")


def test_there_are_examples():
    assert EXAMPLES and RECIPES and FITTED in RECIPES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.relpath(p, REPO))
def test_example_validates(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.train.total_batch_size % (cfg.train.micro_batch_size * cfg.train.num_workers) == 0


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_smoke_mode_resolves_plans_and_matches_a_fitted_one(path, capsys):
    smoke = ONPOLICY_SMOKE if _onpolicy(path) else RECIPE_SMOKE
    recipe, cfg = RunConfig.from_yaml(path), RunConfig.from_yaml(path, smoke)
    cfg.validate()
    # The recipe's own method stays: loss, its scalars, schedule, DeepSpeed, packing.
    for key in ("simpo", "optim.schedule", "optim.warmup_ratio", "deepspeed", "data.packing",
                "model.gradient_checkpointing", "model.logps_chunk_size", "train.epochs"):
        sec, _, field = key.partition(".")
        a, b = getattr(recipe, sec), getattr(cfg, sec)
        assert (getattr(a, field) == getattr(b, field)) if field else (a == b), key
    # What it trains is the fitted 70B smoke run up to fields fitted elsewhere.
    other = _differing(cfg, RunConfig.from_yaml(FITTED, RECIPE_SMOKE))
    assert {k for k in other if not k.startswith("generate.")} <= FREE.keys(), other
    if smoke is ONPOLICY_SMOKE:  # and how it generates is the fitted on-policy tiny run's
        fitted = RunConfig.from_yaml(FITTED_ONPOLICY, ["generate.max_prompts=16"])
        assert _differing(cfg, fitted, "generate.") <= FREE_GENERATE, _differing(cfg, fitted, "generate.")

    commands = ["generate", "iterate"] if smoke is ONPOLICY_SMOKE else ["train"]
    for command in commands:
        assert main([command, path, *smoke, "--dry-run"]) == 0
        assert "name_or_path: tiny" in capsys.readouterr().out
    # The planner: the smoke run fits its 2 CPU workers (one node, one device each).
    assert main(["plan", path, *smoke]) == 0, capsys.readouterr().err
    assert "fits" in capsys.readouterr().out.lower()
