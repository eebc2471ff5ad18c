"""simpo_ray.losses: hand-computed values, properties, and the paper's equation.

Notation: c, r = chosen / rejected log-probs, z = the argument of the sigmoid.
Useful identities for the hand values: -log sigmoid(z) = log(1 + e^-z) = softplus(-z),
and softplus(z) = z + softplus(-z).
"""

import math

import pytest
import torch

from simpo_ray import losses as L
from simpo_ray.logps import sequence_logps

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- hand values


def test_simpo_sigmoid_hand_values():
    """beta = 2, gamma_beta_ratio = 0.5, so gamma = 1.

    pair 0: c = -1.0, r = -2.0: z = 2 * (1.0) - 1 = 1, loss = log(1 + e^-1) = 0.31326168751822286
    pair 1: c = -1.5, r = -1.0: z = 2 * (-0.5) - 1 = -2, loss = log(1 + e^2) = 2.1269280110429727
    rewards = beta * avg logp: chosen (-2, -3), rejected (-4, -2).
    """
    losses, cr, rr = L.simpo_loss(t(-1.0, -1.5), t(-2.0, -1.0), beta=2.0, gamma_beta_ratio=0.5)
    close(losses, [0.31326168751822286, 2.1269280110429727])
    close(cr, [-2.0, -3.0])
    close(rr, [-4.0, -2.0])


def test_simpo_hinge_hand_values():
    """Same pairs as above (z = 1, z = -2): relu(1 - z) = (0, 3)."""
    losses, _, _ = L.simpo_loss(t(-1.0, -1.5), t(-2.0, -1.0), beta=2.0, gamma=1.0, loss_type="hinge")
    close(losses, [0.0, 3.0])


def test_simpo_label_smoothing_hand_value():
    """ls = 0.1, z = 1: 0.9 softplus(-1) + 0.1 softplus(1) = softplus(-1) + 0.1 * 1
    = 0.31326168751822286 + 0.1 = 0.41326168751822286."""
    losses, _, _ = L.simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0, label_smoothing=0.1)
    close(losses, [0.41326168751822286])


def test_dpo_hand_values():
    """beta = 0.1; policy (c, r) = (-10, -14), reference (-11, -12).
    log-ratios: chosen -10 + 11 = 1, rejected -14 + 12 = -2; z = 0.1 * 3 = 0.3.
    loss = log(1 + e^-0.3) = 0.5543552444685271; rewards 0.1 and -0.2.
    ls = 0.2: softplus(-0.3) + 0.2 * 0.3 = 0.6143552444685271."""
    args = (t(-10.0), t(-14.0), t(-11.0), t(-12.0))
    losses, cr, rr = L.dpo_loss(*args, beta=0.1)
    close(losses, [0.5543552444685271])
    close(cr, [0.1])
    close(rr, [-0.2])
    smoothed, _, _ = L.dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    close(smoothed, [0.6143552444685271])


def test_ipo_hand_values():
    """beta = 0.5, target 1 / (2 beta) = 1.
    pair 0: policy (-1, -2), ref (-1.5, -1.5): h = 0.5 - (-0.5) = 1, loss (1 - 1)^2 = 0.
    pair 1: policy = ref: h = 0, loss (0 - 1)^2 = 1.
    rewards = 0.5 * log-ratio: chosen (0.25, 0), rejected (-0.25, 0)."""
    losses, cr, rr = L.ipo_loss(t(-1.0, -1.0), t(-2.0, -1.0), t(-1.5, -1.0), t(-1.5, -1.0), beta=0.5)
    close(losses, [0.0, 1.0])
    close(cr, [0.25, 0.0])
    close(rr, [-0.25, 0.0])


def test_cpo_hand_values():
    """beta = 0.5, summed logps c = -10, r = -12: z = 0.5 * 2 = 1, loss = 0.31326168751822286."""
    losses, cr, rr = L.cpo_loss(t(-10.0), t(-12.0), beta=0.5)
    close(losses, [0.31326168751822286])
    close(cr, [-5.0])
    close(rr, [-6.0])


