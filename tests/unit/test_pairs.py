"""Pairing rules as pure functions: best/worst, ties, identical and empty samples, keys."""

import random

import pytest

from simpo_ray.pairs import IDENTICAL, TIE, TOO_FEW, build_pairs, distinct_samples, pick_pair


def s(j, ids, text=None, seed=None):
    return {"sample": j, "token_ids": list(ids), "text": text if text is not None else f"t{ids}",
            "seed": 100 + j if seed is None else seed, "finish_reason": "stop"}


def test_best_is_chosen_and_worst_rejected():
    samples = [s(0, [1]), s(1, [2]), s(2, [3]), s(3, [4])]
    best, worst, reason = pick_pair(samples, {0: 0.1, 1: 2.0, 2: -3.0, 3: 0.5})
    assert reason is None and best["sample"] == 1 and worst["sample"] == 2


def test_equal_scores_break_by_lower_sample_index_both_ways():
    samples = [s(0, [1]), s(1, [2]), s(2, [3]), s(3, [4])]
    best, worst, _ = pick_pair(samples, {0: 1.0, 1: 5.0, 2: 5.0, 3: 1.0})
    assert (best["sample"], worst["sample"]) == (1, 0)


def test_a_tie_between_best_and_worst_is_dropped():
    samples = [s(0, [1]), s(1, [2]), s(2, [3])]
    assert pick_pair(samples, {0: 0.7, 1: 0.7, 2: 0.7}) == (None, None, TIE)
    # a margin below min_margin counts as a tie too
    assert pick_pair(samples, {0: 0.7, 1: 0.75, 2: 0.7}, min_margin=0.1)[2] == TIE
    assert pick_pair(samples, {0: 0.7, 1: 0.75, 2: 0.7})[2] is None


def test_identical_samples_are_dropped():
    # same ids, or same text with different ids: one distinct sample is no pair
    assert pick_pair([s(0, [5, 6]), s(1, [5, 6]), s(2, [5, 6])], {0: 1, 1: 2, 2: 3})[2] == IDENTICAL
    assert pick_pair([s(0, [5], "a"), s(1, [6], "a")], {0: 1.0, 1: 2.0})[2] == IDENTICAL


def test_duplicates_never_become_chosen_and_rejected():
    # samples 0 and 2 are the same response scored differently (batch numerics): the pair
    # must not be that response against itself
    samples = [s(0, [1, 2]), s(1, [3]), s(2, [1, 2])]
    best, worst, reason = pick_pair(samples, {0: 1.0, 1: 0.5, 2: -1.0})
    assert reason is None and (best["sample"], worst["sample"]) == (0, 1)


def test_empty_samples_are_skipped_and_counted():
    samples = [s(0, [], ""), s(1, [7], "   "), s(2, [8], "x"), s(3, [9], "y")]
    kept, n_empty, n_dup = distinct_samples(samples)
    assert [k["sample"] for k in kept] == [2, 3] and n_empty == 2 and n_dup == 0
    assert pick_pair(samples[:3], {0: 9.0, 1: 9.0, 2: 0.0})[2] == TOO_FEW


def _inputs(n_prompts=12, n_samples=4, seed=0):
    rng = random.Random(seed)
    prompts, cands, scores = {}, {}, {}
    for i in range(n_prompts):
        pid = f"p{i:03d}"
        prompts[pid] = {"prompt": [{"role": "user", "content": f"q{i}"}], "prompt_ids": [1, 3, 10 + i]}
        cands[pid] = [s(j, [i, j, rng.randrange(50)], f"answer {i}-{j}") for j in range(n_samples)]
        scores[pid] = {j: rng.uniform(-1, 1) for j in range(n_samples)}
    return prompts, cands, scores


def test_rows_carry_ids_text_and_provenance():
    prompts, cands, scores = _inputs()
    rows, counts = build_pairs(prompts, cands, scores, policy="/m/round1", round_index=2)
    assert counts == {"prompts": 12, "pairs": 12, "dropped": {}, "empty_samples": 0, "duplicate_samples": 0}
    for r in rows:
        pid = r["prompt_id"]
        by = {c["sample"]: c for c in cands[pid]}
        assert r["prompt_ids"] == prompts[pid]["prompt_ids"] and r["prompt"] == prompts[pid]["prompt"]
        assert r["chosen_ids"] == by[r["chosen_sample"]]["token_ids"]
        assert r["rejected"] == by[r["rejected_sample"]]["text"]
        assert r["chosen_score"] == max(scores[pid].values()) and r["rejected_score"] == min(scores[pid].values())
        assert r["chosen_seed"] == 100 + r["chosen_sample"] and r["chosen_len"] == 3
        assert r["policy"] == "/m/round1" and r["round"] == 2 and r["num_distinct"] == 4
    assert [r["prompt_id"] for r in rows] == sorted(prompts)


def test_pairs_depend_on_keys_not_on_positions():
    """Shuffled prompts, shuffled samples, shuffled score dicts (what several actors
    finishing in any order produce): exactly the same rows."""
    prompts, cands, scores = _inputs(n_prompts=30, n_samples=5)
    ref, _ = build_pairs(prompts, cands, scores)
    rng = random.Random(1)
    for _ in range(5):
        keys = list(cands)
        rng.shuffle(keys)
        c2 = {k: rng.sample(cands[k], len(cands[k])) for k in keys}
        s2 = {k: dict(rng.sample(list(scores[k].items()), len(scores[k]))) for k in reversed(keys)}
        p2 = {k: prompts[k] for k in rng.sample(list(prompts), len(prompts))}
        assert build_pairs(p2, c2, s2)[0] == ref


def test_drops_are_counted_per_reason():
    prompts, cands, scores = _inputs(n_prompts=5, n_samples=3)
    cands["p000"] = [s(j, [4, 4], "same") for j in range(3)]          # identical
    scores["p001"] = {0: 0.2, 1: 0.2, 2: 0.2}                          # tie
    cands["p002"] = [s(0, [], ""), s(1, [], ""), s(2, [9], "only")]    # too few
    rows, counts = build_pairs(prompts, cands, scores)
    assert counts["pairs"] == 2 and len(rows) == 2
    assert counts["dropped"] == {IDENTICAL: 1, TIE: 1, TOO_FEW: 1}
    assert counts["empty_samples"] == 2 and counts["duplicate_samples"] == 2


@pytest.mark.parametrize("broken", ["missing prompt", "missing score", "extra score", "nan", "repeated"])
def test_inconsistent_inputs_are_refused(broken):
    prompts, cands, scores = _inputs(n_prompts=3)
    if broken == "missing prompt":
        del prompts["p001"]
    elif broken == "missing score":
        del scores["p002"][1]
    elif broken == "extra score":
        scores["p002"][7] = 0.0
    elif broken == "nan":
        scores["p000"][0] = float("nan")
    else:
        cands["p000"][1]["sample"] = 0
    with pytest.raises(ValueError, match="p00"):
        build_pairs(prompts, cands, scores)
