"""The end of ``simpo-ray eval`` / ``compare``: one report of held-out models as
``report.json`` (with a flat summary row per model and the verdict lines),
``report.md`` (the tables, the verdict, the plots embedded) and three plots:
``accuracy_by_length.png``, ``reply_lengths.png`` and ``win_rates.png`` (the last only
when a reward model scored the replies).

The report it is given (built by the eval orchestration; statistics from
``simpo_ray.eval_stats``)::

    {"data", "baseline", "reward_model" (or None), "n_pairs", "n_prompts",
     "models": {label: {"path", "loss" (None for the baseline), "pairwise": eval_stats.pairwise(),
                        "generation": {"length_median", "length_chars_median", "unfinished_rate",
                                       "repeat_rate", "empty_rate"},
                        "reply_lengths": [tokens, ...], "win": eval_stats.win_rate() or None,
                        "win_lc": eval_stats.length_controlled_win_rate() or None,
                        "peak_rss_mb", "wall_s"}}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from simpo_ray import eval_stats, tables

# The summary row's columns (a contract: the orchestration and its tests read these names).
SUMMARY_KEYS = ("pairwise_accuracy", "likelihood_ranking_accuracy", "length_median", "unfinished_rate",
                "win_rate", "win_rate_lc", "peak_rss_mb", "wall_s")
GENERATION_KEYS = ("length_median", "length_chars_median", "unfinished_rate", "repeat_rate", "empty_rate")
PLOTS = ("accuracy_by_length.png", "reply_lengths.png", "win_rates.png")


def summary_row(entry: dict, label: Optional[str] = None) -> dict:
    """One model entry as a flat row: ``model`` (``label``, else the entry's path) and
    exactly SUMMARY_KEYS, None where unknown."""
    pw, gen = entry.get("pairwise") or {}, entry.get("generation") or {}
    win, lc = entry.get("win") or {}, entry.get("win_lc") or {}
    return {"model": label if label is not None else entry.get("path"),
            "pairwise_accuracy": pw.get("pairwise_accuracy"),
            "likelihood_ranking_accuracy": pw.get("likelihood_ranking_accuracy"),
            "length_median": gen.get("length_median"), "unfinished_rate": gen.get("unfinished_rate"),
            "win_rate": win.get("win_rate"), "win_rate_lc": lc.get("win_rate_lc"),
            "peak_rss_mb": entry.get("peak_rss_mb"), "wall_s": entry.get("wall_s")}


def _summary(report: dict) -> dict:
    return report.get("summary") or {k: summary_row(e, k) for k, e in report["models"].items()}


def format_summary(report: dict) -> str:
    """The summary table as aligned text for the terminal."""
    return tables.format_table(list(_summary(report).values()), ["model", *SUMMARY_KEYS])


def verdict_of(report: dict, seed: int = 0) -> list:
    """``eval_stats.verdict`` over the models that were scored on the held-out pairs."""
    methods = {k: {"pairwise_correct": e["pairwise"]["pairwise_correct"],
                   "outcomes": (e.get("win") or {}).get("outcomes")}
               for k, e in report["models"].items() if (e.get("pairwise") or {}).get("pairwise_correct")}
    return eval_stats.verdict(methods, seed=seed) if methods else ["no model was scored on held-out pairs"]


def _has_wins(report: dict) -> bool:
    return report.get("reward_model") is not None and any(e.get("win") for e in report["models"].values())


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _md_table(rows: list, cols: list, headers: Optional[list] = None) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(headers or cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _interval(ci) -> Optional[str]:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else None


def _tokens(t) -> str:
    lo, hi = t
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def markdown(report: dict, plots: list) -> str:
    """report.md: what was evaluated, the summary, the verdict, accuracy by length and
    category, generation, win rates and the plots."""
    models = report["models"]
    names = {Path(p).name for p in plots}
    out = [f"# Evaluation: {', '.join(models)}\n",
           f"- data: `{report.get('data')}` ({report.get('n_pairs')} held-out pairs, "
           f"{report.get('n_prompts')} prompts for generation)",
           f"- baseline: `{report['baseline']}`" if report.get("baseline") else "- baseline: none",
           f"- reward model: `{report['reward_model']}`" if report.get("reward_model") is not None
           else "- reward model: none (no win rates)", ""]
    out.append(_md_table([{"model": k, "path": f"`{e.get('path')}`", "loss": e.get("loss") or "(none)",
                           "metric": (e.get("pairwise") or {}).get("pairwise_metric")} for k, e in models.items()],
                         ["model", "path", "loss", "metric"], ["model", "path", "loss", "pairwise accuracy from"]))
    out += ["Pairwise accuracy is the method's own implicit reward accuracy where its loss has one "
            "(its training loss's ranking of chosen over rejected), else the likelihood-ranking "
            "accuracy (chosen average log-prob above rejected).\n", "## Summary\n",
            _md_table(list(_summary(report).values()), ["model", *SUMMARY_KEYS]), "## Verdict\n"]
    out += [f"- {line}" for line in report["verdict"]] + [""]
    out += ["## Accuracy by response length\n",
            "Quartiles of the pair's mean response length ((chosen + rejected tokens) / 2).\n",
            _md_table([{"model": k, "quartile": f"Q{q['quartile']}", "tokens": _tokens(q["tokens"]), "n": q["n"],
                        "lik": q["likelihood_ranking_accuracy"], "rew": q["reward_accuracy"]}
                       for k, e in models.items() for q in (e.get("pairwise") or {}).get("by_length", [])],
                      ["model", "quartile", "tokens", "n", "lik", "rew"],
                      ["model", "quartile", "tokens", "n", "likelihood-ranking accuracy", "reward accuracy"])]
    if "accuracy_by_length.png" in names:
        out.append("![accuracy by response-length quartile](accuracy_by_length.png)\n")
    cats = [{"category": c, "model": k, "n": v["n"], "lik": v["likelihood_ranking_accuracy"],
             "rew": v["reward_accuracy"]}
            for k, e in models.items() for c, v in ((e.get("pairwise") or {}).get("by_category") or {}).items()]
    if cats:
        out += ["## Accuracy by category\n",
                _md_table(sorted(cats, key=lambda r: r["category"]), ["category", "model", "n", "lik", "rew"],
                          ["category", "model", "n", "likelihood-ranking accuracy", "reward accuracy"])]
    out += ["## Generation\n",
            _md_table([{"model": k, **(e.get("generation") or {})} for k, e in models.items()],
                      ["model", *GENERATION_KEYS],
                      ["model", "length median (tokens)", "length median (chars)", "unfinished", "repeat", "empty"])]
    if "reply_lengths.png" in names:
        out.append("![reply lengths](reply_lengths.png)\n")
    out.append("## Win rate against the baseline\n")
    if _has_wins(report):
        rows = []
        for k, e in models.items():
            w, lc = e.get("win"), e.get("win_lc") or {}
            if w:
                rows.append({"model": k, "wr": w["win_rate"], "ci": _interval(w.get("ci")),
                             "lc": lc.get("win_rate_lc"), "lc_ci": _interval(lc.get("ci")),
                             "wtl": f"{w['wins']}/{w['ties']}/{w['losses']}", "n": w["n"],
                             "slope": lc.get("slope"), "s": lc.get("scale_tokens")})
        out.append(_md_table(rows, ["model", "wr", "ci", "lc", "lc_ci", "wtl", "n", "slope", "s"],
                             ["model", "win rate", "95% interval", "LC win rate", "95% interval",
                              "wins/ties/losses", "prompts", "LC slope (per s tokens)", "s (tokens)"]))
        method = next((e["win_lc"]["method"] for e in models.values() if e.get("win_lc")), None)
        out.append(f"Ties count half. Intervals: 95% percentile bootstrap over prompts. "
                   f"LC: {method or eval_stats.LC_METHOD}.\n")
        if "win_rates.png" in names:
            out.append("![win rates](win_rates.png)\n")
    elif report.get("reward_model") is None:
        out.append("No reward model was given, so the replies were not scored against the baseline's: "
                   "no win rates and no win_rates.png.\n")
    else:
        out.append("No model other than the baseline has scored replies: no win rates and no win_rates.png.\n")
    return "\n".join(out)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=80, format="png", bbox_inches="tight")  # legends sit outside the axes
    plt.close(fig)
    os.replace(tmp, path)


def _save_rate_plot(fig, ax, path: Path, ylabel: str, legend_size: int) -> None:
    """The finish of a bar plot of rates in [0, 1]: axis, grid, legend beside it, saved."""
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=legend_size, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_by_length(models: dict, path: Path) -> None:
    """Grouped bars per quartile: each model's likelihood-ranking accuracy and, hatched
    beside it, its reward accuracy where it has one."""
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = []
    for i, (k, e) in enumerate(models.items()):
        qs = (e.get("pairwise") or {}).get("by_length", [])
        color = colors[i % len(colors)]
        series.append((f"{k} likelihood", color, "", {q["quartile"]: q["likelihood_ranking_accuracy"] for q in qs}))
        if any(q["reward_accuracy"] is not None for q in qs):
            series.append((f"{k} reward", color, "//", {q["quartile"]: q["reward_accuracy"] for q in qs
                                                         if q["reward_accuracy"] is not None}))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.45 * 4 * len(series)), 3.8))
    width = 0.8 / max(len(series), 1)
    for j, (label, color, hatch, acc) in enumerate(series):
        xs = sorted(acc)
        ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], [acc[x] for x in xs], width, label=label,
               color=color, alpha=0.55 if hatch else 0.9, hatch=hatch, edgecolor="black", linewidth=0.5)
    ax.set_xticks([1, 2, 3, 4], ["Q1 (shortest)", "Q2", "Q3", "Q4 (longest)"])
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("quartile of mean response length")
    _save_rate_plot(fig, ax, path, "held-out accuracy", legend_size=7)


def plot_reply_lengths(models: dict, path: Path) -> None:
    """Overlaid step histograms of each model's reply lengths (tokens), shared bins."""
    import numpy as np

    plt = _pyplot()
    lengths = {k: e.get("reply_lengths") or [] for k, e in models.items()}
    every = [x for v in lengths.values() for x in v]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if every:
        bins = np.histogram_bin_edges(every, bins=min(30, max(1, len(set(every)))))
        for k, v in lengths.items():
            if v:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{k} (median {np.median(v):g})")
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no generated replies", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("reply length (tokens)")
    ax.set_ylabel("replies")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_win_rates(models: dict, path: Path) -> None:
    """Win rate and LC win rate per model with their 95% intervals; 0.5 dashed."""
    plt = _pyplot()
    rows = [(k, e["win"], e.get("win_lc")) for k, e in models.items() if e.get("win")]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 1.3 * len(rows)), 3.8))
    for j, (name, key, off) in enumerate((("win rate", "win_rate", -0.18), ("LC win rate", "win_rate_lc", 0.18))):
        xs, ys, err = [], [], [[], []]
        for i, (_, w, lc) in enumerate(rows):
            src = w if key == "win_rate" else lc
            if src and src.get(key) is not None:
                p, (lo, hi) = src[key], src.get("ci") or (src[key], src[key])
                xs.append(i + off)
                ys.append(p)
                err[0].append(max(p - lo, 0.0))
                err[1].append(max(hi - p, 0.0))
        if xs:
            ax.bar(xs, ys, 0.34, yerr=err, capsize=4, label=name, alpha=0.85, hatch="//" if j else "",
                   edgecolor="black", linewidth=0.5)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), [k for k, _, _ in rows])
    _save_rate_plot(fig, ax, path, "against the baseline", legend_size=8)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out_dir, report: dict) -> dict:
    """report.json (``summary`` and ``verdict`` added where missing), the plots and
    report.md, each written atomically. Returns {"json", "md", "plots"} (paths)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report.setdefault("summary", {k: summary_row(e, k) for k, e in report["models"].items()})
    if not report.get("verdict"):
        report["verdict"] = verdict_of(report)
    plots = [out / PLOTS[0], out / PLOTS[1]]
    plot_accuracy_by_length(report["models"], plots[0])
    plot_reply_lengths(report["models"], plots[1])
    if _has_wins(report):
        plots.append(out / PLOTS[2])
        plot_win_rates(report["models"], plots[2])
    else:
        (out / PLOTS[2]).unlink(missing_ok=True)  # a previous report's, which this one's md disowns
    _write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _write_text(out / "report.md", markdown(report, plots))
    return {"json": str(out / "report.json"), "md": str(out / "report.md"), "plots": [str(p) for p in plots]}
