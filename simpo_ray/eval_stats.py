"""Held-out evaluation statistics: pure functions of per-pair and per-prompt scores
(numpy only; no torch, no Ray), read by ``simpo-ray eval`` and ``simpo-ray compare``.

Pairwise accuracy, one held-out preference pair at a time (``pairwise``):

- likelihood-ranking accuracy: the share of pairs whose chosen response has the higher
  average log-prob (summed completion log-prob / completion tokens) under the model.
  Ties count as wrong. Every model has it, the baseline included.
- reward accuracy: the share of pairs the method's own implicit reward ranks right, as
  ``simpo_ray.objective.LOSSES`` defines the reward: reference-free losses compare
  averaged (simpo, orpo) or summed (cpo) log-probs; reference losses compare policy
  minus reference, summed (dpo, rdpo) or averaged (ipo). DPO's reward can be right
  where the likelihood ranking is wrong (the reference was already biased towards the
  rejected response). None for sft and unknown losses (no pairwise reward), and None
  when a reference loss's records lack the reference sums.
- ``pairwise_accuracy`` is the reward accuracy where there is one, else the
  likelihood-ranking accuracy; ``pairwise_correct`` is its 0/1 vector, per pair.
- by length: the pairs cut into quartiles of their mean response length
  ((chosen_tokens + rejected_tokens) / 2) at numpy's (linear) quantiles 0.25, 0.5 and
  0.75; a pair at an edge goes to the lower quartile, empty quartiles are left out.

Win rate against the baseline, one prompt at a time (``win_rate``): the reward model's
score of the model's reply against its score of the baseline's reply to the same
prompt: 1 a win, 0.5 a tie, 0 a loss; the win rate is their mean.

Length-controlled win rate (``length_controlled_win_rate``), the idea of
length-controlled AlpacaEval simplified to the length term alone (no model or
instruction terms): the outcomes (fractional labels 1 / 0.5 / 0, cross-entropy) are
fitted as p = sigmoid(a + b x), x = (model length - baseline length) / s, s the
standard deviation (ddof 0) of the length differences (1 when it is 0), by Newton's
method (IRLS) with a ridge penalty ``RIDGE`` * (a^2 + b^2) / 2 on the total
log-likelihood, which keeps all-win and length-separable data finite and fades as the
number of prompts grows. ``win_rate_lc`` = sigmoid(a): the win rate predicted at zero
length difference.

Intervals (``win_rate``, ``length_controlled_win_rate``, ``paired_difference``,
``verdict``) are 95% percentile bootstraps over items (pairs or prompts): resample the
item indices with replacement (``numpy.random.default_rng(seed)``, seed 0 by default),
recompute the statistic, take the 2.5th and 97.5th percentiles. 1000 resamples (200 for
the LC win rate, which refits per resample). A difference of two methods resamples the
indices once for both (a paired bootstrap: the same items on both sides).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from simpo_ray.objective import LOSSES

RIDGE = 0.1
LC_METHOD = ("logistic fit of outcome (win 1, tie 0.5, loss 0) on length difference / its std, "
             f"Newton/IRLS, ridge {RIDGE} on intercept and slope; LC = sigmoid(intercept), the win rate "
             "at zero length difference (length-controlled AlpacaEval reduced to length)")
_CHUNK = 2_000_000  # bootstrap index elements drawn at a time (bounded memory)


def _avg(total: float, tokens: int, what: str) -> float:
    if not tokens or tokens <= 0:
        raise ValueError(f"{what} must be a positive token count, got {tokens!r}")
    return total / tokens


def likelihood_correct(rec: dict) -> bool:
    """Chosen average log-prob (sum / tokens) above the rejected one."""
    return bool(_avg(rec["chosen_sum"], rec["chosen_tokens"], "chosen_tokens")
                > _avg(rec["rejected_sum"], rec["rejected_tokens"], "rejected_tokens"))


def reward_correct(rec: dict, loss: Optional[str]) -> Optional[bool]:
    """Whether the loss's implicit reward ranks chosen above rejected; None without a
    pairwise reward (loss None, unknown or sft) or without the reference sums a
    reference loss needs."""
    spec = LOSSES.get(loss) if loss else None
    if spec is None or spec.rows != "pairs":
        return None
    c, r = rec["chosen_sum"], rec["rejected_sum"]
    if spec.needs_reference:
        rc, rr = rec.get("ref_chosen_sum"), rec.get("ref_rejected_sum")
        if rc is None or rr is None:
            return None
        c, r = c - rc, r - rr
    if spec.logps == "average":
        c, r = _avg(c, rec["chosen_tokens"], "chosen_tokens"), _avg(r, rec["rejected_tokens"], "rejected_tokens")
    return bool(c > r)


def _accuracies(lik: np.ndarray, rew: Optional[np.ndarray], mask: np.ndarray) -> dict:
    n = int(mask.sum())
    return {"n": n, "likelihood_ranking_accuracy": float(lik[mask].mean()),
            "reward_accuracy": float(rew[mask].mean()) if rew is not None else None}


def pairwise(records: list, loss: Optional[str]) -> dict:
    """Accuracies of one model on held-out pairs, overall, by length quartile and by
    category (module docstring). ``records``: see ``likelihood_correct``; ``loss``: the
    model's training loss (None for the baseline)."""
    if not records:
        raise ValueError("pairwise: no records (no held-out pairs were scored)")
    lik = np.array([likelihood_correct(r) for r in records], dtype=float)
    rewards = [reward_correct(r, loss) for r in records]
    rew = None if any(x is None for x in rewards) else np.array(rewards, dtype=float)
    everything = np.ones(len(records), dtype=bool)
    overall = _accuracies(lik, rew, everything)
    correct = rew if rew is not None else lik
    lengths = np.array([(r["chosen_tokens"] + r["rejected_tokens"]) / 2 for r in records], dtype=float)
    edges = np.quantile(lengths, [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, lengths, side="left") + 1  # 1..4; an edge value goes below
    by_length = []
    for q in range(1, 5):
        mask = quartile == q
        if mask.any():
            lo, hi = float(lengths[mask].min()), float(lengths[mask].max())
            by_length.append({"quartile": q, "tokens": [lo, hi], **_accuracies(lik, rew, mask)})
    cats = np.array([str(r.get("category")) if r.get("category") is not None else "" for r in records])
    by_category = {}
    if any(r.get("category") is not None for r in records):
        for c in sorted(set(cats.tolist())):
            by_category[c or "(none)"] = _accuracies(lik, rew, cats == c)
    return {"n": overall["n"], "likelihood_ranking_accuracy": overall["likelihood_ranking_accuracy"],
            "reward_accuracy": overall["reward_accuracy"],
            "pairwise_accuracy": overall["reward_accuracy"] if rew is not None
            else overall["likelihood_ranking_accuracy"],
            "pairwise_metric": "reward" if rew is not None else "likelihood",
            "pairwise_correct": [int(x) for x in correct],
            "by_length": by_length, "by_category": by_category}


def _vector(x, what: str) -> np.ndarray:
    v = np.asarray(x, dtype=float).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{what}: empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: {int((~np.isfinite(v)).sum())} non-finite value(s)")
    return v


def _same_length(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: {a.size} against {b.size} items; both must score the same items")


def _indices(rng: np.random.Generator, n: int, resamples: int):
    """Bootstrap index matrices (rows of n indices drawn with replacement), in chunks."""
    rows = max(1, _CHUNK // n)
    for start in range(0, resamples, rows):
        yield rng.integers(0, n, size=(min(rows, resamples - start), n))


def _interval(values: np.ndarray) -> list:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _boot_mean_diff(a: np.ndarray, b: Optional[np.ndarray], seed: int, resamples: int) -> list:
    """95% percentile interval of mean(a) - mean(b) (mean(a) when b is None), paired."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    stats = []
    for idx in _indices(rng, a.size, resamples):
        stats.append(a[idx].mean(axis=1) - (b[idx].mean(axis=1) if b is not None else 0.0))
    return _interval(np.concatenate(stats))


def outcomes_of(model_scores, base_scores) -> np.ndarray:
    """Per prompt: 1 (model's reply scored higher), 0.5 (equal), 0 (lower)."""
    m, b = _vector(model_scores, "model scores"), _vector(base_scores, "baseline scores")
    _same_length(m, b, "win rate")
    return np.where(m > b, 1.0, np.where(m == b, 0.5, 0.0))


def win_rate(model_scores, base_scores, seed: int = 0, resamples: int = 1000) -> dict:
    """Win rate against the baseline, ties half, with a bootstrap interval over prompts."""
    out = outcomes_of(model_scores, base_scores)
    return {"win_rate": float(out.mean()), "ci": _boot_mean_diff(out, None, seed, resamples), "n": int(out.size),
            "wins": int((out == 1).sum()), "ties": int((out == 0.5).sum()), "losses": int((out == 0).sum()),
            "outcomes": out.tolist()}


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact form, no overflow


def _penalized_loglik(w, X, y, ridge):
    z = X @ w
    # y log p + (1 - y) log(1 - p) = y z - log(1 + e^z)
    return float((y * z - np.logaddexp(0.0, z)).sum() - 0.5 * ridge * (w @ w))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE, iters: int = 100) -> tuple:
    """(a, b) maximizing sum(y log p + (1-y) log(1-p)) - ridge (a^2 + b^2) / 2 for
    p = sigmoid(a + b x), y in [0, 1]: Newton steps with step halving (the objective is
    strictly concave, so this converges from 0)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    obj = _penalized_loglik(w, X, y, ridge)
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = w + t * step
            new = _penalized_loglik(cand, X, y, ridge)
            if new >= obj - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        w, obj = cand, new
        if np.abs(t * step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(model_scores, base_scores, model_lengths, base_lengths,
                               seed: int = 0, resamples: int = 200) -> dict:
    """The win rate at zero length difference (module docstring), with a bootstrap
    interval over prompts that refits each resample (x keeps the full data's scale s)."""
    out = outcomes_of(model_scores, base_scores)
    ml, bl = _vector(model_lengths, "model lengths"), _vector(base_lengths, "baseline lengths")
    _same_length(ml, bl, "length-controlled win rate")
    _same_length(out, ml, "length-controlled win rate (scores against lengths)")
    d = ml - bl
    s = float(d.std()) or 1.0
    x = d / s
    a, b = fit_logistic(x, out)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    lcs = [float(_sigmoid(fit_logistic(x[i], out[i])[0])) for idx in _indices(rng, out.size, resamples) for i in idx]
    return {"win_rate_lc": float(_sigmoid(a)), "ci": _interval(np.array(lcs)), "slope": b, "scale_tokens": s,
            "n": int(out.size), "method": LC_METHOD}


def paired_difference(a, b, seed: int = 0, resamples: int = 1000) -> dict:
    """mean(a) - mean(b) over the same items, with a 95% paired percentile bootstrap
    interval (the item indices resampled once for both)."""
    va, vb = _vector(a, "paired difference (a)"), _vector(b, "paired difference (b)")
    _same_length(va, vb, "paired difference")
    return {"diff": float(va.mean() - vb.mean()), "ci": _boot_mean_diff(va, vb, seed, resamples),
            "n": int(va.size), "mean_a": float(va.mean()), "mean_b": float(vb.mean())}


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _compare(what: str, noun: str, vectors: dict, seed: int) -> list:
    """Lines comparing the best of ``vectors`` (label -> per-item scores) with the
    runner-up, or stating the one method's numbers."""
    ranked = sorted(vectors, key=lambda k: -float(np.mean(vectors[k])))  # stable: input order breaks ties
    if len(ranked) == 1:
        (label,) = ranked
        v = _vector(vectors[label], what)
        lo, hi = _boot_mean_diff(v, None, seed, 1000)
        return [f"on {what}, {label}: {100 * v.mean():.1f}% (95% interval [{100 * lo:.1f}, {100 * hi:.1f}]) "
                f"over {v.size} {noun}"]
    best, second = ranked[0], ranked[1]
    d = paired_difference(vectors[best], vectors[second], seed=seed)
    lo, hi = d["ci"]
    nums = f"{_pts(d['diff'])} points (95% interval [{_pts(lo)}, {_pts(hi)}])"
    detail = f"{100 * d['mean_a']:.1f}% against {100 * d['mean_b']:.1f}% over the same {d['n']} {noun}"
    if lo <= 0.0 <= hi:
        return [f"on {what}, no clear winner: {best} leads {second} by {nums}, an interval that includes 0; {detail}"]
    return [f"on {what}, {best} wins over {second} by {nums}; {detail}"]


def verdict(methods: dict, seed: int = 0) -> list:
    """Human lines: the best method against the runner-up on held-out pairwise accuracy
    and, where at least two methods have win outcomes, on win rate against the baseline
    (paired bootstraps over the same pairs / prompts). ``methods``: label ->
    {"pairwise_correct": [0/1, ...], "outcomes": [1/0.5/0, ...] or None}."""
    if not methods:
        raise ValueError("verdict: no methods")
    correct = {k: m["pairwise_correct"] for k, m in methods.items()}
    lines = _compare("held-out pairwise accuracy", "pairs", correct, seed)
    wins = {k: m["outcomes"] for k, m in methods.items() if m.get("outcomes") is not None}
    if wins:
        lines += _compare("win rate against the baseline", "prompts", wins, seed)
    return lines
