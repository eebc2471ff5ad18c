"""Preference losses: SimPO and the baselines it is compared against.

Pure functions of tensors (no Ray, no DeepSpeed, no config objects). Every loss
returns per-example ``(losses, chosen_rewards, rejected_rewards)``, each of shape
(B,); the caller reduces (usually ``losses.mean()``). Rewards are detached: they are
for logging, never for gradients.

Equation numbers refer to SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734):
Eq. (4) is the reward r(x, y) = beta / |y| * log pi(y|x), Eq. (5) the Bradley-Terry
model with target margin, Eq. (6) the SimPO objective

    L = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma ).

Which log-probs each loss wants (length-averaged or summed over the completion) is
part of its contract and stated in each docstring; ``simpo_ray.logps`` makes both.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = Tuple[Tensor, Tensor, Tensor]

SIMPO_LOSS_TYPES = ("sigmoid", "hinge")


def resolve_gamma(
    beta: float,
    gamma_beta_ratio: Optional[float] = None,
    gamma: Optional[float] = None,
) -> Tuple[float, float]:
    """Return ``(gamma, gamma_beta_ratio)`` from exactly one of them.

    The official recipes set ``gamma_beta_ratio`` (the margin in average-log-prob
    units); the paper's equation uses the absolute margin ``gamma`` (reward units).
    They are related by ``gamma = beta * gamma_beta_ratio``. Both are returned so
    config and metrics can log both.

    Raises ValueError if both or neither are given, if ``beta`` is not a finite
    positive number, or if the margin is negative or not finite.
    """
    if (gamma_beta_ratio is None) == (gamma is None):
        which = "both" if gamma is not None else "neither"
        raise ValueError(
            f"give exactly one of gamma_beta_ratio and gamma (got {which}); "
            "gamma = beta * gamma_beta_ratio"
        )
    beta = _as_float("beta", beta)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    name = "gamma_beta_ratio" if gamma is None else "gamma"
    value = _as_float(name, gamma_beta_ratio if gamma is None else gamma)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a target margin), got {value}")
    if gamma is None:
        return beta * value, value
    return value, value / beta


def _as_float(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_pair(chosen: Tensor, rejected: Tensor) -> None:
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            "chosen and rejected log-probs must both have shape (B,), got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _smoothed_sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    # Conservative (label-smoothed) Bradley-Terry loss, as in cDPO and the official
    # SimPO trainer: the label is flipped with probability `label_smoothing`.
    if label_smoothing == 0.0:
        return -F.logsigmoid(z)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: Optional[float] = None,
    gamma: Optional[float] = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO loss, Eq. (6) of arXiv 2405.14734.

    Args:
        chosen_logps, rejected_logps: (B,) LENGTH-AVERAGED completion log-probs,
            (1/|y|) log pi(y|x), from ``sequence_logps(..., average=True)``.
        beta: reward scale (paper range about 2 to 10).
        gamma_beta_ratio / gamma: the target margin; give exactly one
            (``gamma = beta * gamma_beta_ratio``, see ``resolve_gamma``).
        loss_type: "sigmoid" (the paper) or "hinge" (SLiC-style, official code).
        label_smoothing: in [0, 0.5); only for "sigmoid".

    With z = beta * (chosen - rejected) - gamma (the official code's
    ``beta * (c - r - gamma_beta_ratio)``):
        sigmoid: -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)
        hinge:   relu(1 - z)

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are
    beta * average log-prob (Eq. (4)), detached.
    """
    _check_pair(chosen_logps, rejected_logps)
    _check_label_smoothing(label_smoothing)
    gamma, _ = resolve_gamma(beta, gamma_beta_ratio, gamma)
    z = beta * (chosen_logps - rejected_logps) - gamma
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(z, label_smoothing)
    elif loss_type == "hinge":
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is only defined for loss_type='sigmoid'")
        losses = torch.relu(1.0 - z)
    else:
        raise ValueError(f"loss_type must be one of {SIMPO_LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def sft_loss(chosen_logps_avg: Tensor) -> Tensor:
    """Per-example NLL of the chosen completion: ``-chosen_logps_avg``, shape (B,).

    Not part of SimPO (off by default); the trainer adds ``sft_weight * sft_loss``
    explicitly, and ORPO's NLL term is this same function.
    """
    return -chosen_logps_avg


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. (7) there; SimPO paper Eq. (2)).

    Inputs: (B,) SUMMED completion log-probs of the policy and the frozen reference.
    z = beta * ((pc - rc) - (pr - rr)); loss = -log sigmoid(z), label-smoothed as in
    cDPO when ``label_smoothing > 0``. Rewards: beta * (policy - reference), detached.
    """
    _check_label_smoothing(label_smoothing)
    for a, b in ((policy_chosen, policy_rejected), (ref_chosen, ref_rejected), (policy_chosen, ref_chosen)):
        _check_pair(a, b)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    losses = _smoothed_sigmoid_loss(z, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences"), empirical loss.

    Inputs: (B,) LENGTH-AVERAGED completion log-probs of policy and reference.
    The paper writes the log-ratios over whole sequences; like TRL's ``ipo`` (and
    the SimPO paper's baseline runs) we use per-token averages, which keeps the
    regression target 1/(2 beta) on a length-independent scale.

    h = (pc - rc) - (pr - rr); loss = (h - 1 / (2 beta))^2.
    Rewards: beta * (policy - reference), detached.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 for ipo, got {beta}")
    for a, b in ((policy_chosen, policy_rejected), (ref_chosen, ref_rejected), (policy_chosen, ref_chosen)):
        _check_pair(a, b)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def cpo_loss(chosen_sum: Tensor, rejected_sum: Tensor, *, beta: float) -> LossOutput:
    """CPO preference term (Xu et al. 2024, Contrastive Preference Optimization), no reference.

    Inputs: (B,) SUMMED completion log-probs. loss = -log sigmoid(beta * (c - r)).
    CPO's NLL term on the chosen side is added by the trainer (``sft_loss``).
    Rewards: beta * summed log-prob, detached.
    """
    _check_pair(chosen_sum, rejected_sum)
    losses = -F.logsigmoid(beta * (chosen_sum - rejected_sum))
    return losses, beta * chosen_sum.detach(), beta * rejected_sum.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both ends (Maechler 2012)."""
    # The min() keeps the unused branch finite, so torch.where's backward does not
    # turn 0 * inf into NaN.
    ln2 = math.log(2.0)
    return torch.where(
        x > -ln2,
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(torch.clamp(x, max=-ln2))),
    )


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, *, beta: float) -> LossOutput:
    """ORPO odds-ratio term (Hong et al. 2024), no reference model.

    Inputs: (B,) LENGTH-AVERAGED completion log-probs a (so P = exp(a) < 1).
    log odds(y) = a - log(1 - exp(a)), computed with a stable log1mexp; a is
    clamped just below 0 so a completion of probability exactly 1 stays finite.
    loss = -beta * log sigmoid(log odds(y_w) - log odds(y_l)).
    Only the odds-ratio part: the NLL part is ``sft_loss(chosen_avg)``, added by the
    trainer. Rewards: beta * average log-prob, detached (as in TRL).
    """
    _check_pair(chosen_avg, rejected_avg)
    tiny = torch.finfo(chosen_avg.dtype).tiny
    c = chosen_avg.clamp(max=-tiny)
    r = rejected_avg.clamp(max=-tiny)
    log_odds = (c - _log1mexp(c)) - (r - _log1mexp(r))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def rdpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    beta: float,
    alpha: float,
) -> LossOutput:
    """R-DPO: DPO with a length regulariser (Park et al. 2024, "Disentangling Length
    from Quality in Direct Preference Optimization").

    Inputs: (B,) SUMMED completion log-probs of policy and reference, and (B,)
    completion token counts. z = beta * ((pc - rc) - (pr - rr)) - alpha * (|y_w| - |y_l|);
    loss = -log sigmoid(z). Rewards: beta * (policy - reference), detached.
    """
    for a, b in (
        (policy_chosen, policy_rejected),
        (ref_chosen, ref_rejected),
        (policy_chosen, ref_chosen),
        (chosen_len, rejected_len),
        (policy_chosen, chosen_len),
    ):
        _check_pair(a, b)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    length_diff = (chosen_len - rejected_len).to(chosen_ratio.dtype)
    z = beta * (chosen_ratio - rejected_ratio) - alpha * length_diff
    losses = -F.logsigmoid(z)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
