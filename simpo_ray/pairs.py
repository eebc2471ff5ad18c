"""Candidates + scores -> preference rows. Pure functions: no Ray, no models.

Everything is keyed by prompt id and sample index, never by position in a list, so a
response can only ever be paired with the prompt it was generated for (the official
scripts' known bug attached responses to the wrong prompts after a reorder).

Rule (SimPO paper, on-policy data): among the distinct non-empty samples of a prompt,
the best-scored is chosen and the worst-scored rejected. A prompt is dropped, and
counted per reason, when fewer than two distinct non-empty samples are left or when
best and worst tie. Equal scores are broken by the lower sample index, so the result
is a function of the inputs only.
"""

from __future__ import annotations

import math
from collections import Counter

# Reasons a prompt gives no pair (counted per reason).
TOO_FEW = "fewer than 2 non-empty samples"
IDENTICAL = "all samples identical"
TIE = "best and worst tie"
DROP_REASONS = (TOO_FEW, IDENTICAL, TIE)


def distinct_samples(samples: list[dict]) -> tuple[list[dict], int, int]:
    """Non-empty samples with duplicates removed, in sample-index order.

    A sample is a duplicate of an earlier one when its token ids or its text are the
    same (identical text teaches nothing and the data layer refuses it). Returns
    (kept, n_empty, n_duplicate).
    """
    kept, seen_ids, seen_text = [], set(), set()
    n_empty = n_dup = 0
    for s in sorted(samples, key=lambda s: s["sample"]):
        ids, text = tuple(s["token_ids"]), s["text"]
        if not ids or not text.strip():
            n_empty += 1
        elif ids in seen_ids or text in seen_text:
            n_dup += 1
        else:
            seen_ids.add(ids)
            seen_text.add(text)
            kept.append(s)
    return kept, n_empty, n_dup


def pick_pair(samples: list[dict], scores: dict, min_margin: float = 0.0):
    """(chosen sample, rejected sample, None) or (None, None, reason).

    ``samples``: dicts with ``sample`` (index), ``token_ids`` and ``text``;
    ``scores``: {sample index: reward}. Best = highest score, worst = lowest; among
    equal scores the lower sample index wins both ways.
    """
    kept, _, n_dup = distinct_samples(samples)
    if len(kept) < 2:
        return None, None, (IDENTICAL if n_dup and kept else TOO_FEW)
    best = min(kept, key=lambda s: (-scores[s["sample"]], s["sample"]))
    worst = min(kept, key=lambda s: (scores[s["sample"]], s["sample"]))
    if scores[best["sample"]] - scores[worst["sample"]] <= min_margin:
        return None, None, TIE
    return best, worst, None


def _check(pid, samples: list[dict], scores: dict) -> None:
    have = sorted(s["sample"] for s in samples)
    if len(set(have)) != len(have):
        raise ValueError(f"prompt {pid!r}: sample indices repeat: {have}")
    if sorted(scores) != have:
        raise ValueError(f"prompt {pid!r}: scores for samples {sorted(scores)} but samples {have}")
    for k, v in scores.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"prompt {pid!r}: sample {k} has a non-finite score {v!r}")


def build_pairs(prompts: dict, candidates: dict, scores: dict, *, policy: str = "",
                round_index: int = 0, min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """Preference rows in the training format, plus counts.

    prompts: {prompt id: {"prompt": chat messages, "prompt_ids": [int]}}
    candidates: {prompt id: [{"sample", "seed", "token_ids", "text", ...}]}
    scores: {prompt id: {sample index: float}}

    Every prompt id of ``candidates`` must have a prompt and a score for each of its
    samples (else ValueError naming it). Rows come sorted by prompt id, with the
    triplet (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the generated ids as
    they are, never re-tokenized), the text beside them, and provenance: prompt id,
    policy, round, both seeds, both scores, lengths, samples considered.
    Counts: {"prompts", "pairs", "dropped": {reason: n}, "empty_samples",
    "duplicate_samples"}.
    """
    missing = sorted(set(candidates) - set(prompts)) or sorted(set(candidates) ^ set(scores))
    if missing:
        raise ValueError(f"prompt ids without a prompt, samples or scores: {missing[:5]}")
    rows, dropped = [], Counter()
    n_empty = n_dup = 0
    for pid in sorted(candidates):
        samples, sc = candidates[pid], scores[pid]
        _check(pid, samples, sc)
        kept, e, d = distinct_samples(samples)
        n_empty, n_dup = n_empty + e, n_dup + d
        best, worst, reason = pick_pair(samples, sc, min_margin)
        if reason:
            dropped[reason] += 1
            continue
        p = prompts[pid]
        rows.append({
            "prompt_id": str(pid), "prompt": p["prompt"], "prompt_ids": list(p["prompt_ids"]),
            "chosen": best["text"], "rejected": worst["text"],
            "chosen_ids": list(best["token_ids"]), "rejected_ids": list(worst["token_ids"]),
            "chosen_score": float(sc[best["sample"]]), "rejected_score": float(sc[worst["sample"]]),
            "chosen_seed": int(best.get("seed", -1)), "rejected_seed": int(worst.get("seed", -1)),
            "chosen_sample": int(best["sample"]), "rejected_sample": int(worst["sample"]),
            "prompt_len": len(p["prompt_ids"]), "chosen_len": len(best["token_ids"]),
            "rejected_len": len(worst["token_ids"]), "num_distinct": len(kept),
            "policy": policy, "round": int(round_index),
        })
    counts = {"prompts": len(candidates), "pairs": len(rows), "dropped": dict(sorted(dropped.items())),
              "empty_samples": n_empty, "duplicate_samples": n_dup}
    return rows, counts
