"""Held-out evaluation statistics (simpo_ray.eval_stats): likelihood against implicit
reward correctness per loss, length quartiles and categories, win rates with ties half,
the length-controlled win rate, paired bootstrap differences and the verdict lines."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simpo_ray import eval_stats as E


def _rec(cs, rs, ct=10, rt=10, rcs=None, rrs=None, category=None):
    return {"chosen_sum": cs, "rejected_sum": rs, "chosen_tokens": ct, "rejected_tokens": rt,
            "ref_chosen_sum": rcs, "ref_rejected_sum": rrs, "category": category}


def test_simpo_and_orpo_rank_by_average_cpo_by_sum():
    # chosen: -10 over 10 tokens (avg -1.0); rejected: -15 over 20 tokens (avg -0.75)
    r = _rec(-10.0, -15.0, ct=10, rt=20)
    assert E.likelihood_correct(r) is False
    assert E.reward_correct(r, "simpo") is False and E.reward_correct(r, "orpo") is False
    assert E.reward_correct(r, "cpo") is True  # summed: -10 > -15
    flipped = _rec(-15.0, -10.0, ct=20, rt=10)
    assert E.likelihood_correct(flipped) and E.reward_correct(flipped, "simpo") and not E.reward_correct(flipped, "cpo")


def test_dpo_reward_is_right_where_the_likelihood_ranking_is_wrong():
    # The reference already prefers the rejected response strongly (-20 against -11);
    # the policy moved chosen up by 8 and rejected up by 1: the reward says chosen,
    # the likelihood (avg -1.2 against -1.0) says rejected.
    r = _rec(-12.0, -10.0, ct=10, rt=10, rcs=-20.0, rrs=-11.0)
    assert E.likelihood_correct(r) is False
    assert E.reward_correct(r, "dpo") is True and E.reward_correct(r, "rdpo") is True
    assert E.reward_correct(r, "ipo") is True  # 8/10 = 0.8 > 1/10 = 0.1


def test_ipo_averages_the_reference_margin_dpo_sums_it():
    # policy - reference: chosen +8 over 40 tokens (0.2/token), rejected +2 over 5 (0.4/token)
    r = _rec(-12.0, -10.0, ct=40, rt=5, rcs=-20.0, rrs=-12.0)
    assert E.reward_correct(r, "dpo") is True  # 8 > 2
    assert E.reward_correct(r, "ipo") is False  # 0.2 < 0.4


def test_no_reward_for_sft_the_baseline_unknown_losses_or_missing_reference():
    r = _rec(-1.0, -2.0)
    assert E.reward_correct(r, "sft") is None and E.reward_correct(r, None) is None
    assert E.reward_correct(r, "nonsense") is None
    assert E.reward_correct(r, "dpo") is None and E.reward_correct(r, "ipo") is None  # no ref sums
    with pytest.raises(ValueError, match="chosen_tokens"):
        E.likelihood_correct(_rec(-1.0, -2.0, ct=0))


def _quartile_set():
    """8 pairs of mean lengths 1..8 (chosen = rejected tokens), given out of order.
    likelihood right: lengths 1, 3, 4, 7; DPO reward right: 1, 2, 4, 5."""
    lik = {1: 1, 2: 0, 3: 1, 4: 1, 5: 0, 6: 0, 7: 1, 8: 0}
    rew = {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0, 7: 0, 8: 0}
    recs = []
    for n in (5, 2, 8, 1, 7, 3, 6, 4):
        cs, rs = (-1.0 * n if lik[n] else -3.0 * n), -2.0 * n
        rcs = cs - rs - 1 if rew[n] else cs - rs + 1  # chosen margin rs + 1 or rs - 1 against rejected rs
        recs.append(_rec(cs, rs, ct=n, rt=n, rcs=rcs, rrs=0.0, category="even" if n % 2 == 0 else "odd"))
    return recs, lik, rew


def test_quartiles_of_mean_length_accuracies_by_hand():
    recs, lik, rew = _quartile_set()
    out = E.pairwise(recs, "dpo")
    assert out["n"] == 8
    assert out["likelihood_ranking_accuracy"] == 0.5 and out["reward_accuracy"] == 0.5
    assert out["pairwise_accuracy"] == out["reward_accuracy"] and out["pairwise_metric"] == "reward"
    order = (5, 2, 8, 1, 7, 3, 6, 4)
    assert out["pairwise_correct"] == [rew[n] for n in order]  # input order, the reward's vector
    q = out["by_length"]
    assert [x["quartile"] for x in q] == [1, 2, 3, 4] and sum(x["n"] for x in q) == 8
    assert [x["tokens"] for x in q] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert [x["likelihood_ranking_accuracy"] for x in q] == [0.5, 1.0, 0.0, 0.5]
    assert [x["reward_accuracy"] for x in q] == [1.0, 0.5, 0.5, 0.0]


def test_the_baseline_is_judged_by_likelihood_and_few_lengths_leave_quartiles_empty():
    recs = [_rec(-1.0, -2.0, ct=10, rt=10), _rec(-3.0, -2.0, ct=10, rt=10), _rec(-1.0, -2.0, ct=10, rt=10),
            _rec(-1.0, -2.0, ct=10, rt=10), _rec(-90.0, -20.0, ct=30, rt=10)]  # -3.0 against -2.0
    out = E.pairwise(recs, None)
    assert out["reward_accuracy"] is None and out["pairwise_metric"] == "likelihood"
    assert out["pairwise_accuracy"] == out["likelihood_ranking_accuracy"] == 0.6
    assert out["pairwise_correct"] == [1, 0, 1, 1, 0]
    q = out["by_length"]
    assert [(x["quartile"], x["n"], x["tokens"]) for x in q] == [(1, 4, [10, 10]), (4, 1, [20, 20])]
    assert q[0]["likelihood_ranking_accuracy"] == 0.75 and q[0]["reward_accuracy"] is None
    assert out["by_category"] == {}


def test_categories():
    recs, _, _ = _quartile_set()
    cats = E.pairwise(recs, "dpo")["by_category"]
    assert set(cats) == {"even", "odd"}
    # odd lengths 1, 3, 5, 7: likelihood right at 1, 3, 7; reward right at 1, 5
    assert cats["odd"] == {"n": 4, "likelihood_ranking_accuracy": 0.75, "reward_accuracy": 0.5}
    assert cats["even"] == {"n": 4, "likelihood_ranking_accuracy": 0.25, "reward_accuracy": 0.5}


def test_no_records_is_an_error():
    with pytest.raises(ValueError, match="no records"):
        E.pairwise([], "simpo")


def test_win_rate_counts_ties_half_and_its_interval_is_seeded():
    w = E.win_rate([3.0, 3.0, 3.0, 1.0, 0.0], [1.0] * 5)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (3, 1, 1, 5)
    assert w["win_rate"] == pytest.approx(0.7) and w["outcomes"] == [1.0, 1.0, 1.0, 0.5, 0.0]
    lo, hi = w["ci"]
    assert 0.0 <= lo <= 0.7 <= hi <= 1.0 and lo < hi
    assert E.win_rate([3.0, 3.0, 3.0, 1.0, 0.0], [1.0] * 5)["ci"] == w["ci"]
    with pytest.raises(ValueError, match="same items"):
        E.win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        E.win_rate([], [])
    with pytest.raises(ValueError, match="non-finite"):
        E.win_rate([float("nan")], [1.0])


def test_lc_win_rate_removes_a_win_that_is_only_length():
    # The model wins exactly when its reply is longer: longer on 8 of 10 prompts, the
    # differences around 0 symmetric (+-10 tokens either side of the boundary).
    d = np.array([10, 20, 30, 40, 50, 60, 70, 80, -10, -20] * 3, dtype=float)
    base = np.full(d.size, 100.0)
    model_scores = (d > 0).astype(float)
    raw = E.win_rate(model_scores, np.full(d.size, 0.5))["win_rate"]
    lc = E.length_controlled_win_rate(model_scores, np.full(d.size, 0.5), base + d, base)
    assert raw == 0.8
    assert abs(lc["win_rate_lc"] - 0.5) < 0.1
    assert lc["slope"] > 1.0 and lc["scale_tokens"] == pytest.approx(d.std())
    assert lc["ci"][0] <= lc["win_rate_lc"] <= lc["ci"][1]
    assert "ridge" in lc["method"] and str(E.RIDGE) in lc["method"]


def test_lc_win_rate_matches_the_raw_one_when_wins_ignore_length():
    rng = np.random.default_rng(1)
    n = 300
    d = rng.normal(0.0, 50.0, n)
    wins = (rng.random(n) < 0.7).astype(float)
    raw = E.win_rate(wins, np.full(n, 0.5))["win_rate"]
    lc = E.length_controlled_win_rate(wins, np.full(n, 0.5), 200 + d, np.full(n, 200.0), resamples=50)
    assert abs(lc["win_rate_lc"] - raw) < 0.03
    assert abs(lc["slope"]) < 0.3


def test_lc_win_rate_stays_finite_for_all_wins_and_is_deterministic():
    args = ([1.0] * 20, [0.0] * 20, [50 + i for i in range(20)], [50] * 20)
    lc = E.length_controlled_win_rate(*args)
    assert 0.9 < lc["win_rate_lc"] < 1.0 and np.isfinite(lc["slope"])
    assert all(0.5 < x < 1.0 for x in lc["ci"])
    assert E.length_controlled_win_rate(*args) == lc
    same = E.length_controlled_win_rate([1.0] * 10, [0.0] * 10, [7] * 10, [7] * 10)  # no length difference
    assert same["scale_tokens"] == 1.0 and same["slope"] == 0.0 and 0.9 < same["win_rate_lc"] < 1.0
    # x = 0 everywhere: the penalized fit's intercept solves n (1 - sigmoid(a)) = ridge a
    p = same["win_rate_lc"]
    assert 10 * (1 - p) == pytest.approx(E.RIDGE * np.log(p / (1 - p)), rel=1e-6)


def test_paired_difference():
    v = [1, 0, 1, 1, 0, 1]
    same = E.paired_difference(v, v)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0]
    assert E.paired_difference([1] * 6, [0] * 6)["ci"] == [1.0, 1.0]
    d = E.paired_difference([1, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 1, 1], seed=3)
    assert d["diff"] == pytest.approx(0.25) and d["ci"][0] >= 0.0  # a never trails b on any item
    assert d == E.paired_difference([1, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 1, 1], seed=3)
    with pytest.raises(ValueError, match="same items"):
        E.paired_difference([1, 0], [1])


def test_verdict_names_the_winner_and_its_interval():
    rng = np.random.default_rng(0)
    strong, weak = (rng.random(200) < 0.8).astype(int), (rng.random(200) < 0.5).astype(int)
    lines = E.verdict({"weak": {"pairwise_correct": weak.tolist(), "outcomes": None},
                       "strong": {"pairwise_correct": strong.tolist(), "outcomes": None}})
    assert len(lines) == 1
    assert lines[0].startswith("on held-out pairwise accuracy, strong wins over weak by +")
    assert "points (95% interval [+" in lines[0] and "no clear winner" not in lines[0]


def test_verdict_without_a_clear_winner_still_gives_the_numbers():
    a = [1, 0] * 50
    b = [0, 1] * 50
    b[0] = 1  # b leads by one pair in a hundred
    lines = E.verdict({"a": {"pairwise_correct": a, "outcomes": [1.0, 0.0, 0.5, 1.0]},
                       "b": {"pairwise_correct": b, "outcomes": [1.0, 1.0, 1.0, 1.0]}})
    assert "no clear winner: b leads a by +1.0 points (95% interval [" in lines[0] and "includes 0" in lines[0]
    assert lines[1].startswith("on win rate against the baseline, ") and "b" in lines[1]
    assert "95% interval" in lines[1]


def test_verdict_of_one_method_states_its_numbers():
    lines = E.verdict({"simpo": {"pairwise_correct": [1, 1, 1, 0], "outcomes": [1.0, 0.5]}})
    assert len(lines) == 2
    assert "simpo: 75.0%" in lines[0] and "over 4 pairs" in lines[0]
    assert "simpo: 75.0%" in lines[1] and "win rate" in lines[1]
    with pytest.raises(ValueError, match="no methods"):
        E.verdict({})


def test_importing_eval_stats_stays_light():
    code = ("import sys, simpo_ray.eval_stats; "
            "heavy = [m for m in ('torch', 'ray', 'matplotlib', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
