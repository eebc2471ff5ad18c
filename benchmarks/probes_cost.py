"""What generation probes cost at the defaults: the same training run with probes on
(``eval.generate_every`` null: with every held-out evaluation, 32 prompts, 128 tokens)
and off (``eval.generate_every=0``), one after the other on one local Ray cluster.

Baseline: the run with probes off. Reported: wall time of both fits (the data prepared
once, shared), their ratio, and the probes' own share of the probed run (the sum of the
``gen/seconds`` rank 0 reports, over the fit's wall time).

    python benchmarks/probes_cost.py                      # examples/tiny_cpu.yaml as is
    python benchmarks/probes_cost.py train.max_steps=40   # shorter
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    from simpo_ray.config import RunConfig
    from simpo_ray.metrics import read_all
    from simpo_ray.train import fit, prepare

    overrides = list(argv if argv is not None else sys.argv[1:])
    root = tempfile.mkdtemp(prefix="probes-cost-")
    base = [f"output.root={root}", "output.export=false", *overrides]
    on = RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"), [*base, "output.name=probes-on"])
    off = RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"), [*base, "output.name=probes-off",
                                                                                  "eval.generate_every=0"])
    prepared = prepare(on)  # with the probes' prompts; the off run ignores them
    out = {}
    for name, cfg in (("off", off), ("on", on)):
        _, summary = fit(cfg, prepared)
        lines = read_all(os.path.join(summary["run_dir"], "metrics.jsonl"))
        probes = [m for m in lines if "gen/seconds" in m]
        out[name] = {"wall_s": summary["wall_s"], "steps": summary["total_steps"], "probes": len(probes),
                     "probe_s": round(sum(m["gen/seconds"] for m in probes), 1)}
    out["ratio_on_over_off"] = round(out["on"]["wall_s"] / out["off"]["wall_s"], 3)
    out["probe_share_of_on"] = round(out["on"]["probe_s"] / out["on"]["wall_s"], 3)
    out["settings"] = {"generate_every": on.eval.generate_every, "eval_every": on.train.eval_every,
                       "generate_prompts": on.eval.generate_prompts, "generate_max_tokens": on.eval.generate_max_tokens,
                       "overrides": overrides}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
