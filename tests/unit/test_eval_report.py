"""The eval report (simpo_ray.eval_report): report.json with one summary row per model
of exactly the contract's keys and the verdict, report.md with its tables and embedded
plots, real PNG files, and no win-rate plot without a reward model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from simpo_ray import eval_report as R
from simpo_ray import eval_stats as E

PNG = b"\x89PNG\r\n\x1a\n"


def _records(n, p_right, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ct, rt = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        right = rng.random() < p_right
        cs, rs = (-1.0 if right else -3.0) * ct, -2.0 * rt
        out.append({"chosen_sum": cs, "rejected_sum": rs, "chosen_tokens": ct, "rejected_tokens": rt,
                    "ref_chosen_sum": 0.0, "ref_rejected_sum": 0.0,  # DPO ranks by sums
                    "category": ("math", "chat", "code")[i % 3]})
    return out


def _entry(path, loss, p_right, seed, scores=None, base_scores=None):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(10, 200, 24)]
    win = lc = None
    if scores is not None:
        win = E.win_rate(scores, base_scores, resamples=200)
        lc = E.length_controlled_win_rate(scores, base_scores, lengths, [100] * len(lengths), resamples=20)
    return {"path": path, "loss": loss, "pairwise": E.pairwise(_records(40, p_right, seed), loss),
            "generation": {"length_median": float(np.median(lengths)), "length_chars_median": 4.0 * np.median(lengths),
                           "unfinished_rate": 0.125, "repeat_rate": 0.0, "empty_rate": 0.0},
            "reply_lengths": lengths, "win": win, "win_lc": lc, "peak_rss_mb": 812.5, "wall_s": 3.25}


def _report(reward=True):
    rng = np.random.default_rng(7)
    base_scores = rng.normal(0, 1, 24)
    s1 = base_scores + rng.normal(0.5, 1, 24) if reward else None
    s2 = base_scores + rng.normal(0.0, 1, 24) if reward else None
    return {"data": "examples/data/preferences.jsonl", "baseline": "tiny", "n_pairs": 40, "n_prompts": 24,
            "reward_model": "tiny-rm" if reward else None,
            "models": {"baseline": _entry("tiny", None, 0.5, 1),
                       "simpo": _entry("runs/simpo/export", "simpo", 0.9, 2, s1, base_scores),
                       "dpo": _entry("runs/dpo/export", "dpo", 0.7, 3, s2, base_scores)}}


def _is_png(path):
    data = Path(path).read_bytes()
    return len(data) > 100 and data[:8] == PNG


def test_report_json_md_and_plots(tmp_path):
    out = R.write_report(tmp_path / "eval", _report())
    assert [Path(p).name for p in out["plots"]] == ["accuracy_by_length.png", "reply_lengths.png", "win_rates.png"]
    assert all(_is_png(p) for p in out["plots"])
    assert not list((tmp_path / "eval").glob("*.tmp"))
    rep = json.loads(Path(out["json"]).read_text())
    assert set(rep["summary"]) == {"baseline", "simpo", "dpo"}
    for label, row in rep["summary"].items():
        assert set(row) == {"model", *R.SUMMARY_KEYS} and row["model"] == label
    assert rep["summary"]["baseline"]["win_rate"] is None and rep["summary"]["simpo"]["win_rate"] is not None
    assert rep["summary"]["simpo"]["pairwise_accuracy"] == rep["models"]["simpo"]["pairwise"]["pairwise_accuracy"]
    assert rep["verdict"] and rep["verdict"][0].startswith("on held-out pairwise accuracy, simpo ")
    assert any(line.startswith("on win rate against the baseline") for line in rep["verdict"])

    md = Path(out["md"]).read_text()
    assert "| model | " + " | ".join(R.SUMMARY_KEYS) + " |" in md
    assert rep["verdict"][0] in md
    assert "examples/data/preferences.jsonl" in md and "tiny-rm" in md
    assert "## Accuracy by category" in md and "| math |" in md
    assert "LC win rate" in md and "ridge" in md
    for p in out["plots"]:
        assert f"]({Path(p).name})" in md


def test_no_reward_model_no_win_rate_plot(tmp_path):
    R.write_report(tmp_path, _report())  # a previous report with win rates in the same folder
    rep = _report(reward=False)
    for e in rep["models"].values():
        e["pairwise"]["by_category"] = {}  # data without categories
    out = R.write_report(tmp_path, rep)
    assert [Path(p).name for p in out["plots"]] == ["accuracy_by_length.png", "reply_lengths.png"]
    assert all(_is_png(p) for p in out["plots"])
    assert not (tmp_path / "win_rates.png").exists()
    md = Path(out["md"]).read_text()
    assert "win_rates.png)" not in md and "No reward model was given" in md
    assert "## Accuracy by category" not in md
    summary = json.loads(Path(out["json"]).read_text())["summary"]
    assert all(row["win_rate"] is None and row["win_rate_lc"] is None for row in summary.values())


def test_summary_row_and_terminal_table():
    rep = _report()
    row = R.summary_row(rep["models"]["dpo"], "dpo")
    assert list(row) == ["model", *R.SUMMARY_KEYS]
    assert row["length_median"] == rep["models"]["dpo"]["generation"]["length_median"]
    assert row["win_rate_lc"] == rep["models"]["dpo"]["win_lc"]["win_rate_lc"]
    assert R.summary_row({})["pairwise_accuracy"] is None
    text = R.format_summary(rep).splitlines()
    assert text[0].split() == ["model", *R.SUMMARY_KEYS]
    assert [line.split()[0] for line in text[2:]] == ["baseline", "simpo", "dpo"]


def test_importing_eval_report_does_not_import_matplotlib():
    code = ("import sys, simpo_ray.eval_report; "
            "heavy = [m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
