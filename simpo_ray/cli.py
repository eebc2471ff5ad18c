"""``simpo-ray``: the command line. Thin: parse, load the config, call the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simpo_ray.config import ConfigError, RunConfig


def _load(args) -> RunConfig:
    """CONFIG + overrides (+ what the command and --address imply), validated; printed
    resolved for the commands that run something."""
    overrides = list(args.overrides) + (["simpo.loss=sft"] if args.command == "sft" else [])
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    if getattr(args, "rounds", None) is not None:
        overrides.append(f"generate.rounds={args.rounds}")
    cfg = RunConfig.from_yaml(args.config, overrides)
    if hasattr(args, "dry_run"):
        print("[simpo-ray] resolved config:\n" + cfg.to_yaml(), flush=True)
    return cfg


def _train(args) -> int:
    cfg = _load(args)
    if args.dry_run:
        return 0
    from simpo_ray.train import train

    result, summary = train(cfg, allow_config_change=args.allow_config_change)
    m = summary["final_metrics"] or {}
    keys = ("step", "loss", "rewards/accuracies", "eval/rewards/accuracies", "rewards/margins", "eval/loss")
    verb = "done" if summary["finished"] else "stopped early (rerun to continue)"
    print(f"[simpo-ray] {verb} after " + "{:.0f} s: ".format(summary["wall_s"])
          + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m))
    if summary["export_dir"] and summary["finished"]:
        print(f"[simpo-ray] model: {summary['export_dir']}")
    print(f"[simpo-ray] run folder: {summary['run_dir']}")
    return 0


def _tune(args) -> int:
    from simpo_ray.sweep_spec import describe, load_spec

    spec = load_spec(args.config, args.overrides)
    print("[simpo-ray] resolved sweep:\n" + describe(spec), flush=True)
    if args.dry_run:
        return 0
    from simpo_ray.sweep import run_sweep

    summary = run_sweep(spec, address=args.address)
    return 0 if summary.get("best") else 1


def _plan(args) -> int:
    from simpo_ray.planner import run_plan

    return run_plan(args)


def _scale(args) -> int:
    from simpo_ray.scale import run_scale_cli

    return run_scale_cli(args)


def _data(args) -> int:
    from simpo_ray.data import DataError
    from simpo_ray import inspect_data

    cfg = _load(args)
    try:
        if args.data_command == "tokens":
            return inspect_data.tokens(cfg, rows=args.rows, as_json=args.json)
        return inspect_data.run(cfg, histogram=args.histogram, as_json=args.json)
    except DataError as e:
        print(f"simpo-ray: {e}", file=sys.stderr)
        return 1


def _generate(args) -> int:
    cfg = _load(args)
    if args.dry_run:
        return 0
    from simpo_ray import onpolicy

    if args.command == "generate":
        t = onpolicy.generate_pairs(cfg)
        print(f"[simpo-ray] {t['pairs']} pairs from {t['prompts']} prompts, dropped {t['dropped'] or 'none'}; "
              f"{t['tokens']} tokens generated in {t['wall_s']} s; pairs: {t['pairs_dir']}")
        return 0 if t["pairs"] else 1
    out = onpolicy.iterate(cfg)
    for r in out["rounds"]:
        m = r.get("final_metrics") or {}
        print(f"[simpo-ray] round {r['round']}: {r['pairs']} pairs, eval accuracy "
              f"{m.get('eval/rewards/accuracies', float('nan')):.3g}, model {r['export_dir']}")
    verb = "done" if out["finished"] else "stopped early (rerun to continue)"
    print(f"[simpo-ray] {verb}; policy: {out['policy']}")
    return 0


def _export(args) -> int:
    from simpo_ray.export import ExportError, export_run

    try:
        out = export_run(args.run_dir, checkpoint=args.checkpoint, out=args.out)
    except ExportError as e:
        print(f"simpo-ray: {e}", file=sys.stderr)
        return 1
    print(f"[simpo-ray] exported {Path(out['checkpoint']).name} (step {out['step']}) to {out['out']}")
    return 0


def _eval(args) -> int:
    from simpo_ray.evaluation import run_eval_cli

    return run_eval_cli(args)


def _compare(args) -> int:
    from simpo_ray.compare import run_compare_cli

    if args.dry_run:
        _load(args)
        return 0
    return run_compare_cli(args)


def _config_parent(config_help: str, overrides_help: str, address: bool = True, dry_run: bool = True):
    """The arguments every config-driven command shares: CONFIG, key=value overrides,
    --address, --dry-run (one definition, so they read and behave the same everywhere)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("config", help=config_help)
    parent.add_argument("overrides", nargs="*", help=overrides_help)
    if address:
        parent.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    if dry_run:
        parent.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    return parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="simpo-ray", description="Ray-distributed SimPO trainer.")
    sub = p.add_subparsers(dest="command", required=True)
    run = _config_parent("YAML config (see examples/)", "key.sub=value, e.g. optim.lr=1e-6")
    runs = {
        "train": ("train with SimPO on Ray Train + DeepSpeed",
                  "Train from a YAML config; key.sub=value overrides follow it. "
                  "Rerunning with the same output.name resumes."),
        "sft": ("supervised fine-tuning on the chosen responses (same machinery)",
                "The stage before SimPO for base models: completion-only NLL on the chosen responses "
                "of the configured data; same config, workers, checkpoints and export as `train` "
                "(simpo.loss is set to sft)."),
    }
    for name, (help_text, description) in runs.items():
        tp = sub.add_parser(name, help=help_text, description=description, parents=[run])
        tp.add_argument("--allow-config-change", action="store_true",
                        help="resume a run whose config changed (the differences are recorded in the run "
                             "folder's config_changes.jsonl and the model card); without it such a rerun stops")
        tp.set_defaults(fn=_train)
    s = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (ASHA) over training runs",
                       description="Run the sweep file (see tune/); key=value overrides set sweep fields "
                                   "(num_samples=4, scheduler.grace_period=2, search_space.optim.lr=...) or, "
                                   "for any other key, the base training config (train.max_steps=8). "
                                   "Rerunning the same command resumes an interrupted sweep.",
                       parents=[_config_parent("sweep YAML (see tune/)",
                                               "key=value, e.g. num_samples=4 train.max_steps=8")])
    s.set_defaults(fn=_tune)
    from simpo_ray import planner, scale

    pl = sub.add_parser("plan", help="per-GPU and host memory of a config on a cluster; does it fit?",
                        description="Estimate per-GPU memory (parameters, gradients, optimizer states, "
                                    "activations, logits head) and host RAM per node (ZeRO-3 loading, offload) "
                                    "for CONFIG on NODES x GPUS; exit 0 if it fits, 1 if not (with the smallest "
                                    "change that fits). Offline: no weights are read.",
                        parents=[_config_parent("YAML config (see examples/)", "key.sub=value overrides",
                                                address=False, dry_run=False)])
    planner.add_arguments(pl)
    pl.set_defaults(fn=_plan)
    sc = sub.add_parser("scale", help="the same short training for a ladder of model sizes; CSV + log-log PNG",
                        description="Train CONFIG's architecture at each of --sizes for a few steps and record "
                                    "parameters, tokens/s and step time per worker, peak memory, MFU and "
                                    "checkpoint size.",
                        parents=[_config_parent("YAML config whose architecture and training settings are scaled",
                                                "key.sub=value, e.g. train.micro_batch_size=2", dry_run=False)])
    scale.add_arguments(sc)
    sc.set_defaults(fn=_scale)
    dp = sub.add_parser("data", help="inspect the training data of a config",
                        description="Data tools. `data inspect CONFIG.yaml`: rows dropped per reason, token-length "
                                    "percentiles, share truncated, padding waste, the token policy and a sample "
                                    "row, and a length histogram PNG; exit 1 when a strict run would stop on "
                                    "malformed rows. `data tokens CONFIG.yaml --rows N [--json]`: the first N "
                                    "train rows' token ids exactly as training sees them.")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="counts per reason, length percentiles, histogram PNG",
                         description="Scan the config's train/eval data with the training tokenizer and rules.",
                         parents=[_config_parent("YAML config (see examples/)", "key.sub=value, e.g. data.strict=false",
                                                 address=False, dry_run=False)])
    di.add_argument("--histogram", help="PNG path (default: the run folder's data_lengths.png)")
    di.add_argument("--json", action="store_true", help="print the report as JSON")
    di.set_defaults(fn=_data)
    dt = dsub.add_parser("tokens", help="the first N train rows' prompt / chosen / rejected ids as training sees them",
                         description="Tokenize the first N rows of the config's train data exactly as training does "
                                     "(chat template in one pass, BOS policy, end-of-turn, truncation) and print the "
                                     "rendered text, token pieces and ids of prompt, chosen and rejected; with --json "
                                     "one JSON object per row: row, source, prompt_ids, chosen_ids, rejected_ids "
                                     "(or error and reason for a row training drops).",
                         parents=[_config_parent("YAML config (see examples/)", "key.sub=value, e.g. data.add_bos=never",
                                                 address=False, dry_run=False)])
    dt.add_argument("--rows", type=int, default=5, help="how many rows (default 5)")
    dt.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    dt.set_defaults(fn=_data)
    onpolicy = _config_parent("YAML config with a generate section (see examples/onpolicy_*.yaml)",
                              "key.sub=value, e.g. generate.num_samples=4")
    for name, help_text, description in (
            ("generate", "on-policy pairs: N samples per prompt, reward-scored, best/worst (vLLM actors)",
             "Sample generate.num_samples responses per prompt from model.name_or_path (generate.backend: vllm "
             "or transformers), score them with generate.reward, keep the best as chosen and the worst as "
             "rejected, and write Parquet in the training format (token ids + text + provenance) to "
             "generate.output (default: the run folder's generated/). Rerunning skips finished parts."),
            ("iterate", "on-policy rounds: generate -> score -> pair -> train -> export, R times",
             "Round k samples from the current policy, pairs, trains SimPO from it on the new pairs and "
             "exports; the next round samples from that export. Each round's data, metrics and checkpoints "
             "are kept under the run folder; rerunning resumes at the first unfinished round.")):
        gp = sub.add_parser(name, help=help_text, description=description, parents=[onpolicy])
        if name == "iterate":
            gp.add_argument("--rounds", type=int, help="number of rounds (default: generate.rounds)")
        gp.set_defaults(fn=_generate)
    from simpo_ray import compare, evaluation

    ev = sub.add_parser("eval", help="held-out pairs, greedy generations and win rates of models; report.md",
                        description="Score held-out pairs (likelihood ranking, each method's reward accuracy; by "
                                    "length quartile and category), generate greedily on the held-out prompts "
                                    "(length, unfinished, repeat, empty rates) and, with a baseline and a reward "
                                    "model, win rates against the baseline (raw and length-controlled, with 95% "
                                    "intervals). Writes report.md, report.json and plots to --out.")
    evaluation.add_arguments(ev)
    ev.set_defaults(fn=_eval)
    cp = sub.add_parser("compare", help="train each objective from the same start, then eval them side by side",
                        description="Train CONFIG once per loss of --losses (same data, seed and steps; each loss "
                                    "with its recipe's beta unless simpo.beta is given), then evaluate every model "
                                    "against the starting model on the held-out pairs: one report with pairwise "
                                    "accuracy, generation metrics, win rates, peak memory and wall time, and which "
                                    "method wins. Rerunning resumes.",
                        parents=[run])
    compare.add_arguments(cp)
    cp.set_defaults(fn=_compare)
    ex = sub.add_parser("export", help="a Hugging Face folder from any checkpoint of a run (latest by default)",
                        description="Consolidate a checkpoint of RUN_DIR (the newest whole one, or --checkpoint) "
                                    "offline from its DeepSpeed shards into a Hugging Face folder: safetensors in "
                                    "model.dtype, the tokenizer and the model card, as the end-of-run export "
                                    "writes. Needs no Ray cluster; a damaged checkpoint is named and skipped.")
    ex.add_argument("run_dir", help="the run folder (output.root/output.name; holds config.yaml)")
    ex.add_argument("--checkpoint", help="e.g. checkpoint_000020 (default: the newest whole one)")
    ex.add_argument("--out", help="destination folder (default: RUN_DIR/export/CHECKPOINT)")
    ex.set_defaults(fn=_export)
    args = p.parse_args(argv)
    from simpo_ray.sources import DataError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"simpo-ray: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # bad input found before training: file, row, reason; no traceback
        print(f"simpo-ray: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
