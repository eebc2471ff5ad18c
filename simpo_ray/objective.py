"""The loss table, and one forward's log-probs -> the configured loss and metric sums.

``LOSSES`` is the one list of objectives (torch-free: config, train, the worker and
metrics read it): which log-probs each uses (length-averaged or summed), whether it
needs a frozen reference's log-probs (precomputed once per row), and the row shape it
trains on (pairs: chosen then rejected; ``chosen``: the chosen responses only, SFT).
The loss functions themselves are pure (``simpo_ray.losses``, imported when a loss is
computed, so importing this module stays light).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    name: str
    logps: str              # "average" (per token) or "sum" (per sequence)
    needs_reference: bool   # reference log-probs precomputed by simpo_ray.reference
    rows: str               # "pairs" (chosen then rejected) or "chosen" (SFT)
    target_margin: bool     # margin_reached counts pairs whose margin >= gamma
    note: str
    beta: float = 0.1       # the recipe's beta (`simpo-ray compare` uses it unless simpo.beta is given)


LOSSES = {x.name: x for x in (
    Loss("simpo", "average", False, "pairs", True, "SimPO (arXiv 2405.14734): beta, gamma_beta_ratio or gamma",
         beta=2.0),
    Loss("dpo", "sum", True, "pairs", False, "DPO: typical beta 0.1"),
    Loss("ipo", "average", True, "pairs", False, "IPO: target 1/(2 beta)"),
    Loss("cpo", "sum", False, "pairs", False, "CPO: add sft_weight 1.0 for its NLL term"),
    Loss("orpo", "average", False, "pairs", False, "ORPO: odds ratio; add sft_weight 1.0 for its NLL term"),
    Loss("rdpo", "sum", True, "pairs", False, "R-DPO: rdpo_alpha length penalty"),
    # Supervised fine-tuning on the chosen responses (the stage before SimPO for base
    # models), on the same machinery: `simpo-ray sft`.
    Loss("sft", "average", False, "chosen", False, "completion-only NLL of the chosen responses"),
)}
LOSS_NAMES = tuple(LOSSES)
PAIR_LOSSES = tuple(n for n, x in LOSSES.items() if x.rows == "pairs")
NEEDS_REFERENCE = frozenset(n for n, x in LOSSES.items() if x.needs_reference)


def pair_losses(s, sums, counts, ref_sums=None):
    """s: SimPOConfig. sums, counts, ref_sums: (2B,). Returns (losses, chosen_rewards,
    rejected_rewards) each (B,) and the averaged log-probs (2B,)."""
    from simpo_ray import losses as L

    n = sums.shape[0] // 2
    avg = sums / counts.to(sums.dtype)
    c, r = slice(0, n), slice(n, 2 * n)
    if LOSSES[s.loss].needs_reference and ref_sums is None:
        raise ValueError(f"loss '{s.loss}' needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    if s.loss == "simpo":
        out = L.simpo_loss(avg[c], avg[r], beta=s.beta, gamma_beta_ratio=s.gamma_beta_ratio, gamma=s.gamma,
                           loss_type=s.loss_type, label_smoothing=s.label_smoothing)
    elif s.loss == "cpo":
        out = L.cpo_loss(sums[c], sums[r], beta=s.beta)
    elif s.loss == "orpo":
        out = L.orpo_loss(avg[c], avg[r], beta=s.beta)
    elif s.loss == "dpo":
        out = L.dpo_loss(sums[c], sums[r], ref_sums[c], ref_sums[r], beta=s.beta,
                         label_smoothing=s.label_smoothing)
    elif s.loss == "ipo":
        ref_avg = ref_sums / counts.to(ref_sums.dtype)
        out = L.ipo_loss(avg[c], avg[r], ref_avg[c], ref_avg[r], beta=s.beta)
    elif s.loss == "rdpo":
        out = L.rdpo_loss(sums[c], sums[r], ref_sums[c], ref_sums[r], counts[c], counts[r],
                          beta=s.beta, alpha=s.rdpo_alpha)
    else:
        raise ValueError(f"unknown pair loss {s.loss!r}; known: {', '.join(PAIR_LOSSES)}")
    return (*out, avg)


def step_loss(s, sums, counts, ref_sums=None):
    """Scalar loss to backpropagate (mean over pairs + sft_weight x NLL of chosen) and
    the metric sums for ``simpo_ray.metrics``. For a ``chosen``-rows loss (sft) the rows
    are chosen responses only and the loss is their mean per-token NLL."""
    from simpo_ray import losses as L
    from simpo_ray import metrics

    if LOSSES[s.loss].rows == "chosen":
        avg = sums / counts.to(sums.dtype)
        losses = L.sft_loss(avg)
        return losses.mean(), metrics.sft_sums(losses, avg, counts)
    losses, cr, rr, avg = pair_losses(s, sums, counts, ref_sums)
    n = losses.shape[0]
    loss = losses.mean()
    if s.sft_weight:
        loss = loss + s.sft_weight * L.sft_loss(avg[:n]).mean()
    margin = s.resolved_gamma if LOSSES[s.loss].target_margin else 0.0
    pair = metrics.pair_sums(losses, cr, rr, avg[:n], avg[n:], counts[:n], counts[n:], margin)
    return loss, pair