def test_orpo_hand_values():
    """beta = 0.1; chosen average logp log 0.5 -> odds 0.5/0.5 = 1, log odds 0;
    rejected log 0.2 -> odds 0.2/0.8 = 1/4, log odds -log 4.
    log odds ratio = log 4, sigmoid(log 4) = 4/5, loss = -0.1 * log 0.8 = 0.022314355131420972."""
    losses, cr, rr = L.orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    close(losses, [0.022314355131420972])
    close(cr, [0.1 * math.log(0.5)])
    close(rr, [0.1 * math.log(0.2)])


def test_rdpo_hand_values():
    """beta = 0.1, alpha = 0.01; log-ratio difference 3 as in the DPO test;
    lengths 50 vs 30: z = 0.3 - 0.01 * 20 = 0.1, loss = log(1 + e^-0.1) = 0.6443966600735709."""
    losses, cr, rr = L.rdpo_loss(
        t(-10.0), t(-14.0), t(-11.0), t(-12.0),
        torch.tensor([50]), torch.tensor([30]), beta=0.1, alpha=0.01,
    )
    close(losses, [0.6443966600735709])
    close(cr, [0.1])
    close(rr, [-0.2])
    # alpha = 0 is plain DPO.
    no_len, _, _ = L.rdpo_loss(
        t(-10.0), t(-14.0), t(-11.0), t(-12.0),
        torch.tensor([50]), torch.tensor([30]), beta=0.1, alpha=0.0,
    )
    close(no_len, L.dpo_loss(t(-10.0), t(-14.0), t(-11.0), t(-12.0), beta=0.1)[0])


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_simpo_shift_invariance(loss_type):
    g = torch.Generator().manual_seed(0)
    c, r = -5 * torch.rand(16, generator=g, dtype=F64), -5 * torch.rand(16, generator=g, dtype=F64)
    base, _, _ = L.simpo_loss(c, r, beta=2.5, gamma_beta_ratio=0.4, loss_type=loss_type)
    for k in (-3.0, 0.25, 7.0):
        shifted, _, _ = L.simpo_loss(c + k, r + k, beta=2.5, gamma_beta_ratio=0.4, loss_type=loss_type)
        close(shifted, base, tol=1e-12)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_simpo_is_ln2_exactly_at_the_margin(ls):
    """beta (c - r) = 2 * 0.5 = 1 = gamma, so z = 0 and the loss is ln 2 (for any
    label smoothing: both terms are softplus(0))."""
    for kwargs in ({"gamma": 1.0}, {"gamma_beta_ratio": 0.5}):
        losses, _, _ = L.simpo_loss(t(-1.0), t(-1.5), beta=2.0, label_smoothing=ls, **kwargs)
        assert losses.item() == pytest.approx(math.log(2.0), abs=1e-15)


def test_simpo_monotone_and_non_negative():
    g = torch.Generator().manual_seed(1)
    c = (-4 * torch.rand(64, generator=g, dtype=F64)).requires_grad_()
    r = (-4 * torch.rand(64, generator=g, dtype=F64)).requires_grad_()
    losses, _, _ = L.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    assert (losses >= 0).all()
    gc, gr = torch.autograd.grad(losses.sum(), (c, r))
    assert (gc < 0).all(), "raising the chosen log-prob must lower the loss"
    assert (gr > 0).all(), "raising the rejected log-prob must raise the loss"
    # And on values, not only on gradients.
    steps = torch.linspace(-3, 3, 25, dtype=F64)
    along_c, _, _ = L.simpo_loss(steps, torch.zeros_like(steps), beta=2.0, gamma=1.0)
    along_r, _, _ = L.simpo_loss(torch.zeros_like(steps), steps, beta=2.0, gamma=1.0)
    assert (along_c.diff() < 0).all()
    assert (along_r.diff() > 0).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)

    def rand(n=4):
        return (-3 * torch.rand(n, generator=g, dtype=F64)).requires_grad_()

    c, r, rc, rr = rand(), rand(), rand(), rand()
    lens_c, lens_r = torch.tensor([3, 5, 2, 7]), torch.tensor([4, 4, 6, 1])
    cases = [
        (lambda c, r: L.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.3)[0], (c, r)),
        (lambda c, r: L.simpo_loss(c, r, beta=2.0, gamma=0.6, label_smoothing=0.2)[0], (c, r)),
        (lambda *a: L.dpo_loss(*a, beta=0.5, label_smoothing=0.1)[0], (c, r, rc, rr)),
        (lambda *a: L.ipo_loss(*a, beta=0.5)[0], (c, r, rc, rr)),
        (lambda c, r: L.cpo_loss(c, r, beta=0.5)[0], (c, r)),
        (lambda c, r: L.orpo_loss(c, r, beta=0.5)[0], (c, r)),
        (lambda *a: L.rdpo_loss(*a, lens_c, lens_r, beta=0.5, alpha=0.05)[0], (c, r, rc, rr)),
        (lambda c: L.sft_loss(c), (c,)),
    ]
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs)


