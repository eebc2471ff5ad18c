"""``simpo-ray compare CONFIG --losses simpo,dpo[,...]``: every objective trained from
the same start on the same data with the same seed and steps, then ``simpo-ray eval``
on all of them against the starting model, in one side-by-side report.

The data is read and tokenized once (``train.prepare``), the reference pass of the DPO
family made once (``train.with_reference``), every run goes through ``train.fit``.
Each loss trains with its recipe's beta (``objective.LOSSES``; the config's own beta for
the config's own loss) unless ``simpo.beta`` is given on the command line.

Folder (``output.root/<output.name>-compare``, apart from a training run of the same
name): one run folder per loss (``simpo/``, ``dpo/``...:
config, metrics, checkpoints, ``model/``), ``heldout.jsonl`` (the held-out rows, when
the held-out pairs are a split of the training files), and the report
(``report.md``, ``report.json``, plots, ``generations.jsonl``). Rerunning resumes
every unfinished run and evaluates again.
"""

from __future__ import annotations

import json
from pathlib import Path

from simpo_ray.config import ConfigError, RunConfig

HELDOUT_FILE = "heldout.jsonl"


def compare_dir(cfg: RunConfig) -> Path:
    return cfg.output.run_dir.parent / f"{cfg.output.name}-compare"


def loss_config(cfg: RunConfig, loss: str, beta_given: bool) -> RunConfig:
    """``cfg`` for one loss: its recipe beta unless ``simpo.beta`` was given (or the loss
    is the config's own), the export on (eval reads it)."""
    from simpo_ray.objective import LOSSES

    d = cfg.to_dict()
    if not beta_given and loss != cfg.simpo.loss:
        d["simpo"]["beta"] = LOSSES[loss].beta
    d["simpo"]["loss"] = loss
    d["output"]["export"] = True
    return RunConfig.from_dict(d)


def heldout_file(prepared, folder: Path) -> list:
    """The held-out pairs as files eval can read: ``data.eval_files`` when the config has
    them, else the rows of the held-out split written to ``folder/heldout.jsonl``."""
    from simpo_ray.sources import expand_files, iter_file_rows

    cfg = prepared.cfg
    if cfg.data.eval_files:
        return expand_files(cfg.data.eval_files)
    eval_ds = prepared.datasets.get("eval")
    if eval_ds is None:
        raise ConfigError("data.eval_fraction", "compare evaluates on held-out pairs: set data.eval_fraction > 0 "
                                                "or data.eval_files")
    keys = {(str(r["source"]), int(r["row"])) for r in eval_ds.select_columns(["source", "row"]).take_all()}
    out, tmp = folder / HELDOUT_FILE, folder / (HELDOUT_FILE + ".tmp")
    with open(tmp, "w") as f:
        for src in sorted({s for s, _ in keys}):
            for n, row in iter_file_rows(src):
                if (src, n) in keys:
                    f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    return [str(out)]


def run_compare(cfg: RunConfig, losses: list, beta_given: bool = False, reward_model=None,
                prompts: int = 32, max_tokens=None) -> dict:
    """Train every loss of ``losses`` on ``cfg`` and evaluate them; returns the report."""
    from simpo_ray.evaluation import Model, eval_config, evaluate
    from simpo_ray.objective import PAIR_LOSSES
    from simpo_ray.tracking import RunInfo
    from simpo_ray.train import fit, prepare, with_reference

    bad = [x for x in losses if x not in PAIR_LOSSES]
    if bad or len(set(losses)) != len(losses) or not losses:
        raise ConfigError("--losses", f"a list of distinct pair losses from {', '.join(PAIR_LOSSES)}, got {losses}")
    cfg.validate()
    folder = compare_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, reference=False)
    heldout = heldout_file(prepared, folder)
    models, walls = [], {}
    for loss in losses:
        lcfg = loss_config(cfg, loss, beta_given)
        print(f"[simpo-ray] compare: {loss} (beta {lcfg.simpo.beta:g}) -> {folder / loss}", flush=True)
        prepared = with_reference(prepared, lcfg)
        _, summary = fit(lcfg, prepared, name=loss, storage=str(folder),
                         tracking=RunInfo(loss, group=folder.name, tags={"method": loss}))
        if not summary["finished"]:
            raise RuntimeError(f"the {loss} run stopped before its last step ({summary['run_dir']}); rerun to continue")
        walls[loss] = {"wall_s": summary["wall_s"]}
        models.append(Model(loss, summary["export_dir"], loss, summary["run_dir"]))
    rm = reward_model or cfg.generate.reward.name_or_path
    if rm == "tiny":
        print("[simpo-ray] compare: reward model 'tiny' is randomly initialised: its win rates test the "
              "plumbing, not the models (give --reward-model)", flush=True)
    ecfg = eval_config(cfg, heldout[0] if len(heldout) == 1 else heldout, prompts,
                       max_tokens or cfg.eval.generate_max_tokens, None, rm)
    baseline = Model("baseline", prepared.model_path)
    return evaluate(models, heldout, ecfg, folder, baseline=baseline, reward_model=rm, extra=walls)


def run_compare_cli(args) -> int:
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = RunConfig.from_yaml(args.config, overrides)
    beta_given = any(o.split("=", 1)[0].strip() == "simpo.beta" for o in args.overrides)
    run_compare(cfg, losses, beta_given, args.reward_model, args.prompts, args.max_tokens)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--losses", required=True, help="comma-separated pair losses, e.g. simpo,dpo")
    p.add_argument("--reward-model", help="reward model for win rates (default generate.reward.name_or_path)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts to generate for (default 32)")
    p.add_argument("--max-tokens", type=int, help="reply cap in tokens (default eval.generate_max_tokens)")
