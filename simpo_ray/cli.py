"""``simpo-ray``: the command line. Thin: parse, load the config, call the library."""

from __future__ import annotations

import argparse
import sys

from simpo_ray.config import ConfigError, RunConfig


def _train(args) -> int:
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    print("[simpo-ray] resolved config:\n" + cfg.to_yaml(), flush=True)
    if args.dry_run:
        return 0
    from simpo_ray.train import train

    result, summary = train(cfg)
    m = summary["final_metrics"] or {}
    keys = ("step", "loss", "rewards/accuracies", "eval/rewards/accuracies", "rewards/margins")
    print("[simpo-ray] done in {:.0f} s: ".format(summary["wall_s"])
          + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m))
    if summary["export_dir"]:
        print(f"[simpo-ray] model: {summary['export_dir']}")
    print(f"[simpo-ray] run folder: {summary['run_dir']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="simpo-ray", description="Ray-distributed SimPO trainer.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with SimPO on Ray Train + DeepSpeed",
                       description="Train from a YAML config; key.sub=value overrides follow it. "
                                   "Rerunning with the same output.name resumes.")
    t.add_argument("config", help="YAML config (see examples/)")
    t.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=1e-6")
    t.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    t.set_defaults(fn=_train)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"simpo-ray: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
