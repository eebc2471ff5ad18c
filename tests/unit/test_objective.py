"""Loss selection, the chunked log-prob head inside a real model, and the reference pass."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from simpo_ray.collate import collate_pairs
from simpo_ray.config import SimPOConfig, TinyModelConfig
from simpo_ray.metrics import to_metrics
from simpo_ray.objective import NEEDS_REFERENCE, pair_losses, step_loss
from simpo_ray.policy import PolicyLogps, supports_chunked_head
from simpo_ray.tiny import build_model


def _batch():
    return collate_pairs([[1, 3, 40, 41], [1, 3, 42]], [[50, 51, 2], [52, 2]],
                         [[60, 2], [61, 62, 63, 64, 2]], pad_id=0, pad_to_multiple_of=8)


def test_reference_needs():
    assert NEEDS_REFERENCE == {"dpo", "ipo", "rdpo"}
    with pytest.raises(ValueError, match="needs reference"):
        pair_losses(SimPOConfig(loss="dpo"), torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]))


def test_simpo_objective_matches_the_papers_equation():
    s = SimPOConfig(beta=2.5, gamma_beta_ratio=0.4)
    sums = torch.tensor([-6.0, -3.0, -20.0, -4.0])  # chosen: 2 rows, rejected: 2 rows
    counts = torch.tensor([3, 2, 5, 2])
    loss, m = step_loss(s, sums, counts)
    m = to_metrics(m)
    c = np.array([-6 / 3, -3 / 2]); r = np.array([-20 / 5, -4 / 2])
    z = 2.5 * c / 1 - 2.5 * r - 2.5 * 0.4  # beta/|y| log pi(y) = beta * average
    want = np.mean(np.log1p(np.exp(-z)))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert m["pairs"] == 2 and m["rewards/accuracies"] == 1.0  # (c - r) = (2, 0.5): both > 0
    assert m["margin_reached"] == 1.0  # margins 5.0 >= 1.0, 1.25 >= 1.0
    assert m["logps/accuracies"] == m["rewards/accuracies"]


def test_dpo_likelihood_ranking_is_the_average_logprob_order():
    s = SimPOConfig(loss="dpo", beta=0.1)
    sums = torch.tensor([-30.0, -5.0])      # chosen 30 tokens (avg -1.0), rejected 2 tokens (avg -2.5)
    ref = torch.tensor([-29.0, -4.0])       # both moved down by 1: reward margin 0
    _, m = step_loss(s, sums, torch.tensor([30, 2]), ref)
    m = to_metrics(m)
    assert m["logps/accuracies"] == 1.0 and m["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo", "dpo", "ipo", "rdpo"])
def test_every_loss_is_finite_and_backpropagates(loss):
    s = SimPOConfig(loss=loss, beta=0.5, rdpo_alpha=0.1, sft_weight=0.5)
    sums = torch.tensor([-8.0, -3.0, -9.0, -7.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-8.5, -3.1, -8.0, -6.0], dtype=torch.float64)
    loss_v, m = step_loss(s, sums, torch.tensor([4, 3, 5, 2]), ref)
    loss_v.backward()
    assert math.isfinite(float(loss_v.detach())) and torch.isfinite(sums.grad).all()
    assert sums.grad[:2].lt(0).all() or loss in ("ipo",)  # raising chosen lowers the loss


@pytest.fixture(scope="module")
def tiny_lm():
    return build_model(dataclasses.asdict(TinyModelConfig()))


def test_chunked_head_equals_plain_logits_in_values_and_gradients(tiny_lm):
    import copy

    b = _batch()
    plain, chunked = PolicyLogps(copy.deepcopy(tiny_lm), 0), PolicyLogps(copy.deepcopy(tiny_lm), 3)
    assert chunked.chunk_size == 3 and plain.chunk_size == 0
    outs = []
    for m in (plain, chunked):
        sums, counts = m(b["input_ids"], b["attention_mask"], b["labels"])
        (sums / counts).sum().backward()
        outs.append((sums.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for n, g in outs[0][1].items():
        # fp32 sums in another order: 7.7e-7 seen on gradients of magnitude 2 (AMD EPYC)
        torch.testing.assert_close(g, outs[1][1][n], rtol=1e-5, atol=1e-6, msg=n)
    # the patched head is still an ordinary Linear without labels (generation path)
    h = torch.randn(1, 2, tiny_lm.config.hidden_size)
    head = chunked.lm.get_output_embeddings()
    torch.testing.assert_close(head(h), h @ head.weight.T)


def test_softcapped_models_use_the_plain_path(tiny_lm):
    cfg = type("C", (), {"final_logit_softcapping": 30.0})()
    assert not supports_chunked_head(cfg)
    assert supports_chunked_head(tiny_lm.config)


def test_reference_actor_gives_zero_log_ratio_at_start(tiny_path):
    from simpo_ray.reference import ReferenceLogps

    batch = {"prompt_ids": np.array([[1, 3, 40], [1, 3, 42, 43]], dtype=object),
             "chosen_ids": np.array([[50, 2], [52, 53, 2]], dtype=object),
             "rejected_ids": np.array([[60, 61, 2], [62, 2]], dtype=object)}
    out = ReferenceLogps(str(tiny_path), "float32", "sdpa", 1024, pad_id=0)(batch)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_path)
    b = collate_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], 0, 8)
    sums, _ = PolicyLogps(lm, 1024)(b["input_ids"], b["attention_mask"], b["labels"])
    np.testing.assert_allclose(out["ref_chosen_logps"], sums[:2].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["ref_rejected_logps"], sums[2:].detach().numpy(), rtol=1e-6)
    s = SimPOConfig(loss="dpo", beta=0.1)
    _, m = step_loss(s, sums.detach(), torch.tensor([1, 2, 2, 1]),
                     torch.tensor(np.concatenate([out["ref_chosen_logps"], out["ref_rejected_logps"]])))
    m = to_metrics(m)
    assert abs(m["rewards/margins"]) < 1e-6
    # data.packing: the reference pass packs like training and gives the same numbers
    packed = ReferenceLogps(str(tiny_path), "float32", "sdpa", 1024, pad_id=0, pack_max_tokens=16)(batch)
    np.testing.assert_allclose(packed["ref_chosen_logps"], out["ref_chosen_logps"], rtol=1e-5)
    np.testing.assert_allclose(packed["ref_rejected_logps"], out["ref_rejected_logps"], rtol=1e-5)
