"""The end of a sweep: each trial's reports read back, one row per trial with why it
stopped, the table (printed and ``results.csv``), the best trial's config
(``best_config.yaml``), the plot (``sweep.png``) and ``summary.json``.

A trial's reports are its Train run's ``metrics.jsonl`` (trials/<id>/), appended across
restarts, so they hold what Tune's own results lose when a trial is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

from simpo_ray import tables
from simpo_ray.metrics import read_reports
from simpo_ray.config import OBJECTIVE, RunConfig
from simpo_ray.sweep_spec import COLLAPSE_ALARM, SweepSpec, base_config, search_space, trial_config

# Columns of the printed table (the CSV has every column).
HIDDEN_COLUMNS = ("checkpoint", "detail")


def divergence(result: dict, alarms=(COLLAPSE_ALARM,)) -> Optional[str]:
    """Why a report shows a diverged run (a non-finite loss, a raised alarm, or the
    marker a trial adds when its workers stopped on non-finite losses), else None."""
    if result.get("diverged"):
        return str(result["diverged"])
    for key in ("loss", "eval/loss"):
        v = result.get(key)
        if isinstance(v, (int, float)) and not math.isfinite(v):
            return f"{key} is {v}"
    for key in alarms:
        v = result.get(key)
        if isinstance(v, (bool, int, float)) and v > 0:
            return key
    return None


def trial_rows(results, space_keys: list, total_steps_of, alarms=(COLLAPSE_ALARM,), asha=True) -> list:
    """One row per trial: its config, best held-out accuracy, steps run and why it stopped.

    ``results``: dicts with ``trial_id``, ``config``, ``reports`` (every report, in
    order), ``error`` (str or None), ``checkpoint``, ``done`` (False: the sweep was
    interrupted while it ran); ``total_steps_of(config)`` -> int.
    """
    rows = []
    for r in results:
        reports = r["reports"]
        scored = [m for m in reports if isinstance(m.get(OBJECTIVE), (int, float)) and math.isfinite(m[OBJECTIVE])]
        best = max(scored, key=lambda m: (m[OBJECTIVE], m.get("step", 0)), default=None)
        last = reports[-1] if reports else {}
        steps, total = int(last.get("step", 0)), total_steps_of(r["config"])
        why = divergence(last, alarms)
        if r["error"]:
            reason = "error"
        elif why:
            reason = "diverged"
        elif not reports:
            reason = "no reports"
        elif not r.get("done", True):
            reason = "interrupted"  # Ctrl-C: rerun the same command to resume
        elif steps >= total:
            reason = "completed"
        else:
            reason = "early stopped (asha)" if asha else "stopped"
        row = {"trial_id": r["trial_id"], "stop_reason": reason}
        row.update({k: r["config"].get(k) for k in space_keys})
        row.update({"best_accuracy": best[OBJECTIVE] if best else None,
                    "best_step": best.get("step") if best else None,
                    "final_accuracy": last.get(OBJECTIVE), "steps": steps, "total_steps": total,
                    "final_loss": last.get("loss"), "detail": r["error"] or why or "",
                    "checkpoint": r.get("checkpoint")})
        rows.append(row)
    return rows


def best_row(rows: list) -> Optional[dict]:
    """Highest held-out accuracy among trials that neither diverged nor errored."""
    good = [r for r in rows if r["stop_reason"] not in ("diverged", "error", "interrupted")
            and r["best_accuracy"] is not None]
    return max(good, key=lambda r: (r["best_accuracy"], r["steps"]), default=None)


def plot(rows: list, base: RunConfig, path: Path) -> None:
    """Best held-out accuracy against lr, beta and gamma_beta_ratio, one point per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [("optim.lr", "learning rate", True), ("simpo.beta", "beta", False),
                 ("simpo.gamma_beta_ratio", "gamma / beta", False)]
    styles = {"completed": ("o", "tab:green"), "early stopped (asha)": ("v", "tab:orange"),
              "diverged": ("x", "tab:red"), "error": ("x", "black"), "stopped": ("s", "tab:blue"),
              "interrupted": ("s", "tab:gray")}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    best = best_row(rows)
    for ax, (key, label, log) in zip(axes, axes_keys):
        for reason, (marker, color) in styles.items():
            pts = [(_value(r, key, base), r["best_accuracy"]) for r in rows
                   if r["stop_reason"] == reason and r["best_accuracy"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=reason, s=40)
        if best:
            ax.scatter([_value(best, key, base)], [best["best_accuracy"]], marker="*", s=220,
                       facecolors="none", edgecolors="black", label="best")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best held-out pairwise accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _value(row: dict, key: str, base: RunConfig):
    if row.get(key) is not None:
        return row[key]
    if key == "simpo.gamma_beta_ratio" and row.get("simpo.gamma") is not None:
        return row["simpo.gamma"] / (row.get("simpo.beta") or base.simpo.beta)
    section, name = key.split(".")
    return getattr(getattr(base, section), name) if key != "simpo.gamma_beta_ratio" \
        else base.simpo.resolved_gamma_beta_ratio


def report(spec: SweepSpec, grid, prepared, exp_dir: Path) -> dict:
    """Table (printed + CSV), best config YAML, plot, summary.json. ``grid``: Tune's
    ResultGrid; ``prepared``: the sweep's ``train.Prepared`` (its cfg is the base)."""
    base = prepared.cfg
    base_dict = base.to_dict()
    results = sorted((_result(res, exp_dir) for res in grid), key=lambda r: r["trial_id"])
    totals = {}

    def total_steps_of(config):
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in totals:  # the prepared plan decides whether it can be reused
            totals[key] = prepared.plan_for(trial_config(base_dict, config), str(exp_dir / "trials")).total_steps
        return totals[key]

    rows = trial_rows(results, sorted(search_space(spec)), total_steps_of, spec.divergence.alarms,
                      asha=spec.scheduler.type == "asha")
    tables.write_csv(rows, exp_dir / "results.csv")
    _close_trackers(results, rows, base_dict, exp_dir)
    notes = "".join(f"\n  {r['trial_id']} {r['stop_reason']}: {r['detail']}" for r in rows if r["detail"])
    table = tables.format_table(rows, [c for c in rows[0] if c not in HIDDEN_COLUMNS]) if rows else "(no trials)"
    print("[simpo-ray] sweep results:\n" + table + notes, flush=True)
    plot(rows, base, exp_dir / "sweep.png")
    best = best_row(rows)
    summary = {"experiment": str(exp_dir), "results_csv": str(exp_dir / "results.csv"),
               "plot": str(exp_dir / "sweep.png"), "trials": len(rows),
               "stop_reasons": {k: sum(r["stop_reason"] == k for r in rows) for k in {r["stop_reason"] for r in rows}},
               "best": best}
    if best:
        cfg = trial_config(base_dict, next(r["config"] for r in results if r["trial_id"] == best["trial_id"]))
        # Export as the base config says (trials export nothing), into a run folder of its own.
        cfg.output = dataclasses.replace(base_config(spec).output, name=f"{spec.name}-best")
        header = (f"# Best trial {best['trial_id']} of sweep {spec.name}: held-out pairwise accuracy "
                  f"{best['best_accuracy']:.4f} at step {best['best_step']}.\n"
                  f"# Train it: simpo-ray train {exp_dir / 'best_config.yaml'}\n")
        (exp_dir / "best_config.yaml").write_text(header + cfg.to_yaml())
        summary["best_config"] = str(exp_dir / "best_config.yaml")
        summary["best_checkpoint"] = best["checkpoint"]
        print(f"[simpo-ray] best trial {best['trial_id']}: accuracy {best['best_accuracy']:.4f} "
              f"(step {best['best_step']}); its latest checkpoint {best['checkpoint']}", flush=True)
    print(f"[simpo-ray] table {exp_dir / 'results.csv'}, best config {summary.get('best_config')}, "
          f"plot {exp_dir / 'sweep.png'}", flush=True)
    if summary["stop_reasons"].get("interrupted"):
        print("[simpo-ray] the sweep was interrupted: rerun the same command to resume it", flush=True)
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _close_trackers(results: list, rows: list, base_dict: dict, exp_dir: Path) -> None:
    """Every trial's tracker runs get the lines they missed and are closed: Tune ends a
    trial's actor once the trial stops, which can be before its last lines were logged."""
    from simpo_ray.tracking import RunInfo, catch_up

    reasons = {r["trial_id"]: r["stop_reason"] for r in rows}
    for res in results:
        tid = res["trial_id"]
        catch_up(trial_config(base_dict, res["config"]), exp_dir / "trials" / tid,
                 RunInfo(tid, group=exp_dir.name, params=res["config"]),
                 finished=reasons.get(tid) in ("completed", "early stopped (asha)"))


def _result(res, exp_dir: Path) -> dict:
    """One Tune result as trial_rows reads it, with the reports of its Train run."""
    trial_id = Path(res.path).name.removeprefix("trial_")
    reports = read_reports(exp_dir / "trials" / trial_id / "metrics.jsonl")
    ckpts = [m["checkpoint"] for m in reports if os.path.isdir(str(m.get("checkpoint")))]
    return {"trial_id": trial_id, "config": res.config, "reports": reports,
            "done": bool((res.metrics or {}).get("done")),
            "error": f"{type(res.error).__name__}: {res.error}".splitlines()[0] if res.error else None,
            "checkpoint": ckpts[-1] if ckpts else None}