def test_rewards_are_detached():
    c, r = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    for out in (
        L.simpo_loss(c, r, beta=2.0, gamma=0.5),
        L.cpo_loss(c, r, beta=1.0),
        L.orpo_loss(c, r, beta=1.0),
        L.dpo_loss(c, r, t(-1.0), t(-1.0), beta=1.0),
    ):
        assert out[0].requires_grad
        assert not out[1].requires_grad and not out[2].requires_grad


def test_no_nan_for_extreme_inputs():
    """|z| = 1e4 on both sides for every loss: values and gradients stay finite."""
    big = 1e4
    for dtype in (torch.float32, F64):
        c = torch.tensor([0.0, -big], dtype=dtype, requires_grad=True)
        r = torch.tensor([-big, 0.0], dtype=dtype, requires_grad=True)
        ref = torch.zeros(2, dtype=dtype)
        lens = torch.tensor([1, 1])
        outs = [
            L.simpo_loss(c, r, beta=1.0, gamma=0.0)[0],
            L.simpo_loss(c, r, beta=1.0, gamma=0.0, label_smoothing=0.1)[0],
            L.simpo_loss(c, r, beta=1.0, gamma=0.0, loss_type="hinge")[0],
            L.dpo_loss(c, r, ref, ref, beta=1.0)[0],
            L.ipo_loss(c, r, ref, ref, beta=1.0)[0],
            L.cpo_loss(c, r, beta=1.0)[0],
            L.orpo_loss(c, r, beta=1.0)[0],
            L.rdpo_loss(c, r, ref, ref, lens, lens, beta=1.0, alpha=0.1)[0],
        ]
        for out in outs:
            (gc, gr) = torch.autograd.grad(out.sum(), (c, r))
            assert torch.isfinite(out).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all()
        sigmoid = outs[0].detach()
        close(sigmoid, [0.0, big], tol=1e-6)


def test_orpo_finite_when_a_completion_has_probability_one():
    c = torch.tensor([0.0, -1e-30, -1e-8], dtype=F64, requires_grad=True)
    r = torch.tensor([-1.0, 0.0, -50.0], dtype=F64, requires_grad=True)
    losses, _, _ = L.orpo_loss(c, r, beta=0.1)
    gc, gr = torch.autograd.grad(losses.sum(), (c, r))
    assert torch.isfinite(losses).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all()


# ---------------------------------------------------------------- the paper's equation


