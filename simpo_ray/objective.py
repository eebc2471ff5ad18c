"""One forward's log-probs -> the configured loss and the per-pair metric sums.

The loss functions themselves are pure (``simpo_ray.losses``); this is the one place
that reads the config to pick one and feeds it the log-probs it wants: averaged for
SimPO, IPO and ORPO; summed for DPO, CPO and R-DPO. Rows are chosen first, then
rejected: ``sums[:B]`` are the chosen sequences.
"""

from __future__ import annotations

from simpo_ray import losses as L
from simpo_ray import metrics

# Losses that need log-probs of a frozen reference model (precomputed once per row).
NEEDS_REFERENCE = frozenset(L.LOSS_NAMES) - L.REFERENCE_FREE


def pair_losses(s, sums, counts, ref_sums=None):
    """s: SimPOConfig. sums, counts, ref_sums: (2B,). Returns (losses, chosen_rewards,
    rejected_rewards) each (B,) and the averaged log-probs (2B,)."""
    n = sums.shape[0] // 2
    avg = sums / counts.to(sums.dtype)
    c, r = slice(0, n), slice(n, 2 * n)
    if s.loss in NEEDS_REFERENCE and ref_sums is None:
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
        raise ValueError(f"unknown loss {s.loss!r}")
    return (*out, avg)


def objective(s, sums, counts, ref_sums=None):
    """Scalar loss to backpropagate (mean over pairs + sft_weight x NLL of chosen) and
    the metric sums for ``simpo_ray.metrics``. For ``loss: sft`` the rows are chosen
    responses only and the loss is their mean per-token NLL."""
    if s.loss == "sft":
        avg = sums / counts.to(sums.dtype)
        losses = L.sft_loss(avg)
        return losses.mean(), metrics.sft_sums(losses, avg, counts)
    losses, cr, rr, avg = pair_losses(s, sums, counts, ref_sums)
    n = losses.shape[0]
    loss = losses.mean()
    if s.sft_weight:
        loss = loss + s.sft_weight * L.sft_loss(avg[:n]).mean()
    margin = s.resolved_gamma if s.loss == "simpo" else 0.0
    pair = metrics.pair_sums(losses, cr, rr, avg[:n], avg[n:], counts[:n], counts[n:], margin)
    return loss, pair
