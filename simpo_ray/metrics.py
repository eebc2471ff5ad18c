"""The one place logged metrics are made: same keys in training, eval, Tune and files.

A step's micro-batches add per-pair sums into a ``Sums`` (a dict of floats); the
worker all-reduces it across ranks; ``to_metrics`` turns sums into means. Keys:
``loss``, ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``,
``logps/accuracies`` (likelihood ranking), ``lengths/{chosen,rejected}``,
``margin_reached``; eval the same under ``eval/``. ``sys/rss_mb``: the largest
worker's resident memory (MiB) at the report, to see a leak over a long run.
"""

from __future__ import annotations

import json
from pathlib import Path

PAIR_KEYS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "logps/accuracies", "lengths/chosen", "lengths/rejected", "margin_reached",
)


def pair_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps,
              chosen_len, rejected_len, gamma: float) -> dict:
    """Per-pair tensors of shape (B,) -> sums over the batch (floats) plus ``pairs``.

    ``margin_reached``: share of pairs whose reward gap is at least the target margin
    gamma (the SimPO objective is "satisfied" there; loss <= ln 2 when z >= 0).
    """
    margins = (chosen_rewards - rejected_rewards).detach().float()
    vals = {
        "loss": losses.detach().float(),
        "rewards/chosen": chosen_rewards.detach().float(),
        "rewards/rejected": rejected_rewards.detach().float(),
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
        "logps/chosen": chosen_logps.detach().float(),
        "logps/rejected": rejected_logps.detach().float(),
        # Likelihood ranking: average log-prob of chosen above rejected. For SimPO it
        # equals rewards/accuracies; for DPO it does not (the paper's diagnostic).
        "logps/accuracies": (chosen_logps.detach() > rejected_logps.detach()).float(),
        "lengths/chosen": chosen_len.float(),
        "lengths/rejected": rejected_len.float(),
        "margin_reached": (margins >= gamma).float(),
    }
    out = {k: float(v.sum()) for k, v in vals.items()}
    out["pairs"] = float(margins.numel())
    return out


def sft_sums(losses, logps, lengths) -> dict:
    """SFT rows (chosen responses only): loss, average log-prob and length sums."""
    return {"loss": float(losses.detach().float().sum()), "logps/chosen": float(logps.detach().float().sum()),
            "lengths/chosen": float(lengths.float().sum()), "pairs": float(losses.numel())}


def add_sums(total: dict, more: dict) -> dict:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v
    return total


def all_reduce_sums(sums: dict) -> dict:
    """Sum the same keys over every rank (a collective: all ranks must call it)."""
    import torch
    import torch.distributed as dist

    keys = sorted(sums)
    if not (dist.is_available() and dist.is_initialized()):
        return dict(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def rss_mb() -> float:
    """This process's current resident memory in MiB (psutil: a Ray dependency)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# The likelihood-collapse alarm's key (worker.collapse_alarm; sweeps stop on it).
COLLAPSE_ALARM = "alarm/chosen_logp_collapse"


def agree(ok: bool) -> bool:
    """True only if ``ok`` on every rank (a collective)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over every rank (a collective: all ranks must call it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def to_metrics(sums: dict, prefix: str = "") -> dict:
    """Global sums -> means per pair, under ``prefix`` (e.g. "eval/")."""
    n = max(sums.get("pairs", 0.0), 1.0)
    out = {f"{prefix}{k}": sums[k] / n for k in PAIR_KEYS if k in sums}
    out[f"{prefix}pairs"] = int(sums.get("pairs", 0))
    return out


def format_progress(m: dict, total_steps: int) -> str:
    """One human line per report."""
    if "loss" not in m:  # the step-0 baseline: eval only
        what = (f"eval acc {m['eval/rewards/accuracies']:.3f}" if "eval/rewards/accuracies" in m
                else f"eval loss {m.get('eval/loss', float('nan')):.4f}")
        return f"step {m['step']:>5}/{total_steps} | {what}{_gen_part(m)} (before training)"
    parts = [f"step {m['step']:>5}/{total_steps}", f"loss {m['loss']:.4f}"]
    if "rewards/accuracies" in m:
        parts += [f"acc {m['rewards/accuracies']:.3f}", f"margin {m['rewards/margins']:+.3f}",
                  f"logp c/r {m['logps/chosen']:.3f}/{m['logps/rejected']:.3f}"]
    else:  # SFT
        parts.append(f"logp {m['logps/chosen']:.3f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:.0f} tok/s"]
    if "eval/rewards/accuracies" in m:
        parts.append(f"eval acc {m['eval/rewards/accuracies']:.3f}")
    elif "eval/loss" in m:
        parts.append(f"eval loss {m['eval/loss']:.4f}")
    return " | ".join(parts) + _gen_part(m)


def _gen_part(m: dict) -> str:
    """The generation probe's numbers, when the report has them."""
    if "gen/length_median" not in m:
        return ""
    return (f" | gen len {m['gen/length_median']:.0f} unfinished {m['gen/unfinished_rate']:.2f} "
            f"repeat {m['gen/repeat_rate']:.2f} empty {m['gen/empty_rate']:.2f}"
            + (" ALARM" if m.get("alarm/generation") else ""))


# ---------------------------------------------------------------- metrics.jsonl
def read_reports(path) -> list:
    """A run's ``metrics.jsonl`` in step order, one line per step: where a step was
    reported by several attempts (a worker restart or a rerun redoes the steps after the
    last checkpoint), the latest ``attempt``'s line. The one reader every consumer uses."""
    by_step: dict = {}
    for m in read_all(path):
        step, old = m.get("step", 0), by_step.get(m.get("step", 0))
        if old is None or m.get("attempt", 0) >= old.get("attempt", 0):
            by_step[step] = m
    return [by_step[k] for k in sorted(by_step)]


def last_attempt(path) -> int:
    """The highest ``attempt`` in a ``metrics.jsonl`` (0 when there is none)."""
    return max((m.get("attempt", 0) for m in read_all(path)), default=0)


def read_all(path) -> list:
    """Every line of a ``metrics.jsonl``, superseded ones included, in file order."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