def test_simpo_matches_paper_equation_from_token_logps():
    """Eq. (6): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    with completions of different lengths, computed from per-token log-probs by hand
    and through sequence_logps."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 8, 6
    logits = torch.randn(2 * B, T, V, generator=g, dtype=F64)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = ids.clone()
    prompt = [2, 3, 2, 4]
    ends = [8, 6, 5, 8]  # completion = ids[p : e], then padding
    for i, (p, e) in enumerate(zip(prompt, ends)):
        labels[i, :p] = -100
        labels[i, e:] = -100
    beta, gamma = 2.5, 1.25
    token_lp = torch.log_softmax(logits, -1)
    by_hand = []
    for i in range(2 * B):
        lp = [token_lp[i, s - 1, ids[i, s]].item() for s in range(prompt[i], ends[i])]
        by_hand.append(sum(lp) / len(lp))
    expected = [
        -math.log(1 / (1 + math.exp(-(beta * by_hand[i] - beta * by_hand[B + i] - gamma))))
        for i in range(B)
    ]
    avg = sequence_logps(logits, labels)
    losses, _, _ = L.simpo_loss(avg[:B], avg[B:], beta=beta, gamma=gamma)
    close(losses, expected, tol=1e-10)


def test_gamma_and_gamma_beta_ratio_forms_agree_with_official_code():
    """The official trainer writes -logsigmoid(beta * (c - r - gamma_beta_ratio))."""
    g = torch.Generator().manual_seed(4)
    c, r = -3 * torch.rand(32, generator=g, dtype=F64), -3 * torch.rand(32, generator=g, dtype=F64)
    beta, ratio = 2.5, 0.55
    official = -torch.nn.functional.logsigmoid(beta * (c - r - ratio))
    from_ratio, _, _ = L.simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio)
    from_gamma, _, _ = L.simpo_loss(c, r, beta=beta, gamma=beta * ratio)
    close(from_ratio, official, tol=1e-12)
    close(from_gamma, official, tol=1e-12)


def test_simpo_equals_cpo_with_margin_for_one_token_completions():
    """With |y| = 1 the average is the sum, so SimPO with gamma = 0 is CPO, and with a
    margin it is CPO on a chosen log-prob lowered by gamma / beta."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 5, 7, generator=g, dtype=F64)
    labels = torch.full((4, 5), -100)
    labels[:, 3] = torch.randint(0, 7, (4,), generator=g)
    avg, total = sequence_logps(logits, labels), sequence_logps(logits, labels, average=False)
    close(avg, total, tol=0.0)
    beta, gamma = 2.0, 0.8
    simpo0, _, _ = L.simpo_loss(avg[:2], avg[2:], beta=beta, gamma=0.0)
    close(simpo0, L.cpo_loss(total[:2], total[2:], beta=beta)[0])
    simpo, _, _ = L.simpo_loss(avg[:2], avg[2:], beta=beta, gamma=gamma)
    close(simpo, L.cpo_loss(total[:2] - gamma / beta, total[2:], beta=beta)[0])


# ---------------------------------------------------------------- validation and names


def test_resolve_gamma():
    assert L.resolve_gamma(2.0, gamma_beta_ratio=0.5) == (1.0, 0.5)
    assert L.resolve_gamma(2.0, gamma=1.0) == (1.0, 0.5)
    for kwargs in ({}, {"gamma_beta_ratio": 0.5, "gamma": 1.0}):
        with pytest.raises(ValueError, match="gamma_beta_ratio.*gamma"):
            L.resolve_gamma(2.0, **kwargs)
        with pytest.raises(ValueError, match="gamma_beta_ratio.*gamma"):
            L.simpo_loss(t(-1.0), t(-2.0), beta=2.0, **kwargs)
    with pytest.raises(ValueError, match="beta"):
        L.resolve_gamma(0.0, gamma=1.0)
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        L.resolve_gamma(2.0, gamma_beta_ratio=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        L.resolve_gamma(2.0, gamma=float("nan"))


def test_simpo_rejects_bad_arguments():
    c, r = t(-1.0, -2.0), t(-2.0, -1.0)
    with pytest.raises(ValueError, match="loss_type"):
        L.simpo_loss(c, r, beta=2.0, gamma=1.0, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.simpo_loss(c, r, beta=2.0, gamma=1.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.simpo_loss(c, r, beta=2.0, gamma=1.0, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        L.simpo_loss(c, t(-1.0), beta=2.0, gamma=1.0)


def test_sft_loss_is_negative_chosen_average():
    close(L.sft_loss(t(-1.25, -0.5)), [1.25, 0.5])


def test_loss_table_names_a_function_for_every_loss():
    from simpo_ray.objective import LOSSES, LOSS_NAMES, PAIR_LOSSES

    assert LOSS_NAMES == ("simpo", "dpo", "ipo", "cpo", "orpo", "rdpo", "sft")
    assert PAIR_LOSSES == LOSS_NAMES[:-1] and LOSSES["sft"].rows == "chosen"
    assert {n for n, x in LOSSES.items() if not x.needs_reference} == {"simpo", "cpo", "orpo", "sft"}
    for name in LOSS_NAMES:
        assert callable(getattr(L, f"{name}_loss"))
