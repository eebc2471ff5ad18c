"""`simpo-ray compare` end to end on CPU: SimPO and DPO trained from the same tiny start on
the bundled data (the data tokenized once, DPO's reference pass once), then evaluated
against the starting model: held-out pairs through the reference pass, greedy replies from
vLLM generator actors, wins from the tiny reward model's scorer actors, and one report.
Then `simpo-ray eval` on one run folder alone: no baseline, no reward model."""

import json
import os

import pytest

from simpo_ray.cli import main
from simpo_ray.eval_report import SUMMARY_KEYS
from tests.integration.conftest import TINY_CPU, TINY

pytestmark = pytest.mark.slow

PROMPTS, TOKENS = 8, 16


def test_compare_simpo_and_dpo_then_eval_one_run(ray_local, tmp_path, capsys):
    rc = main(["compare", TINY_CPU, f"output.root={tmp_path}", "output.name=cmp", *TINY, "train.max_steps=3",
               "train.checkpoint_every=100", "output.trackers=[mlflow]", "--losses", "simpo,dpo", "--prompts", str(PROMPTS),
               "--max-tokens", str(TOKENS)])
    assert rc == 0
    folder = tmp_path / "cmp-compare"
    out = capsys.readouterr().out
    report = json.loads((folder / "report.json").read_text())
    assert set(report["models"]) == {"baseline", "simpo", "dpo"}
    assert report["n_prompts"] == PROMPTS and report["n_pairs"] > 0
    # every row of the held-out split, and nothing else (the training runs' eval pairs)
    heldout = (folder / "heldout.jsonl").read_text().splitlines()
    assert len(heldout) == report["n_pairs"]
    eval_pairs = json.loads((folder / "simpo" / "summary.json").read_text())["data"]["eval_pairs"]
    assert report["n_pairs"] == eval_pairs
    for method, beta in (("simpo", 2.5), ("dpo", 0.1)):  # the config's own beta; DPO's recipe beta
        row = report["summary"][method]
        assert set(row) == {"model", *SUMMARY_KEYS}
        assert all(row[k] is not None for k in SUMMARY_KEYS), row
        assert 0 <= row["win_rate"] <= 1 and 0 < row["win_rate_lc"] < 1
        assert row["peak_rss_mb"] > 0 and row["wall_s"] > 0
        cfg_text = (folder / method / "config.yaml").read_text()
        assert f"loss: {method}" in cfg_text and f"beta: {beta}" in cfg_text
        pw = report["models"][method]["pairwise"]
        assert len(pw["pairwise_correct"]) == report["n_pairs"]
        assert sum(q["n"] for q in pw["by_length"]) == report["n_pairs"]
    # DPO's reward is its log-ratio against the starting model: the same model scores 0 on
    # both responses, so the baseline has no reward accuracy, only likelihood ranking
    assert report["models"]["baseline"]["pairwise"]["reward_accuracy"] is None
    assert report["models"]["baseline"]["win"] is None
    # SimPO's reward is its average log-prob: reward accuracy == likelihood ranking
    s = report["models"]["simpo"]["pairwise"]
    assert s["reward_accuracy"] == s["likelihood_ranking_accuracy"]
    for name in ("report.md", "accuracy_by_length.png", "reply_lengths.png", "win_rates.png"):
        assert (folder / name).stat().st_size > 0, name
    md = (folder / "report.md").read_text()
    assert "| simpo" in md and "| dpo" in md and report["verdict"][0] in md
    gens = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 * PROMPTS and all(g["tokens"] <= TOKENS for g in gens)
    assert all(isinstance(g["reward"], float) for g in gens)
    assert "randomly initialised" in out and report["verdict"][0] in out

    # one tracker run per method, grouped under the compare folder
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((folder / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("cmp-compare").experiment_id])
    assert sorted((r.info.run_name, r.data.tags["method"]) for r in runs) == [("dpo", "dpo"), ("simpo", "simpo")]

    # eval alone, on a run folder: its model/, its method from the card, its run's memory
    rc = main(["eval", str(folder / "simpo"), "--data", str(folder / "heldout.jsonl"), "--prompts", "4",
               "--max-tokens", "8", "--backend", "transformers", "--out", str(tmp_path / "ev")])
    assert rc == 0
    one = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert list(one["models"]) == ["simpo"] and one["models"]["simpo"]["loss"] == "simpo"
    assert one["summary"]["simpo"]["win_rate"] is None and one["summary"]["simpo"]["peak_rss_mb"] > 0
    assert one["models"]["simpo"]["pairwise"]["pairwise_correct"] == s["pairwise_correct"]
    assert not os.path.exists(tmp_path / "ev" / "win_rates.png")
